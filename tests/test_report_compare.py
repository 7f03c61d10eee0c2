"""Tests of the report's comparisons: which reference applies, which axis mattered, which
differences are real (Welch), what the sweep cost, and the statistics behind them.

Experiments are written here with minimal files (sweep.json from the real spec expansion,
and per trial a status.json and a two-line history.jsonl: the zero-shot step 0 and the
final evaluation), with final accuracies chosen so that the expected figures follow from
the values written, independently of analysis/.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from analysis import reference
from analysis import tables as T
from analysis.collect import device_hours
from analysis.importance import importance
from analysis.plots import axis_plot, learning_curves, parallel_coordinates
from analysis.report import write_report
from analysis.stats import betainc, eta_squared, t_sf2, welch
from sweeper.grid import grid_axes
from sweeper.spec import spec_fingerprint, validate
from sweeper.trials import trial_configs
from tests.conftest import table_after

ROOT = Path(__file__).resolve().parents[1]
ZERO_SHOT = 0.25
WALL_S = 36.0
ERROR = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
# The two-sided 5% critical value of Student's t with 6 degrees of freedom (tables).
T_CRIT_6 = 2.4469


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


def write_experiment(
    storage: Path,
    name: str,
    grid: dict[str, Any],
    top1: Callable[[dict[str, Any]], float],
    *,
    pretrained: str = "tiny",
    real: bool = False,
    fates: Callable[[dict[str, Any]], str] | None = None,
) -> Path:
    """An experiment directory for `grid` whose trials end at `top1(config)`; `fates`
    may make a trial `errored` or `diverged` instead of `terminated`."""
    doc = {
        "name": name,
        "model": {"pretrained": pretrained},
        "variants": {
            "siglip": {"loss": "sigmoid"},
            "siglit": {"loss": "sigmoid", "freeze_vision": True},
        },
        "data": {"root": "/data/imagenet"} if real else {"synthetic": {"n_classes": 20}},
        "train": {"epochs": 3},
        "grid": grid,
    }
    spec = validate(doc)
    configs = [c.model_dump(mode="json") for c in trial_configs(spec)]
    exp = storage / name
    (exp / "trials").mkdir(parents=True)
    _dump(
        exp / "sweep.json",
        {
            "name": name,
            "fingerprint": spec_fingerprint(spec),
            "axes": grid_axes(spec),
            "trials": [
                {"trial_id": c["trial_id"], "axes": c["axes"], "config": c} for c in configs
            ],
            "created_at": "2026-01-01T09:00:00+00:00",
        },
    )
    for cfg in configs:
        fate = fates(cfg) if fates else "terminated"
        final = top1(cfg)
        tdir = exp / "trials" / cfg["trial_id"]
        tdir.mkdir()
        _dump(
            tdir / "status.json",
            {
                "status": fate,
                "error": {"errored": ERROR, "diverged": "loss is NaN at step 3"}.get(fate),
                "zero_shot_top1": ZERO_SHOT,
                "best_val_top1": final,
                "best_step": 10,
                "steps": 10,
                "total_steps": 10,
                "wall_time_s": WALL_S,
                "world_size": 1,
                "device": "cpu",
            },
        )
        rows = [
            {"step": 0, "epoch": 0.0, "val_top1": ZERO_SHOT, "time_s": 0.0},
            {"step": 10, "epoch": 3.0, "val_top1": final, "train_loss": 0.5, "time_s": WALL_S},
        ]
        (tdir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return exp


def links(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


# --------------------------------------------------------------------------- reference

REF_GRID = {
    "variant": ["siglip", "siglit"],
    "batch_size": [8, 64],
    "n_train_classes": [10],
    "seed": [0],
}


def _by_batch(cfg: dict[str, Any]) -> float:
    return 0.9 if cfg["batch_size"] == 8 else 0.85


def _siglip_dir(path: Path, hidden: int) -> Path:
    path.mkdir()
    config = {
        "model_type": "siglip",
        "vision_config": {"hidden_size": hidden, "patch_size": 16, "image_size": 224},
        "text_config": {"hidden_size": hidden},
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_reference_model_rule(tmp_path: Path) -> None:
    assert reference.same_model("google/siglip-base-patch16-224")
    assert reference.same_model("Google/SigLIP-base-patch16-224/")
    assert not reference.same_model("tiny")
    assert not reference.same_model("google/siglip-so400m-patch14-384")
    assert reference.same_model(str(_siglip_dir(tmp_path / "base", 768)))
    assert not reference.same_model(str(_siglip_dir(tmp_path / "small", 32)))
    assert not reference.same_model(str(tmp_path / "missing"))
    (tmp_path / "defaults").mkdir()  # architecture left to the library's defaults
    (tmp_path / "defaults" / "config.json").write_text('{"model_type": "siglip"}')
    assert not reference.same_model(str(tmp_path / "defaults"))

    assert reference.same_setting([reference.MODEL], [False])
    assert not reference.same_setting([reference.MODEL], [True])
    assert not reference.same_setting([reference.MODEL], [None])  # unknown data
    assert not reference.same_setting([reference.MODEL, "tiny"], [False, False])
    assert not reference.same_setting([], [])


def test_no_reference_for_tiny_on_synthetic_data(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, "tiny", REF_GRID, _by_batch)
    report = write_report(exp)["report"].read_text()
    assert "reference" not in " ".join(table_after(report, "## Val top-1 by batch size")[0])
    assert "(reference)" not in report
    assert (
        "No reference figures apply: the course report (a report for a course on multimodal "
        "representations that fine-tuned SigLIP and SigLiT on ImageNet; its studies and "
        "figures: `docs/studies.md`) fine-tuned `google/siglip-base-patch16-224` on real "
        "ImageNet images; this sweep fine-tunes `tiny` on synthetic data."
    ) in report.splitlines()
    assert (ROOT / "docs" / "studies.md").is_file()  # where the report sends its reader
    trials = pq.read_table(exp / "trials.parquet").to_pandas()
    assert trials["synthetic_data"].all()


@pytest.mark.parametrize(
    ("model", "real", "expected"),
    [
        ("hub", True, True),
        ("local", True, True),
        ("hub", False, False),  # the reference's model, but synthetic data
        ("other", True, False),  # real data, another model
        ("small", True, False),  # a local SigLIP of another size
    ],
)
def test_reference_columns_only_for_the_same_study(
    tmp_path: Path, model: str, real: bool, expected: bool
) -> None:
    pretrained = {
        "hub": reference.MODEL,
        "other": "openai/clip-vit-base-patch16",
        "local": str(_siglip_dir(tmp_path / "local", 768)),
        "small": str(_siglip_dir(tmp_path / "small", 32)),
    }[model]
    exp = write_experiment(tmp_path, "ref", REF_GRID, _by_batch, pretrained=pretrained, real=real)
    report = write_report(exp)["report"].read_text()
    header = table_after(report, "## Val top-1 by batch size")[0]
    if expected:
        assert header == ["batch size", "siglip", "siglip (reference)", "siglit",
                          "siglit (reference)"]
        rows = table_after(report, "## Val top-1 by batch size")
        assert [r[2] for r in rows[1:]] == ["**93.44**", "89.82"]  # SigLIP at 10 classes
        assert "No reference figures apply" not in report
    else:
        assert header == ["batch size", "siglip", "siglit"]
        (line,) = [ln for ln in report.splitlines() if ln.startswith("No reference figures")]
        assert ("synthetic data" in line) == (not real)
        ours = "the same model" if model == "hub" else f"`{pretrained}`"
        assert f"this sweep fine-tunes {ours} on" in line


def test_no_reference_when_no_study_has_the_axes(tmp_path: Path) -> None:
    grid = {**REF_GRID, "n_train_classes": [7]}  # no study at 7 classes and batch 8 / 64
    exp = write_experiment(tmp_path, "axes", grid, _by_batch, pretrained=reference.MODEL,
                           real=True)
    report = write_report(exp)["report"].read_text()
    assert "(reference)" not in report
    assert "No reference figures apply: no table of this sweep reproduces one" in report


# --------------------------------------------------------------------------- importance

IMP_GRID = {
    "variant": ["siglip", "siglit"],
    "batch_size": [8, 64],
    "n_train_classes": [2, 10],
    "seed": [0, 1, 2],
}


def test_importance_one_axis_explains_everything(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, "imp", IMP_GRID, _by_batch)
    paths = write_report(exp)
    report = paths["report"].read_text()
    rows = table_after(report, "## Which axis mattered")
    assert rows[0] == ["axis", "levels", "trials per level", "share of variance (eta²)"]
    assert rows[1] == ["batch size", "2", "12", "100.0%"]
    assert sorted(r[0] for r in rows[2:]) == ["train classes", "variant"]
    assert [r[3] for r in rows[2:]] == ["0.0%", "0.0%"]
    section = report[report.index("## Which axis mattered") : report.index("## Batch size")]
    assert "one-way ANOVA" in section and "eta²" in section
    assert "Indicative only" not in section  # 24 trials, 12 per level
    assert "plots/parallel_coordinates.png" in links(section)
    assert (paths["plots"] / "parallel_coordinates.png").read_bytes().startswith(b"\x89PNG")


def test_importance_with_few_trials_is_indicative(tmp_path: Path) -> None:
    def top1(cfg: dict[str, Any]) -> float:  # both axes matter, k twice as much as bs
        return 0.5 + 0.1 * (cfg["batch_size"] == 8) + 0.2 * (cfg["n_train_classes"] == 10)

    exp = write_experiment(tmp_path, "few", {**IMP_GRID, "seed": [0]}, top1)
    report = write_report(exp)["report"].read_text()
    rows = table_after(report, "## Which axis mattered")
    # Balanced 2x2x2 grid: eta² of an axis = its squared effect over the total: 4/5, 1/5.
    assert [(r[0], r[3]) for r in rows[1:]] == [
        ("train classes", "80.0%"),
        ("batch size", "20.0%"),
        ("variant", "0.0%"),
    ]
    assert (
        "Indicative only: 8 trials (fewer than 20) and a level with fewer than 5 trials."
        in report
    )
    # One seed a cell: nothing to test, no marks, no legend.
    assert T.TIE_MARK not in report and "Best vs runner-up" not in report


def test_no_importance_for_one_varying_axis(tmp_path: Path) -> None:
    grid = {**REF_GRID, "variant": ["siglip"]}
    exp = write_experiment(tmp_path, "one", grid, _by_batch)
    paths = write_report(exp)
    assert "## Which axis mattered" not in paths["report"].read_text()
    assert not (paths["plots"] / "parallel_coordinates.png").exists()
    trials = pq.read_table(paths["trials"]).to_pandas()
    assert importance(trials) is None


# --------------------------------------------------------------------------- significance

SIG_GRID = {
    "variant": ["siglip", "siglit"],
    "batch_size": [8, 16, 64],
    "n_train_classes": [10],
    "seed": [0, 1, 2, 3],
}
SIG_NOISE = {0: 0.01, 1: -0.01, 2: 0.02, 3: -0.02}
SIG_MEANS = {  # siglip: 8 and 16 cannot be told apart; siglit: every step is real
    "siglip": {8: 0.80, 16: 0.795, 64: 0.60},
    "siglit": {8: 0.80, 16: 0.70, 64: 0.60},
}


def _sig_top1(cfg: dict[str, Any]) -> float:
    return SIG_MEANS[cfg["variant"]][cfg["batch_size"]] + SIG_NOISE[cfg["seed"]]


def test_significance_marks(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, "sig", SIG_GRID, _sig_top1)
    report = write_report(exp)["report"].read_text()
    rows = table_after(report, "## Val top-1 by batch size")
    assert rows[0] == ["batch size", "siglip", "siglit"]
    cells = {r[0]: r[1:] for r in rows[1:]}
    # Welch by hand: equal spreads and n, so df = 2(n - 1) = 6 and t = gap / sqrt(2 s²/n).
    sd = statistics.stdev(SIG_NOISE.values())
    for j, variant in enumerate(("siglip", "siglit")):
        means = SIG_MEANS[variant]
        assert cells["8"][j].startswith("**") and not cells["8"][j].endswith(T.TIE_MARK)
        for bs in (16, 64):
            t = (means[8] - means[bs]) / math.sqrt(2 * sd**2 / 4)
            tied = abs(t) < T_CRIT_6
            assert cells[str(bs)][j].endswith(f" {T.TIE_MARK}") == tied, (variant, bs)
    assert cells["16"][0].endswith(T.TIE_MARK) and not cells["64"][0].endswith(T.TIE_MARK)
    assert not any(c.endswith(T.TIE_MARK) for c in (cells["16"][1], cells["64"][1]))

    (line,) = [ln for ln in report.splitlines() if ln.startswith("Best vs runner-up")]
    assert "Welch's t-test over seeds, two-sided, p < 0.05" in line
    p_siglip = welch(0.80, sd, 4, 0.795, sd, 4).p
    assert f"siglip: 8 leads 16 by 0.50 points, p = {p_siglip:.2g}, within the seed spread" in line
    assert "siglit: 8 leads 16 by 10.00 points, p < 0.001, beyond the seed spread." in line
    assert f"{T.TIE_MARK} marks a cell that Welch's t-test over seeds" in report


def test_lead_of_a_column() -> None:
    col = T.Column("x", [T.Stats(0.8, 0.01, 3), T.Stats(0.7, 0.01, 3), T.Stats(0.79, None, 1)])
    ld = T.lead(col)
    assert ld is not None and ld.best == {0} and ld.runner_up == 2
    assert ld.test is None and ld.ties == frozenset()  # one seed: not tested, not marked
    assert T.lead(T.Column("r", col.cells, reference=True)) is None


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 3.0, 30.0])
def test_t_distribution_closed_forms(t: float) -> None:
    # df = 1 is Cauchy, df = 2 has a closed form too.
    assert t_sf2(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
    assert t_sf2(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    assert t_sf2(t, math.inf) == pytest.approx(math.erfc(t / math.sqrt(2)))


def test_t_critical_values_and_beta() -> None:
    assert t_sf2(2.228139, 10) == pytest.approx(0.05, abs=1e-6)
    assert t_sf2(12.7062, 1) == pytest.approx(0.05, abs=1e-5)
    assert t_sf2(T_CRIT_6, 6) == pytest.approx(0.05, abs=1e-4)
    assert t_sf2(0.0, 5) == pytest.approx(1.0)
    # I_x(2, 3) = sum_{j=2}^{4} C(4, j) x^j (1 - x)^(4 - j)
    x = 0.4
    assert betainc(2, 3, x) == pytest.approx(
        sum(math.comb(4, j) * x**j * (1 - x) ** (4 - j) for j in range(2, 5)), rel=1e-12
    )
    assert betainc(0.5, 0.5, 0.5) == pytest.approx(0.5)


def test_welch_by_hand() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0, 7.0]
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 5
    res = welch(statistics.fmean(a), statistics.stdev(a), 4, statistics.fmean(b),
                statistics.stdev(b), 5)
    assert res is not None
    assert res.t == pytest.approx((2.5 - 5.0) / math.sqrt(va + vb))
    assert res.df == pytest.approx((va + vb) ** 2 / (va**2 / 3 + vb**2 / 4))
    assert 0.01 < res.p < 0.05
    assert welch(0.5, 0.1, 1, 0.4, 0.1, 3) is None
    assert welch(0.5, 0.0, 3, 0.4, 0.0, 3).p == 0.0
    assert welch(0.5, 0.0, 3, 0.5, 0.0, 3).p == 1.0


def test_eta_squared() -> None:
    assert eta_squared([1.0, 1.0, 2.0, 2.0], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert eta_squared([1.0, 2.0, 1.0, 2.0], ["a", "a", "b", "b"]) == pytest.approx(0.0)
    # Means 1.5 and 3.5 around 2.5: between = 2 * 1 + 2 * 1 = 4, total = 5.
    assert eta_squared([1.0, 2.0, 3.0, 4.0], ["a", "a", "b", "b"]) == pytest.approx(4 / 5)
    assert eta_squared([3.0, 3.0], ["a", "b"]) is None


def test_fmt_values() -> None:
    assert T.fmt_values(list(range(1250))) == "0-1249 (1250)"
    assert T.fmt_values([9, 0, 2, 5, 6, 7, 8]) == "0, 2, 5-9 (7)"
    assert T.fmt_values([0, 1]) == "0, 1 (2)"
    assert T.fmt_values([3.0, 4.0, 5.0, None]) == "3-5 (3)"
    assert T.fmt_values(["a"]) == "a"
    assert T.fmt_values([f"v{i:02d}" for i in range(40)]).endswith("…, v39 (40)")
    assert T.fmt_values([]) == "–"


# --------------------------------------------------------------------------- cost


def test_device_hours() -> None:
    gpu = {"num_workers": 2, "use_gpu": True, "resources_per_worker": {"GPU": 0.5}}
    assert device_hours(3600.0, {"world_size": 4, "device": "cuda:0"}, gpu) == 2.0
    assert device_hours(1800.0, {}, {"num_workers": 2, "use_gpu": True}) == 1.0
    assert device_hours(3600.0, {"device": "cpu"}, {"num_workers": 3, "use_gpu": False}) == 3.0
    cpus = {"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": 4}}
    assert device_hours(900.0, {}, cpus) == 1.0
    assert device_hours(None, {"world_size": 1}, cpus) is None


def test_device_hours_column_and_total(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, "cost", REF_GRID, _by_batch)
    paths = write_report(exp)
    trials = pq.read_table(paths["trials"]).to_pandas()
    assert list(trials["device_hours"]) == [pytest.approx(WALL_S / 3600)] * 4
    total = 4 * WALL_S / 3600
    assert f"- device time: {total:.3f} CPU-hours over 4 trials" in paths["report"].read_text()


def test_micro_batched_trials_are_recorded_and_said(tmp_path: Path) -> None:
    grid = {"variant": ["siglip"], "batch_size": [16, 64], "n_train_classes": [10],
            "seed": [0], "train.micro_batch_size": [16]}
    paths = write_report(write_experiment(tmp_path, "micro", grid, _by_batch))
    trials = pq.read_table(paths["trials"]).to_pandas().set_index("batch_size")
    assert list(trials["micro_batch_size"]) == [16, 16]
    assert list(trials["gradient_checkpointing"]) == [False, False]
    # Batch 16 is one micro-batch of 16 (the one-pass step); batch 64 is four.
    assert ("- micro-batched: 1 of 2 trials (`train.micro_batch_size` 16; "
            in paths["report"].read_text())
    paths = write_report(write_experiment(tmp_path, "plain", REF_GRID, _by_batch))
    assert pq.read_table(paths["trials"]).to_pandas()["micro_batch_size"].isna().all()
    assert "micro-batched" not in paths["report"].read_text()


# --------------------------------------------------------------------------- plots


def test_zero_shot_on_the_plots(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, "zs", SIG_GRID, _sig_top1)
    paths = write_report(exp)
    trials = pq.read_table(paths["trials"]).to_pandas()
    history = pq.read_table(paths["history"]).to_pandas()
    (table,) = T.axis_tables(trials, "batch_size")
    ax = axis_plot(table).axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "zero-shot (step 0)"]
    assert set(line.get_ydata()) == {ZERO_SHOT * 100}
    fig = learning_curves(history, trials)
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("zero-shot")]
    assert list(line.get_ydata()) == [pytest.approx(ZERO_SHOT * 100)] * 2

    fig = parallel_coordinates(trials)
    (lines,) = fig.axes[0].collections
    assert len(lines.get_segments()) == len(trials)  # one line per finished trial
    assert sorted(lines.get_array()) == pytest.approx(sorted(trials["val_top1"] * 100))
    report = paths["report"].read_text()
    for link in links(report):
        assert (paths["report"].parent / link).is_file(), link
    names = {Path(x).name for x in links(report)}
    assert {"parallel_coordinates.png", "learning_curves.png"} <= names
