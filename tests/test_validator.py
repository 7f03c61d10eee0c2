"""The one validator (issue 13): every refusal a run makes before its first trial, a dry run
makes too, with the same one line and exit 2, writing nothing; and no input keeps the CLI
computing for more than a few seconds."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sweeper.run import main
from tests.conftest import base_doc


def _both_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict | None = None,
                 text: str | None = None, *extra: str) -> str:
    """Refusal of a dry run and of a run of the same spec: exit 2, one identical line,
    no experiment folder (nor anything else) written."""
    spec = tmp_path / "s.yaml"
    spec.write_text(text if text is not None else yaml.safe_dump(doc))
    before = sorted(p.name for p in tmp_path.iterdir())
    lines = []
    for args in ([str(spec), "--dry-run", *extra], [str(spec), *extra]):
        t0 = time.monotonic()
        assert main(args) == 2
        took = time.monotonic() - t0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        lines.append(err[0])
        assert took < 30, f"{args}: {took:.0f} s to refuse"
    assert lines[0] == lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


def _set(path: str, value: object) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node = doc
        *parents, last = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value

    return mutate


@pytest.mark.parametrize(("mutate", "expected"), [
    # A boolean is not a number (YAML `yes`), and no key means infinity or NaN.
    (_set("train.lr", True), "train.lr: expected a number, got the boolean true"),
    (_set("grid.batch_size", [16, True]),
     "grid.batch_size[1]: expected a number, got the boolean true"),
    (_set("scaling.worker_start_timeout_s", float("inf")),
     "scaling.worker_start_timeout_s: Input should be a finite number"),
    (_set("train.max_grad_norm", float("nan")), "train.max_grad_norm: Input should be a finite"),
    (_set("scaling.resources_per_worker", {"CPU": float("inf")}),
     "scaling.resources_per_worker.CPU: Input should be a finite number"),
    # Templates every trial would fail to fill.
    (_set("data.templates", ["a {} of {kind}"]), "data.templates: template [0] 'a {} of {kind}'"
                                                 " cannot be filled"),
    (_set("data.eval_templates", ["{} {0}"]), "data.eval_templates: template [0] '{} {0}'"),
    # A variant name is the start of a folder name.
    (_set("variants", {"../up": {"loss": "sigmoid"}}),
     "variants: variant name '../up' must be letters"),
    # Tiny presets that could not be built, or would take hours.
    (_set("model.tiny.num_heads", 3),
     "model.tiny: hidden_size 32 must be divisible by num_heads 3"),
    (_set("model.tiny.hidden_size", 100_000), "model.tiny.hidden_size: Input should be less"),
    (_set("data.num_workers", 500), "data.num_workers: Input should be less than or equal"),
    # Grid points that would be the same trial.
    (_set("grid.seed", [0, 0]), "grid: two grid points are both trial 'siglip-templates-bs16-k4"
                                "-s0' (the same values twice)"),
    (lambda d: d["grid"].update({"train.lr": [1e-4, 1.0000001e-4]}),
     "grid: two grid points are both trial 'siglip-templates-bs16-k4-s0-lr0.0001' (train.lr:"),
    # Micro-batches that do not divide the per-worker batch (16 / 2 workers = 8), from
    # train, a variant or a grid axis.
    (lambda d: (d["train"].update(micro_batch_size=3), d["scaling"].update(num_workers=2)),
     "train.micro_batch_size: 3 does not divide the per-worker batch grid.batch_size[0]=16 / "
     "scaling.num_workers=2 = 8"),
    (lambda d: d["variants"]["siglip"].update(train={"micro_batch_size": 32}),
     "variants.siglip.train.micro_batch_size: 32 does not divide the per-worker batch"),
    (lambda d: d["grid"].update({"train.micro_batch_size": [4, 6]}),
     "grid.train.micro_batch_size[1]: 6 does not divide the per-worker batch "
     "grid.batch_size[0]=16"),
    (_set("train.micro_batch_size", 0), "train.micro_batch_size: Input should be greater"),
    # A grid too large to lay out.
    (lambda d: d["grid"].update(seed=list(range(200)), batch_size=list(range(16, 1616, 16))),
     "grid: 20000 trials (100 batch_size x 200 seed) exceed the limit of 10000"),
])
def test_spec_refusals_dry_run_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       mutate: Callable[[dict], None], expected: str) -> None:
    doc = copy.deepcopy(base_doc(tmp_path))
    mutate(doc)
    msg = _both_refuse(tmp_path, capsys, doc)
    assert msg.startswith(expected), msg


def test_storage_must_be_a_directory_of_ours(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    msg = _both_refuse(tmp_path, capsys, base_doc(tmp_path, storage=str(tmp_path / "afile")))
    assert msg == f"storage: {str(tmp_path / 'afile')!r} exists and is not a directory"
    msg = _both_refuse(tmp_path, capsys,
                       base_doc(tmp_path, storage=str(tmp_path / "afile" / "below")))
    assert msg.endswith(f"{tmp_path / 'afile'} is not a directory")
    # An existing folder that is not an experiment of ours is never written into.
    (tmp_path / "mine" / "t").mkdir(parents=True)
    (tmp_path / "mine" / "t" / "thesis.tex").write_text("x")
    msg = _both_refuse(tmp_path, capsys, base_doc(tmp_path, storage=str(tmp_path / "mine")))
    assert msg.startswith(f"name: {tmp_path / 'mine' / 't'} exists and is not a sweeper "
                          "experiment")
    assert (tmp_path / "mine" / "t" / "thesis.tex").read_text() == "x"


def test_hostile_yaml_is_refused_quickly(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Nine levels of ten aliases each: a billion values once expanded.
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    bomb = yaml.safe_dump(base_doc(tmp_path)) + "\n".join(lines) + "\n"
    msg = _both_refuse(tmp_path, capsys, text=bomb)
    assert msg.endswith("expands to more than 100000 values (YAML aliases?)")
    deep = yaml.safe_dump(base_doc(tmp_path)) + "x: " + "[" * 100 + "]" * 100 + "\n"
    assert "nests deeper than 32 levels" in _both_refuse(tmp_path, capsys, text=deep)
    huge = yaml.safe_dump(base_doc(tmp_path)) + "# " + "x" * (1 << 20) + "\n"
    assert "a search space is at most 1048576" in _both_refuse(tmp_path, capsys, text=huge)


def test_a_huge_grid_is_counted_not_expanded(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    doc = base_doc(tmp_path)
    for axis in ("train.lr", "train.weight_decay", "train.warmup_steps", "eval.batch_size"):
        doc["grid"][axis] = [(i + 1) * (1e-5 if "lr" in axis else 1) for i in range(40)]
    msg = _both_refuse(tmp_path, capsys, doc)
    assert msg.startswith("grid: 2560000 trials (40 eval.batch_size x 40 train.lr x 40 "
                          "train.warmup_steps x 40 train.weight_decay) exceed the limit")
