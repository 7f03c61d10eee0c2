"""Spec validation, overrides, grid expansion and the CLI's refusal/dry-run paths."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sweeper.run import main
from sweeper.search import grid_points, known_up_front, n_trials
from sweeper.spec import SpecError, load_spec, validate
from sweeper.trials import trial_configs
from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]


def refusal(doc: dict) -> str:
    with pytest.raises(SpecError) as e:
        validate(doc)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_valid_doc_round_trips(tmp_path: Path) -> None:
    spec = validate(base_doc(tmp_path))
    assert spec.variants["siglit"].freeze_vision is True
    with pytest.raises(ValidationError):  # frozen models
        spec.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(bogus=1), "bogus: unknown key"),
        (lambda d: d["train"].update(lr="fast"), "train.lr:"),
        (lambda d: d["train"].update(lrr=1), "train.lrr: unknown key"),
        (lambda d: d["grid"].update(variant=["siglip", "clip"]),
         "grid.variant[1]: variant 'clip' is not defined"),
        (lambda d: (d["grid"].update(batch_size=[16, 15]), d["scaling"].update(num_workers=2)),
         "grid.batch_size[1]: 15 must be divisible by scaling.num_workers=2"),
        (lambda d: d["grid"].update(n_train_classes=[4, 99]),
         "grid.n_train_classes[1]: 99 exceeds the dataset's 8 classes"),
        (lambda d: d["variants"]["siglip"].update(loss="hinge"), "variants.siglip.loss:"),
        (lambda d: d["grid"].update(batch_size=[0]), "grid.batch_size:"),
        (lambda d: d["data"].update(templates=["no slot"]), "data.templates:"),
        (lambda d: d["grid"].update(**{"train.lrx": [1]}), "grid.train.lrx[0]: train.lrx"),
        (lambda d: d["grid"].update(**{"foo": [1]}), "grid.foo: unknown axis"),
        (lambda d: d["grid"].update(text_source=["pictures"]), "grid.text_source[0]:"),
        (lambda d: d["variants"]["siglip"].update(train={"lr": -1}),
         "variants.siglip.train.lr:"),
    ],
)
def test_refusals_name_the_key(tmp_path: Path, mutate, expected: str) -> None:
    doc = copy.deepcopy(base_doc(tmp_path))
    mutate(doc)
    assert refusal(doc).startswith(expected.split(":")[0] + ":")
    assert expected in refusal(doc)


def test_python_tags_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(p)


def test_overrides_apply_and_validate(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(base_doc(tmp_path)))
    spec = load_spec(p, ["train.lr=3e-4", "grid.seed=[0, 1, 2]", "name=other"])
    assert spec.train.lr == pytest.approx(3e-4)
    assert spec.grid.seed == [0, 1, 2] and spec.name == "other"
    with pytest.raises(SpecError, match=r"^train\.lr:"):
        load_spec(p, ["train.lr=abc"])


def test_grid_expansion_count_and_content(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["grid"] = {"variant": ["siglip", "siglit"], "text_source": ["templates", "captions"],
                   "batch_size": [8, 16], "n_train_classes": [2, 4], "seed": [0, 1],
                   "train.lr": [1e-3, 1e-4]}
    trials = trial_configs(validate(doc))
    assert len(trials) == 2 ** 6
    ids = {t.trial_id for t in trials}
    assert len(ids) == len(trials)
    lit = [t for t in trials if t.variant == "siglit"]
    assert all(t.freeze_vision and t.loss == "sigmoid" for t in lit)
    assert {t.train.lr for t in trials} == {1e-3, 1e-4}
    assert {(t.batch_size, t.n_train_classes, t.seed) for t in trials} == {
        (b, k, s) for b in (8, 16) for k in (2, 4) for s in (0, 1)}
    # The dry-run order is the order Tune's grid_search produces.
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    from sweeper.search import grid_axes

    space = {k: tune.grid_search(v) for k, v in grid_axes(validate(doc)).items()}
    tune_order = [dict(cfg) for _, cfg in generate_variants(space)]
    assert [{k: p[k] for k in space} for p in grid_points(validate(doc))] == [
        {k: c[k] for k in space} for c in tune_order]


def test_variant_overrides_reach_trial(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["variants"]["siglip"]["train"] = {"lr": 5e-5}
    doc["grid"]["variant"] = ["siglip", "siglit"]
    by_variant = {t.variant: t for t in trial_configs(validate(doc))}
    assert by_variant["siglip"].train.lr == pytest.approx(5e-5)
    assert by_variant["siglit"].train.lr == pytest.approx(1e-3)


def test_micro_batch_keys_are_grid_axes(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["scaling"]["num_workers"] = 2
    doc["grid"].update({"batch_size": [8, 16], "train.micro_batch_size": [2, 4],
                        "train.gradient_checkpointing": [False, True]})
    trials = trial_configs(validate(doc))
    assert {(t.batch_size, t.train.micro_batch_size, t.train.gradient_checkpointing)
            for t in trials} == {(b, m, c) for b in (8, 16) for m in (2, 4)
                                 for c in (False, True)}
    assert len({t.trial_id for t in trials}) == 8
    assert validate(base_doc(tmp_path)).train.micro_batch_size is None  # one pass


def test_cli_bad_spec_exits_2_with_one_line(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["scaling"]["num_workers"] = 2
    doc["grid"]["batch_size"] = [16, 15]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "sweeper.run", str(p)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: grid.batch_size[1]: 15 must be divisible by scaling.num_workers=2"]
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_dry_run_lists_trials(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(ROOT / "search_spaces" / "quickstart.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "siglit-captions-bs32-k20-s0" in out
    assert "8 trials" in out


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_search_spaces_validate(path: Path) -> None:
    spec = load_spec(path)
    # A grid lists its trials; a sampling search proposes them as it runs.
    assert len(trial_configs(spec)) == n_trials(spec) if known_up_front(spec) else n_trials(spec)
