"""A report that stays readable at 10,000 trials: the quickstart's 8 settings x 1,250 seeds,
each trial folder with the minimal files (status.json, a two-line history.jsonl), a few of
them errored or diverged; the all-trials table of a mid-sized sweep with many failures;
and learning curves of too many settings for a legend.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import analysis
from analysis import plots as P
from analysis import tables as T
from analysis.report import write_report
from tests.test_report_compare import ERROR, links, table_after, write_experiment

SEEDS = 1250
QUICKSTART = {  # search_spaces/quickstart.yaml's grid, seeds 0-1249
    "variant": ["siglip", "siglit"],
    "text_source": ["templates", "captions"],
    "batch_size": [32],
    "n_train_classes": [5, 20],
}
ERRORED = {17, 420, 900}  # seeds of errored trials (siglit-captions, k20)
DIVERGED = {5, 77}


def _top1(cfg: dict[str, Any]) -> float:
    base = 0.6 + 0.1 * (cfg["variant"] == "siglip") + 0.05 * (cfg["text_source"] == "templates")
    return round(base + 0.002 * (cfg["n_train_classes"] == 20) + (cfg["seed"] % 97) / 10_000, 6)


def _fate(cfg: dict[str, Any]) -> str:
    if cfg["trial_id"].startswith("siglit-captions-bs32-k20-") and cfg["seed"] in ERRORED:
        return "errored"
    if cfg["trial_id"].startswith("siglip-templates-bs32-k5-") and cfg["seed"] in DIVERGED:
        return "diverged"
    return "terminated"


def test_report_of_10000_trials_stays_small(tmp_path: Path) -> None:
    grid = {**QUICKSTART, "seed": list(range(SEEDS))}
    exp = write_experiment(tmp_path, "big", grid, _top1, fates=_fate)
    paths = write_report(exp)
    report = paths["report"].read_text()
    n = 8 * SEEDS
    assert pq.read_table(paths["trials"]).num_rows == n
    assert len(report.encode()) < 100_000
    assert f"- seeds (averaged over): 0-{SEEDS - 1} ({SEEDS})" in report.splitlines()
    assert f"{n} trials: {n - 5} terminated, 2 diverged, 3 errored" in report

    rows = table_after(report, "## All trials")[1:]
    assert len(rows) <= T.TRIAL_LIST_LIMIT
    listed = {r[0].strip("`"): r[1] for r in rows}
    failed = {f"siglit-captions-bs32-k20-s{s}" for s in ERRORED}
    failed |= {f"siglip-templates-bs32-k5-s{s}" for s in DIVERGED}
    assert failed <= set(listed)  # every errored and diverged trial, always
    # Then the 3 best and 3 worst of each of the 8 settings.
    assert sum(1 for s in listed.values() if s == "terminated") == 8 * 6
    best = "siglip-templates-bs32-k20-s96"  # seed % 97 == 96: the top of its setting
    assert listed[best] == "terminated"
    assert f"Showing {len(rows)} of {n} trials" in report and "`trials.parquet`" in report

    assert "## Which axis mattered" in report
    for link in links(report):
        assert (paths["report"].parent / link).read_bytes().startswith(b"\x89PNG"), link
    names = {Path(link).name for link in links(report)}
    assert {"parallel_coordinates.png", "learning_curves.png"} <= names
    assert any(name.startswith("val_top1_vs_n_train_classes") for name in names)
    # No line of the report lists thousands of anything.
    assert max(len(line) for line in report.splitlines()) < 2_000


def test_all_trials_table_with_many_failures(tmp_path: Path) -> None:
    grid = {
        "variant": ["siglip", "siglit"],
        "batch_size": [8, 64],
        "n_train_classes": [2, 10],
        "seed": list(range(30)),
    }

    def fate(cfg: dict[str, Any]) -> str:  # 60 errored trials, all with the same error
        return "errored" if cfg["variant"] == "siglit" and cfg["n_train_classes"] == 2 else (
            "terminated"
        )

    exp = write_experiment(tmp_path, "failing", grid, lambda c: 0.5 + c["seed"] / 100, fates=fate)
    report = write_report(exp)["report"].read_text()
    rows = table_after(report, "## All trials")[1:]
    statuses = [r[1] for r in rows]
    half = T.TRIAL_LIST_LIMIT // 2
    assert statuses[:half] == ["errored"] * half and "errored" not in statuses[half:]
    assert len(rows) <= T.TRIAL_LIST_LIMIT
    assert f"Showing {len(rows)} of 240 trials: the first {half} of 60 errored" in report
    # The errored section groups 60 identical errors in one line.
    section = report[report.index("## Errored trials") : report.index("## All trials")]
    (line,) = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert re.fullmatch(rf"- 60 trials: {re.escape(ERROR)} \(`[^`]+`, `[^`]+`, `[^`]+`, …\)", line)


def test_learning_curves_drop_a_legend_of_many_settings(tmp_path: Path) -> None:
    lrs = [round(1e-5 * (1 + i), 8) for i in range(40)]
    grid = {"variant": ["siglip"], "batch_size": [8, 64], "n_train_classes": [2], "train.lr": lrs}
    exp = write_experiment(tmp_path, "lrs", grid, lambda c: 0.5 + c["train"]["lr"] * 1000)
    trials, history = analysis.load(exp)
    fig = P.learning_curves(history, trials, "siglip")
    assert len(fig.axes) == 2  # a panel per batch size, 40 learning rates in each
    assert [len(ax.get_lines()) for ax in fig.axes] == [41, 41]  # + the zero-shot line
    assert fig.legends == [] and "up to 40 settings a panel" in fig.get_suptitle()
    few = P.learning_curves(history[history["train__lr"] <= lrs[3]], trials, "siglip")
    assert len(few.legends) == 1
