"""Tests for analysis/: Parquet tables, report.md, plots, notebook and CLI.

Every test reads a synthetic experiment directory written here the way the sweeper and
Tune lay it out (sweep.json from the real spec expansion, trials/<id>/ files, Tune's own
trial folders), with the awkward cases a real sweep leaves behind: a trial errored with
only Tune's error.txt, one killed mid-run with a torn history line and an empty Tune
result.json, one never started, a diverged one, and several seeds. Expected cells are
computed here from the values written, independently of analysis.tables.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

try:
    import analysis
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import analysis
from analysis import reference
from analysis.report import main, write_report
from sweeper.search import grid_axes
from sweeper.sink import first_error_line
from sweeper.spec import spec_fingerprint, validate
from sweeper.trials import trial_configs
from tests.conftest import table_after

ROOT = Path(__file__).resolve().parents[1]
WNIDS = [f"n{i:08d}" for i in range(1, 13)]  # 12 eval classes
SEED_NOISE = {0: 0.0, 1: 0.013, 2: -0.007}

# Trials of the main experiment with a special fate; the rest terminate normally.
ERRORED_TUNE = "siglit-templates-bs64-k10-s2"  # no trials/ folder, Tune's error.txt only
RUNNING = "siglip-templates-bs64-k10-s2"  # killed: torn history line, empty result.json
PENDING = "siglit-templates-bs8-k2-s2"  # never started
DIVERGED = "siglip-templates-bs8-k2-s2"
ERRORED_OWN = "siglit-templates-bs8-k10-s2"  # status.json errored, multi-line error
TUNE_HISTORY = "siglip-templates-bs8-k10-s1"  # no history.jsonl: Tune's result.json used
BOTH_HISTORY = "siglip-templates-bs8-k10-s0"  # ours and Tune's differ: ours wins

TUNE_ERROR = (
    "Failure # 1 (occurred at 2026-01-01_10-00-00)\n"
    "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=123, ip=10.0.0.1)\n"
    '  File "/x/trainable.py", line 1, in train\n'
    "    raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
    "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
)


def final_top1(variant: str, text_source: str, bs: int, k: int, seed: int, lr: float) -> float:
    """The final val top-1 the synthetic trial reports (a fraction)."""
    base = 0.70 if variant == "siglip" else 0.60
    base += 0.02 * math.log2(64 / bs) + 0.01 * k + (0.05 if text_source == "templates" else 0)
    base += 0.02 if lr < 1e-4 else 0.0
    return round(base + SEED_NOISE.get(seed, 0.0), 6)


def zero_shot(k: int) -> float:
    return 0.25 + 0.001 * k


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _history(cfg: dict[str, Any], final: float, steps: int = 10) -> list[dict[str, Any]]:
    """Reports at step 0 (zero-shot), 5, 7 (train loss only) and `steps` (final)."""
    z = zero_shot(cfg["n_train_classes"])
    mid = (z + final) / 2
    rows = []
    for step, val, loss in ((0, z, None), (5, mid, 1.5), (7, None, 1.1), (steps, final, 0.8)):
        rows.append(
            {
                "epoch": step / steps * 2,
                "step": step,
                "samples_seen": step * cfg["batch_size"],
                "train_loss": loss,
                "lr": 1e-4,
                "logit_scale": 10.0,
                "logit_bias": -10.0,
                "val_top1": val,
                "val_top5": None if val is None else min(1.0, val + 0.1),
                "val_top1_seen": None if val is None else min(1.0, val + 0.05),
                "val_top1_unseen": None if val is None else val - 0.05,
                "samples_per_s": None if step == 0 else 100.0,
                "data_wait_frac": None if step == 0 else 0.1 * (step % 2),
                "time_s": step * 1.5,
                "skipped_images": 0,
            }
        )
    return rows


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def make_experiment(
    storage: Path,
    name: str,
    grid: dict[str, Any],
    special: bool = True,
    per_class: bool = True,
    real: bool = True,
) -> Path:
    """Write a synthetic experiment directory for `grid` and return its path. `real`: its
    spec names the course report's model and real data (so the reference figures apply),
    else the offline `tiny` preset on the synthetic dataset."""
    doc = {
        "name": name,
        "model": {"pretrained": reference.MODEL if real else "tiny"},
        "variants": {
            "siglip": {"loss": "sigmoid"},
            "siglit": {"loss": "sigmoid", "freeze_vision": True},
        },
        "data": (
            {"root": "/data/imagenet", "captions": "captions.jsonl"}
            if real
            else {"synthetic": {"n_classes": 12}}
        ),
        "train": {"epochs": 2},
        "grid": grid,
    }
    spec = validate(doc)
    configs = [c.model_dump(mode="json") for c in trial_configs(spec)]
    exp = storage / name
    _write(
        exp / "sweep.json",
        {
            "name": name,
            "fingerprint": spec_fingerprint(spec),
            "spec": spec.model_dump(mode="json"),
            "axes": grid_axes(spec),
            "trials": [
                {"trial_id": c["trial_id"], "axes": c["axes"], "config": c} for c in configs
            ],
            "created_at": "2026-01-01T09:00:00+00:00",
        },
    )
    for idx, cfg in enumerate(configs):
        tid = cfg["trial_id"]
        lr = cfg["train"]["lr"]
        final = final_top1(
            cfg["variant"],
            cfg["text_source"],
            cfg["batch_size"],
            cfg["n_train_classes"],
            cfg["seed"],
            lr,
        )
        fate = tid if special else None
        tdir = exp / "trials" / tid
        params = {**cfg["axes"], "storage": str(storage)}  # Tune adds keys of its own
        tune_dir = exp / tid  # Tune's folder, named by trial_dirname_creator
        if fate == PENDING:
            # A folder in Tune's default naming holding this trial's grid point and an
            # error: not named after a trial, so it belongs to none.
            stray = exp / f"driver_ab12c_{idx:05d}_{idx}_batch_size={cfg['batch_size']}"
            _write(stray / "params.json", params)
            (stray / "error.txt").write_text(TUNE_ERROR)
            continue
        if fate == ERRORED_TUNE:
            _write(tune_dir / "params.json", params)
            (tune_dir / "result.json").write_text("")
            (tune_dir / "error.txt").write_text(TUNE_ERROR)
            continue
        train_classes = WNIDS[: cfg["n_train_classes"]]
        _write(tdir / "config.json", cfg)
        history = _history(cfg, final)
        status: dict[str, Any] = {
            "status": "terminated",
            "error": None,
            "train_classes": train_classes,
            "train_class_names": [f"class {w}" for w in train_classes],
            "eval_classes": WNIDS,
            "trust_remote_code": False,
            "best_val_top1": final,
            "best_step": 10,
            "zero_shot_top1": zero_shot(cfg["n_train_classes"]),
            "wall_time_s": 42.0,
            "data_wait_frac": 0.125,
            "total_steps": 10,
            "started_at": "2026-01-01T09:00:00+00:00",
            "ended_at": "2026-01-01T09:01:00+00:00",
            "skipped_images": 0,
            "restarts": 0,
        }
        if fate == RUNNING:
            status = {
                "status": "running",
                "started_at": "2026-01-01T09:00:00+00:00",
                "train_classes": train_classes,
            }
            text = _jsonl(history[:2]) + '{"epoch": 1.4, "step": 7, "train_lo'
            (tdir / "history.jsonl").write_text(text)
            _write(tune_dir / "params.json", {"train_loop_config": params})
            (tune_dir / "result.json").write_text("")
        elif fate == DIVERGED:
            status.update(status="diverged", error="loss is NaN at step 7\nlast finite 0.9")
            (tdir / "history.jsonl").write_text(_jsonl(history[:3]))
        elif fate == ERRORED_OWN:
            status = {
                "status": "errored",
                "error": "ValueError: bad batch\nTraceback (most recent call last):\n  ...",
                "train_classes": train_classes,
            }
            (tdir / "history.jsonl").write_text(_jsonl(history[:1]))
        elif fate == TUNE_HISTORY:
            _write(tune_dir / "params.json", params)
            tune_rows = [{**r, "training_iteration": i + 1} for i, r in enumerate(history)]
            (tune_dir / "result.json").write_text(_jsonl(tune_rows))
        else:
            (tdir / "history.jsonl").write_text(_jsonl(history))
            if fate == BOTH_HISTORY:
                _write(tune_dir / "params.json", params)
                bogus = [{**r, "val_top1": 0.01, "step": r["step"] + 1} for r in history]
                (tune_dir / "result.json").write_text(_jsonl(bogus))
        _write(tdir / "status.json", status)
        if per_class and fate not in (ERRORED_OWN, RUNNING):
            evals = [
                {"step": 0, "accuracy": {w: 0.25 for w in WNIDS}},
                {"step": 10, "accuracy": {w: (0.9 if w in train_classes else 0.4) for w in WNIDS}},
            ]
            (tdir / "per_class.jsonl").write_text(_jsonl(evals))
    return exp


MAIN_GRID = {
    "variant": ["siglip", "siglit"],
    "batch_size": [8, 64],
    "n_train_classes": [2, 10],
    "seed": [0, 1, 2],
}
EXTRA_GRID = {
    "variant": ["siglip"],
    "text_source": ["captions", "templates"],
    "batch_size": [64],
    "n_train_classes": [10],
    "train.lr": [1e-4, 3e-5],
}
N_MAIN = 24


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The main experiment, reported once for the read-only tests."""
    exp = make_experiment(tmp_path_factory.mktemp("storage"), "toy", MAIN_GRID)
    return exp, write_report(exp)


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """One seed, captions vs templates and a dotted `train.lr` axis, no per-class data."""
    exp = make_experiment(
        tmp_path_factory.mktemp("storage"), "extra", EXTRA_GRID, special=False, per_class=False
    )
    return exp, write_report(exp)


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    if len(values) == 1:
        return f"{mean:.2f} ± – (1)"
    return f"{mean:.2f} ± {statistics.stdev(values) * 100:.2f} ({len(values)})"


# --------------------------------------------------------------------------- trials


def test_trials_rows_statuses_and_columns(built: tuple[Path, dict[str, Path]]) -> None:
    exp, paths = built
    trials = pq.read_table(paths["trials"]).to_pandas().set_index("trial_id")
    assert len(trials) == N_MAIN
    expected = {
        ERRORED_TUNE: "errored",
        RUNNING: "running",
        PENDING: "pending",
        DIVERGED: "diverged",
        ERRORED_OWN: "errored",
    }
    for tid, status in trials["status"].items():
        assert status == expected.get(tid, "terminated"), tid
    assert trials.loc[ERRORED_TUNE, "error"] == (
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert trials.loc[ERRORED_OWN, "error"] == "ValueError: bad batch"
    assert trials.loc[DIVERGED, "error"] == "loss is NaN at step 7"
    assert trials.loc[ERRORED_TUNE, "tune_path"].startswith(str(exp))

    required = [
        *("variant", "loss", "freeze_vision", "text_source", "batch_size", "n_train_classes"),
        *("seed", "lr", "weight_decay", "schedule", "budget_kind", "budget_value", "precision"),
        *("same_class_pairs", "num_workers", "pretrained", "trust_remote_code", "status"),
        *("error", "zero_shot_top1", "val_top1", "val_top5", "val_top1_seen", "val_top1_unseen"),
        *("train_loss", "best_val_top1", "best_step", "train_classes", "samples_seen", "steps"),
        *("epochs", "wall_time_s", "data_wait_frac", "trial_path"),
    ]
    assert not set(required) - set(trials.columns)

    done = trials.loc["siglit-templates-bs64-k2-s1"]
    assert done["val_top1"] == pytest.approx(final_top1("siglit", "templates", 64, 2, 1, 1e-4))
    assert done["zero_shot_top1"] == pytest.approx(zero_shot(2))
    assert done["train_loss"] == pytest.approx(0.8)
    assert (done["steps"], done["samples_seen"], done["best_step"]) == (10, 640, 10)
    assert done["total_steps"] == 10
    assert done["train_classes"] == ",".join(WNIDS[:2])
    assert (done["budget_kind"], done["budget_value"]) == ("epochs", 2)
    assert (done["loss"], bool(done["freeze_vision"]), done["pretrained"]) == (
        "sigmoid",
        True,
        reference.MODEL,
    )
    assert not done["synthetic_data"]
    # Device-hours: 1 worker x 1 CPU x 42 s.
    assert done["device_hours"] == pytest.approx(42.0 / 3600)
    assert done["trial_path"] == str(exp / "trials" / "siglit-templates-bs64-k2-s1")
    assert done["data_wait_frac"] == 0.125  # the whole trial's, from status.json

    # A killed trial keeps what it reported before the torn line.
    running = trials.loc[RUNNING]
    assert running["steps"] == 5
    assert running["zero_shot_top1"] == pytest.approx(zero_shot(10))
    assert running["wall_time_s"] == 7.5  # time_s of its last report
    assert running["data_wait_frac"] == pytest.approx(0.1)  # its reports' mean
    assert running["tune_path"] == str(exp / RUNNING)  # Tune's folder, by its name
    # History came from Tune's result.json when ours is missing, never over ours.
    assert trials.loc[TUNE_HISTORY, "steps"] == 10
    assert trials.loc[BOTH_HISTORY, "val_top1"] == pytest.approx(
        final_top1("siglip", "templates", 8, 10, 0, 1e-4)
    )
    # Grid order, as sweep.json lists it.
    spec_order = [t["trial_id"] for t in json.loads((exp / "sweep.json").read_text())["trials"]]
    assert list(trials.index) == spec_order


def test_history_and_per_class(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    history = pq.read_table(paths["history"]).to_pandas()
    counts = history.groupby("trial_id").size().to_dict()
    assert counts[RUNNING] == 2  # the torn third line is skipped
    assert counts[DIVERGED] == 3
    assert counts[ERRORED_OWN] == 1
    assert counts[TUNE_HISTORY] == 4
    assert PENDING not in counts and ERRORED_TUNE not in counts
    assert sum(counts.values()) == 4 * (N_MAIN - 5) + 2 + 3 + 1
    both = history[history["trial_id"] == BOTH_HISTORY]
    assert list(both["step"]) == [0, 5, 7, 10]
    assert {"variant", "batch_size", "n_train_classes", "seed", "val_top1_unseen"} <= set(
        history.columns
    )

    per_class = pq.read_table(paths["per_class"]).to_pandas()
    one = per_class[(per_class["trial_id"] == "siglip-templates-bs64-k2-s0")]
    assert len(one) == 2 * len(WNIDS)
    final = one[one["step"] == 10].set_index("wnid")
    assert final["seen"].sum() == 2
    assert bool(final.loc[WNIDS[0], "seen"]) and not bool(final.loc[WNIDS[5], "seen"])
    assert final.loc[WNIDS[0], "accuracy"] == pytest.approx(0.9)


# --------------------------------------------------------------------------- report


def _expected_values(variant: str, bs: int, k: int) -> list[float]:
    excluded = {ERRORED_TUNE, RUNNING, PENDING, DIVERGED, ERRORED_OWN}
    return [
        final_top1(variant, "templates", bs, k, s, 1e-4)
        for s in (0, 1, 2)
        if f"{variant}-templates-bs{bs}-k{k}-s{s}" not in excluded
    ]


def test_report_cells_best_and_reference(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    report = paths["report"].read_text()

    # Batch-size table at 10 classes: rows 8 and 64, one column per variant + reference.
    rows = table_after(report, "### train classes = 10")
    assert rows[0] == [
        "batch size",
        "siglip",
        "siglip (reference)",
        "siglit",
        "siglit (reference)",
    ]
    cells = {r[0]: r[1:] for r in rows[1:]}
    for j, variant in ((0, "siglip"), (2, "siglit")):
        small, big = _expected_values(variant, 8, 10), _expected_values(variant, 64, 10)
        assert cells["8"][j].strip("*") == _cell(small)
        assert cells["64"][j].strip("*") == _cell(big)
        best = "8" if statistics.fmean(small) > statistics.fmean(big) else "64"
        other = "64" if best == "8" else "8"
        assert cells[best][j].startswith("**") and not cells[other][j].startswith("**")
    assert [cells["8"][1], cells["64"][1]] == ["**93.44**", "89.82"]
    assert [cells["8"][3], cells["64"][3]] == ["**85.56**", "80.74"]

    # Train-classes table at batch 64 matches the reference classes study.
    rows = table_after(report, "### batch size = 64")
    assert rows[0][0] == "train classes" and rows[0][2] == "siglip (reference)"
    cells = {r[0]: r[1:] for r in rows[1:]}
    assert cells["2"][0].strip("*") == _cell(_expected_values("siglip", 64, 2))
    assert [cells["2"][1], cells["10"][1]] == ["80.60", "**89.82**"]
    assert [cells["2"][3], cells["10"][3]] == ["79.82", "**80.30**"]
    # At batch 8 no study matches: no reference column.
    assert "reference" not in " ".join(table_after(report, "### batch size = 8")[0])

    # Batch size × classes table per variant.
    rows = table_after(report, "### variant = siglit")
    assert rows[0] == ["batch size", "k=2", "k=10"]
    assert rows[1][2].strip("*") == _cell(_expected_values("siglit", 8, 10))

    # Errored trials, one line each with the first meaningful error line.
    assert (
        f"- `{ERRORED_TUNE}`: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
        in report
    )
    assert f"- `{ERRORED_OWN}`: ValueError: bad batch" in report
    assert f"- `{DIVERGED}`: loss is NaN at step 7" in report
    assert "24 trials: 19 terminated, 1 diverged, 2 errored, 1 running, 1 pending" in report
    assert f"| `{RUNNING}` | running | 5 | 26.00 |" in report
    assert (
        "| `siglip-templates-bs8-k2-s0` | terminated | 10 / 10 | 25.20 | 83.00 | 83.00 |" in report
    )


def test_zero_shot_and_seen_unseen_tables(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    report = paths["report"].read_text()
    rows = table_after(report, "## Zero-shot baseline vs final")
    assert rows[0][:3] == ["variant", "batch size", "train classes"]
    row = next(r for r in rows if r[:3] == ["siglit", "64", "10"])
    finals = _expected_values("siglit", 64, 10)
    assert row[3].strip("*") == _cell([zero_shot(10)] * len(finals))
    assert row[4].strip("*") == _cell(finals)
    assert row[5].strip("*") == _cell([f - zero_shot(10) for f in finals])
    rows = table_after(report, "## Seen vs unseen classes")
    row = next(r for r in rows if r[:3] == ["siglip", "8", "2"])
    finals = _expected_values("siglip", 8, 2)
    assert row[3].strip("*") == _cell([f + 0.05 for f in finals])
    assert row[4].strip("*") == _cell([f - 0.05 for f in finals])


def test_plots_are_written_and_linked(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    report = paths["report"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    names = {Path(link).name for link in links}
    assert "seen_vs_unseen.png" in names
    assert "learning_curves.png" in names  # 8 settings: one plot
    assert any(n.startswith("val_top1_vs_batch_size") for n in names)
    assert any(n.startswith("val_top1_vs_n_train_classes") for n in names)
    for link in links:
        png = paths["report"].parent / link
        assert png.read_bytes().startswith(b"\x89PNG"), link
        assert png.parent == paths["plots"]


def test_plot_functions_skip_without_data(built: tuple[Path, dict[str, Path]]) -> None:
    from analysis import plots

    trials, history = analysis.load(built[0])
    assert plots.learning_curves(history, trials, "siglit") is not None
    assert plots.learning_curves(history.iloc[:0], trials) is None
    pending = trials.assign(status="pending")
    assert plots.seen_unseen_plot(pending) is None
    (stale := built[1]["plots"] / "old.png").write_bytes(b"x")
    write_report(built[0])
    assert not stale.exists()


def test_extra_axis_single_seed_and_text_source(extra: tuple[Path, dict[str, Path]]) -> None:
    exp, paths = extra
    assert "per_class" not in paths and not (exp / "per_class.parquet").exists()
    trials = pq.read_table(paths["trials"]).to_pandas()
    assert len(trials) == 4 and set(trials["status"]) == {"terminated"}
    assert sorted(set(trials["train__lr"])) == [3e-5, 1e-4]
    assert list(trials.columns).index("train__lr") == list(trials.columns).index("seed") + 1
    assert "train__lr" in pq.read_table(paths["history"]).column_names

    report = paths["report"].read_text()
    rows = table_after(report, "## Val top-1 by text source")
    assert rows[0] == ["text source", "siglip", "siglip (reference)"]
    cells = {r[0]: r[1:] for r in rows[1:]}
    v = final_top1("siglip", "captions", 64, 10, 0, 3e-5)  # the first table: lr 3e-05
    assert cells["captions"] == [_cell([v]), "69.67"]
    assert cells["templates"][1] == "**87.27**"
    assert "± – (1)" in cells["captions"][0]
    # A table per value of the dotted axis, and one over it.
    assert "### train.lr = 3e-05" in report
    assert "## Val top-1 by train.lr" in report
    # One batch size: no batch-size table and no plot against it.
    assert "by batch size" not in report
    assert not list(paths["plots"].glob("val_top1_vs_batch_size*"))


def _recalls(top1: float) -> dict[str, float]:
    """Retrieval recalls and mean per-class recall a trial of final top-1 `top1` reports."""
    out = {f"val_{d}_r{k}": round(top1 * k / 10 - (0.01 if d == "t2i" else 0), 6)
           for d in ("i2t", "t2i") for k in (1, 5, 10)}
    return {**out, "val_mean_per_class_recall": top1 - 0.02,
            "val_mean_per_class_recall_seen": top1 + 0.03,
            "val_mean_per_class_recall_unseen": top1 - 0.07}


def test_retrieval_and_mean_per_class_recall(tmp_path: Path,
                                             extra: tuple[Path, dict[str, Path]]) -> None:
    exp = Path(shutil.copytree(extra[0], tmp_path / "extra"))
    for f in (exp / "trials").glob("*/history.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        f.write_text(_jsonl([{**r, **_recalls(r["val_top1"])} if r["val_top1"] is not None
                              else r for r in rows]))
    paths = write_report(exp)
    trials = pq.read_table(paths["trials"]).to_pandas()
    names = list(trials.columns)
    assert names.index("val_mean_per_class_recall") == names.index("val_top1_unseen") + 1
    for _, t in trials.iterrows():
        assert t["val_t2i_r5"] == pytest.approx(_recalls(t["val_top1"])["val_t2i_r5"])
    history = pq.read_table(paths["history"]).to_pandas()
    assert history["val_i2t_r10"].notna().sum() == 3 * len(trials)  # step 0, 5, last
    report = paths["report"].read_text()
    rows = table_after(report, "## Image-text retrieval")
    assert rows[0][-6:] == [f"{d} R@{k}" for d in ("image→text", "text→image") for k in (1, 5, 10)]
    v = final_top1("siglip", "captions", 64, 10, 0, 3e-5)
    row = next(r for r in rows if r[0] == "captions" and r[1] == "3e-05")
    assert row[2].strip("*") == _cell([_recalls(v)["val_i2t_r1"]])
    rows = table_after(report, "## Seen vs unseen classes")
    assert rows[0][-3:] == ["seen, per class", "unseen, per class", "all, per class"]
    row = next(r for r in rows if r[0] == "captions" and r[1] == "3e-05")
    assert row[-1].strip("*") == _cell([_recalls(v)["val_mean_per_class_recall"]])
    # Without the metrics (an older sweeper, no captions): no retrieval table, no columns.
    old = extra[1]["report"].read_text()
    assert "## Image-text retrieval" not in old and "per class" not in old.lower()


# --------------------------------------------------------------------------- files


def test_parquet_write_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: tuple[Path, dict[str, Path]]
) -> None:
    exp = tmp_path / "toy"
    shutil.copytree(built[0], exp)
    before = (exp / "trials.parquet").read_bytes()
    shutil.rmtree(exp / "trials" / "siglip-templates-bs64-k2-s1")  # new data to write

    def fail(fd: int) -> None:  # the bytes are in the temporary file, not yet renamed
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        analysis.write_parquet(exp)
    monkeypatch.undo()
    assert (exp / "trials.parquet").read_bytes() == before
    assert not [p.name for p in exp.iterdir() if p.name.endswith(".tmp")]
    # And a clean run replaces it.
    analysis.write_parquet(exp)
    assert (exp / "trials.parquet").read_bytes() != before


def test_rerun_gives_identical_bytes(tmp_path: Path, built: tuple[Path, dict[str, Path]]) -> None:
    exp = tmp_path / "toy"
    shutil.copytree(built[0], exp)
    first = write_report(exp)
    snapshot = {k: first[k].read_bytes() for k in ("trials", "history", "per_class", "report")}
    plots = {p.name: p.read_bytes() for p in first["plots"].iterdir()}
    second = write_report(exp)
    assert {k: second[k].read_bytes() for k in snapshot} == snapshot
    assert {p.name: p.read_bytes() for p in second["plots"].iterdir()} == plots


def test_pandas_polars_duckdb_read_the_files(built: tuple[Path, dict[str, Path]]) -> None:
    import duckdb
    import pandas as pd
    import polars as pl

    _, paths = built
    for key in ("trials", "history", "per_class"):
        path = paths[key]
        expected = pq.read_table(path)
        pdf = pd.read_parquet(path)
        pldf = pl.read_parquet(path)
        rel = duckdb.sql(f"SELECT * FROM read_parquet('{path}')")
        assert len(pdf) == len(pldf) == len(rel.fetchall()) == expected.num_rows
        assert list(pdf.columns) == pldf.columns == rel.columns == expected.column_names
    trials = paths["trials"]
    n = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{trials}') WHERE status = 'terminated'"
    ).fetchall()
    assert n == [(19,)]
    assert pl.read_parquet(trials).schema["batch_size"] == pl.Int64
    assert pd.read_parquet(trials)["val_top1"].dtype == "float64"


def test_load_builds_missing_parquet(tmp_path: Path, built: tuple[Path, dict[str, Path]]) -> None:
    exp = make_experiment(tmp_path, "fresh", MAIN_GRID)
    trials, history = analysis.load(exp)
    assert (exp / "trials.parquet").is_file() and (exp / "history.parquet").is_file()
    assert len(trials) == N_MAIN and len(history) == 4 * (N_MAIN - 5) + 6
    again, _ = analysis.load(exp)
    assert again.equals(trials)
    assert len(analysis.load_per_class(exp)) > 0


def test_uri_experiment_writes_to_out(tmp_path: Path, built: tuple[Path, dict[str, Path]]) -> None:
    exp = tmp_path / "toy"
    shutil.copytree(built[0], exp, ignore=shutil.ignore_patterns("*.parquet", "plots", "*.md"))
    out = tmp_path / "out"
    paths = write_report(exp.as_uri(), out_dir=out)
    assert paths["report"] == out / "report.md"
    local = pq.read_table(built[1]["trials"]).drop_columns(["trial_path", "tune_path"])
    remote = pq.read_table(paths["trials"]).drop_columns(["trial_path", "tune_path"])
    assert remote.equals(local)
    assert pq.read_table(paths["trials"])["trial_path"][0].as_py().startswith("file://")
    assert not (exp / "trials.parquet").exists()
    # Without --out the outputs go next to the experiment, as for a bucket (test_storage).
    assert write_report(exp.as_uri())["report"] == exp / "report.md"


def test_partial_experiments(tmp_path: Path) -> None:
    # Only sweep.json: every trial pending, the report still complete.
    exp = make_experiment(tmp_path, "early", MAIN_GRID)
    for p in exp.iterdir():
        if p.name != "sweep.json":
            shutil.rmtree(p)
    paths = write_report(exp)
    trials = pq.read_table(paths["trials"]).to_pandas()
    assert set(trials["status"]) == {"pending"} and len(trials) == N_MAIN
    assert pq.read_table(paths["history"]).num_rows == 0
    assert "24 trials: 24 pending" in paths["report"].read_text()

    # No sweep.json: the trials folders alone.
    exp = make_experiment(tmp_path, "nosweep", MAIN_GRID)
    (exp / "sweep.json").unlink()
    trials = pq.read_table(write_report(exp)["trials"]).to_pandas()
    assert len(trials) == N_MAIN - 2  # the pending and the Tune-only trials have no folder
    assert set(trials["batch_size"]) == {8, 64}


def test_damaged_files_do_not_stop_the_report(tmp_path: Path) -> None:
    exp = make_experiment(tmp_path, "damaged", MAIN_GRID)
    tdir = exp / "trials" / "siglip-templates-bs64-k2-s0"
    (tdir / "status.json").write_text('{"status": "termin')  # torn by a crash
    (tdir / "config.json").unlink()
    (tdir / "history.jsonl").write_text(
        '[1, 2]\n{"step": "x", "val_top1": "high"}\n{"step": 3, "val_top1": true}\n'
        '{"step": 4, "val_top1": NaN, "samples_seen": 2.5}\n'
    )
    (tdir / "per_class.jsonl").write_text('{"step": 1, "accuracy": [0.5]}\n')
    (exp / "driver_zz_99999_bad").mkdir()
    (exp / "driver_zz_99999_bad" / "params.json").write_text("not json")
    paths = write_report(exp)
    trials = pq.read_table(paths["trials"]).to_pandas().set_index("trial_id")
    row = trials.loc["siglip-templates-bs64-k2-s0"]
    assert row["status"] == "running" and row["batch_size"] == 64  # axes from sweep.json
    assert math.isnan(row["val_top1"]) and row["steps"] == 4
    assert len(trials) == N_MAIN


def test_first_error_line() -> None:
    assert first_error_line("boom\nmore") == "boom"
    assert first_error_line(TUNE_ERROR).startswith("RuntimeError: CUDA out of memory")
    assert first_error_line("Traceback (most recent call last):\n  File \"x\"\nKeyError: 'a'") == (
        "KeyError: 'a'"
    )
    assert first_error_line(None) is None and first_error_line("  \n") is None


def test_reference_lookup() -> None:
    assert reference.model_kind("sigmoid", True) == reference.SIGLIT
    assert reference.model_kind("softmax", False) is None
    study = reference.lookup(
        reference.SIGLIP, "batch_size", {"n_train_classes": 10, "text_source": "templates"}
    )
    assert study is not None and reference.figure(study, 4) == 95.16
    assert reference.lookup(reference.SIGLIP, "batch_size", {"n_train_classes": 9}) is None


# --------------------------------------------------------------------------- entry points


def test_cli_main(tmp_path: Path, built: tuple[Path, dict[str, Path]]) -> None:
    exp = tmp_path / "toy"
    shutil.copytree(built[0], exp)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([str(exp)]) == 0
    printed = dict(line.split(": ", 1) for line in buf.getvalue().splitlines())
    assert set(printed) == {"trials", "history", "per_class", "report", "plots"}
    assert all(Path(p).exists() for p in printed.values())
    assert printed["report"] == str(exp / "report.md")
    assert main([str(tmp_path / "missing")]) == 2


def test_python_dash_m(tmp_path: Path, extra: tuple[Path, dict[str, Path]]) -> None:
    exp = tmp_path / "extra"
    shutil.copytree(extra[0], exp)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "analysis.report", str(exp)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"report: {exp / 'report.md'}" in done.stdout.splitlines()
    bad = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(tmp_path / "nope")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    exp = make_experiment(tmp_path, "nb", MAIN_GRID)  # no Parquet yet: the notebook builds it
    nb = nbformat.read(ROOT / "analysis" / "explore.ipynb", as_version=4)
    monkeypatch.setenv("SWEEPER_EXPERIMENT", str(exp))  # the kernel inherits it
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "analysis")}},
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = json.dumps([o.get("data", o.get("text", "")) for o in outputs])
    assert "siglip (reference)" in text
    assert "share of variance (eta\\u00b2)" in text  # json.dumps escapes the ²
    assert "Best vs runner-up" in text
    assert (exp / "trials.parquet").is_file()


_FSIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit, at = int(sys.argv[2]), sys.argv[3]
import analysis.report as R
real = R.atomic_write_bytes
def limited(path, data):  # the limit from the write of report.md on (Parquet and plots fit)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    real(path, data)
if at == "report_md":
    R.atomic_write_bytes = limited
else:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(R.main([sys.argv[1]]))
"""


@pytest.mark.parametrize("at", ["first_write", "report_md"])
def test_disk_full_keeps_the_previous_report(
    tmp_path: Path, built: tuple[Path, dict[str, Path]], at: str
) -> None:
    """A real write failure (a file-size limit: writes past it fail like a full disk) at
    the first output or while writing report.md: one-line error, exit 1, and the previous
    report and Parquet files are whole (each old or new, none torn), no temporary files."""
    exp = tmp_path / "toy"
    shutil.copytree(built[0], exp)
    before = {p.relative_to(exp): p.read_bytes() for p in exp.rglob("*")
              if p.is_file() and p.suffix in (".md", ".parquet", ".png")}
    shutil.rmtree(exp / "trials" / "siglip-templates-bs64-k2-s1")  # the new report differs
    report = exp / "report.md"
    # From the write of report.md on, less room than half the old report: the new one (a
    # trial fewer) cannot fit.
    limit = 0 if at == "first_write" else len(report.read_bytes()) // 2
    r = subprocess.run([sys.executable, "-c", _FSIZE_LIMITED, str(exp), str(limit), at],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: could not write the report ") and "File too large" in line
    assert str(exp) in line
    assert report.read_bytes() == before[Path("report.md")]
    for rel, old in before.items():  # old bytes, or a complete new file
        new = (exp / rel).read_bytes()
        if rel.suffix == ".parquet" and new != old:
            pq.read_table(exp / rel)
    if at == "first_write":
        assert {rel: (exp / rel).read_bytes() for rel in before} == before
    assert not [p for p in exp.rglob("*.tmp")]
    assert main([str(exp)]) == 0  # with room again, the new report replaces it
    assert report.read_bytes() != before[Path("report.md")]
