"""Turn an experiment directory into Parquet files, `report.md` and plots.

    python -m analysis.report EXPERIMENT_DIR [--out DIR]

Works on a finished, interrupted or still-running sweep: trials that have not started are
`pending`, interrupted ones `running`, and only finished (`terminated`) trials enter the
aggregated cells. `EXPERIMENT_DIR` may also be a `s3://`, `gs://` or `file://` URI, read
through `pyarrow.fs`; the outputs then go into the bucket too (written to a local copy
first, then uploaded whole), or to the local `--out` folder. Prints one `key: path` line
per output and exits 0; exits 2 when the location is not an experiment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from analysis import reference
from analysis import tables as T
from analysis.collect import Experiment, ExperimentNotFound, read_experiment
from analysis.dataset import output_dir, output_lines, publish, write_tables
from analysis.importance import importance, render_importance
from analysis.plots import write_plots
from sweeper.sink import atomic_write_bytes
from sweeper.spec import SpecError

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"

_CONVENTIONS = (
    "Cells are `mean ± std (n)` of the final val top-1 (%) over seeds, from `terminated` "
    'trials only; std has ddof=1 ("–" when n = 1); "–" alone means no finished trial. '
    "**Bold** marks the best cell of each column. Each table holds the axes it does not "
    "show fixed at the values in its heading."
)
_TIE_LEGEND = (
    f"{T.TIE_MARK} marks a cell that Welch's t-test over seeds (two-sided, p ≥ 0.05) cannot "
    "tell apart from the best cell of its column; cells with fewer than two seeds are not "
    "tested, and no correction is made for testing several cells."
)
_REFERENCE_NOTE = (
    f"Columns marked *(reference)* are the single-run figures of {reference.SOURCE} "
    "(`analysis/reference.py`), shown where our table reproduces "
    f"one of its studies: the same model (`{reference.MODEL}` or a local SigLIP of its "
    "architecture), real data, and the study's axes. A variant is matched by its loss and "
    "frozen vision tower (sigmoid = SigLIP, sigmoid + frozen vision = SigLiT), not by its name."
)
_FAILURE_LINES = 50  # more failures of one kind than this: grouped by their error

_AXIS_SECTIONS = {
    "batch_size": "Val top-1 by batch size",
    "n_train_classes": "Val top-1 by number of training classes",
    "text_source": "Val top-1 by text source",
}


def _image(path: Path, out: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(out).as_posix()})"


def _header(exp: Experiment, trials: pd.DataFrame) -> list[str]:
    lines = [f"# Sweep report: {exp.name or Path(exp.store.location).name}", ""]
    lines.append(f"- experiment: `{exp.store.location}`")
    if exp.fingerprint or exp.created_at:
        lines.append(
            f"- spec fingerprint: `{exp.fingerprint or '?'}`, created {exp.created_at or '?'}"
        )
    lines.append(f"- {T.status_counts(trials)}")
    axes = T.group_axes(trials)
    fixed = T.fixed_values(trials, [a for a in axes if a not in T.varying(trials, axes)])
    if fixed:
        lines.append(f"- the same for every trial: {T.describe(fixed)}")
    if "seed" in trials.columns:
        lines.append(f"- seeds (averaged over): {T.fmt_values(trials['seed'])}")
    lines.append(f"- {_device_time(trials)}")
    micro = _micro_batched(trials)
    if micro:
        lines.append(f"- {micro}")
    lines += [f"- {line}" for line in _adapters(trials)]
    return [*lines, "", _CONVENTIONS, ""]


def _micro_batched(trials: pd.DataFrame) -> str | None:
    """A line on the trials whose per-worker batch was split into micro-batches (one
    micro-batch is the one-pass step), or None."""
    if "micro_batch_size" not in trials:
        return None
    m = trials["micro_batch_size"].dropna()
    per_worker = trials.loc[m.index, "batch_size"] // trials.loc[m.index, "num_workers"].fillna(1)
    split = m[m < per_worker]
    if split.empty:
        return None
    return (f"micro-batched: {len(split)} of {len(trials)} trials (`train.micro_batch_size` "
            f"{T.fmt_values(split)}; the same loss over the global batch and the same "
            "updates as one pass, one forward more)")


def _adapters(trials: pd.DataFrame) -> list[str]:
    """One line per variant trained with LoRA adapters: rank, alpha, targets, towers and
    the share of the parameters trained; and the share full fine-tuning trains."""
    if "peft_method" not in trials:
        return []
    lines = []
    cols = ["variant", "lora_r", "lora_alpha", "lora_targets", "lora_towers"]
    lora = trials[trials["peft_method"].notna()]
    for key, g in lora.groupby(cols, dropna=False, sort=True):
        variant, r, alpha, targets, towers = (T.py(v) for v in key)
        share = (g["trainable_params"] / g["total_params"]).dropna()
        trained = f"; {100 * share.iloc[0]:.2g}% of the parameters trained" if len(share) else ""
        lines.append(f"LoRA (Hugging Face peft) in variant `{variant}`: rank "
                     f"{T.fmt_value(r)}, alpha {T.fmt_value(alpha)}, targets `{targets}` "
                     f"on the {str(towers).replace(',', ' and ')} tower(s){trained}")
    return lines


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.2f}" if h >= 1 else f"{h:.3f}"


def _device_time(trials: pd.DataFrame) -> str:
    """`device time: 3.20 CPU-hours over 8 trials (...)`, from `device_hours`."""
    hours = trials["device_hours"].dropna() if "device_hours" in trials else pd.Series([])
    if hours.empty:
        return "device time: – (no trial has a wall time yet)"
    gpu = {T.py(v) for v in trials.loc[hours.index, "use_gpu"]} if "use_gpu" in trials else set()
    unit = {frozenset({True}): "GPU-hours", frozenset({False}): "CPU-hours"}.get(
        frozenset(gpu), "device-hours"
    )
    return (
        f"device time: {_hours(float(hours.sum()))} {unit} over {len(hours)} trials "
        "(workers × devices per worker × wall time; per trial: `device_hours` in "
        "`trials.parquet`)"
    )


def _section(
    title: str,
    tables: list[T.Table],
    plots: dict[str, Path],
    out: Path,
    note: str = "",
    leads: dict[str, str | None] | None = None,
) -> list[str]:
    lines = [f"## {title}", ""]
    if note:
        lines += [note, ""]
    for table in tables:
        lines += [T.render(table), ""]
        if (lead := (leads or {}).get(table.key)) is not None:
            lines += [lead, ""]
        if table.key in plots:
            lines += [_image(plots[table.key], out, table.key), ""]
    return lines


def _failures(trials: pd.DataFrame) -> list[str]:
    lines: list[str] = []
    for status, title in (("errored", "Errored trials"), ("diverged", "Diverged trials")):
        rows = trials[trials["status"] == status]
        if rows.empty:
            continue
        lines += [f"## {title}", ""]
        errors = [T.py(e) or "(no error recorded)" for e in rows["error"]]
        ids = list(rows["trial_id"])
        if len(rows) <= _FAILURE_LINES:
            lines += [f"- `{tid}`: {err}" for tid, err in zip(ids, errors, strict=True)]
        else:  # one line per distinct error, most frequent first
            by_error: dict[str, list[str]] = {}
            for tid, err in zip(ids, errors, strict=True):
                by_error.setdefault(err, []).append(tid)
            ranked = sorted(by_error.items(), key=lambda item: -len(item[1]))
            for err, tids in ranked[:_FAILURE_LINES]:
                some = ", ".join(f"`{t}`" for t in tids[:3]) + (", …" if len(tids) > 3 else "")
                lines.append(f"- {len(tids)} trials: {err} ({some})")
            if len(ranked) > _FAILURE_LINES:
                lines.append(f"- {len(ranked) - _FAILURE_LINES} other errors: see `trials.parquet`")
        lines.append("")
    return lines


def _importance(trials: pd.DataFrame, plots: dict[str, Path], out: Path) -> list[str]:
    imp = importance(trials)
    if imp is None:
        return []
    lines = ["## Which axis mattered", "", render_importance(imp), ""]
    if "parallel_coordinates" in plots:
        lines += [
            "One line per terminated trial through its value of every varying axis (evenly "
            "spaced levels), ending at its final val top-1 and coloured by it; the red mark "
            "is the mean zero-shot (step-0) accuracy.",
            "",
            _image(plots["parallel_coordinates"], out, "parallel coordinates"),
            "",
        ]
    return lines


def build_markdown(
    exp: Experiment,
    trials: pd.DataFrame,
    history: pd.DataFrame,
    out: Path,
    plots_dir: Path,
) -> tuple[str, dict[str, Path]]:
    """The report's markdown, and the plots it drew into `plots_dir` (linked relative to
    `out`, where report.md goes)."""
    axis_tables = {a: T.axis_tables(trials, a) for a in T.group_axes(trials) if a != "variant"}
    plots = write_plots(plots_dir, trials, history, [t for ts in axis_tables.values() for t in ts])

    lines = _header(exp, trials)
    grid = T.grid_tables(trials)
    compared = [*grid, *(t for ts in axis_tables.values() for t in ts)]
    leads = {t.key: T.lead_line(t) for t in compared}
    if any(lead is not None for lead in leads.values()):
        lines += [_TIE_LEGEND, ""]
    if any(c.reference for ts in axis_tables.values() for t in ts for c in t.columns):
        lines += [_REFERENCE_NOTE, ""]
    else:
        lines += [
            reference.why_not(
                (T.py(v) for v in trials.get("pretrained", [])),
                (T.py(v) for v in trials.get("synthetic_data", [])),
            ),
            "",
        ]
    lines += _importance(trials, plots, out)
    if grid:
        lines += _section(
            "Batch size × train classes",
            grid,
            plots,
            out,
            note="Val top-1 (%); rows: batch size, columns: number of training classes (k).",
            leads=leads,
        )
    for axis, tables in axis_tables.items():
        if tables:
            title = _AXIS_SECTIONS.get(axis, f"Val top-1 by {T.axis_label(axis)}")
            lines += _section(title, tables, plots, out, leads=leads)
    lines += _section(
        "Zero-shot baseline vs final",
        [T.zero_shot_table(trials)],
        plots,
        out,
        note="Zero-shot is the step-0 evaluation before any training; gain is final minus "
        "zero-shot, per trial, in points.",
    )
    seen = T.seen_unseen_table(trials)
    if seen is not None:
        lines += _section(
            "Seen vs unseen classes",
            [seen],
            plots,
            out,
            note="Final val top-1 (%) on the training classes, on the others, and on all."
            + (" Per class: the mean of the classes' top-1 (mean per-class recall), each "
               "class weighing the same." if any("per class" in c.label for c in seen.columns)
               else ""),
        )
    retrieval = T.retrieval_table(trials)
    if retrieval is not None:
        lines += _section(
            "Image-text retrieval",
            [retrieval],
            plots,
            out,
            note="Final recall@k (%) on the val images that have captions: image→text, the "
            "images with one of their captions among their k nearest captions; text→image, "
            "the captions whose image is among their k nearest images.",
        )
    curves = [k for k in plots if k.startswith("learning_curves")]
    if curves:
        lines += [
            "## Learning curves",
            "",
            "Val top-1 against step, mean over seeds (running trials included).",
            "",
        ]
        lines += [line for k in curves for line in (_image(plots[k], out, k), "")]
    lines += _failures(trials)
    shown, left_out = T.trial_selection(trials)
    lines += ["## All trials", ""]
    if left_out:
        lines += [left_out, ""]
    lines += [T.trial_list(shown), ""]
    return "\n".join(lines), plots


def write_report(experiment_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write trials/history/per_class Parquet, `report.md` and `plots/` for an experiment.

    Outputs go into the experiment directory (for a bucket: its local copy, then uploaded,
    `analysis.dataset.publish`), or `out_dir` when given. Returns their paths keyed
    `trials`, `history`, `per_class` (only when some trial saved per-class accuracy),
    `report` and `plots` (the folder). Raises ExperimentNotFound when the location holds
    no sweep.json and no trials/.
    """
    exp = read_experiment(experiment_dir)
    out = output_dir(experiment_dir, out_dir)
    paths, tables = write_tables(exp, out)
    trials = tables["trials"].to_pandas()
    history = tables["history"].to_pandas()
    plots_dir = out / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    text, _ = build_markdown(exp, trials, history, out, plots_dir)
    report = out / REPORT_FILE
    atomic_write_bytes(report, text.encode("utf-8"))
    return publish(experiment_dir, out_dir, {**paths, "report": report, "plots": plots_dir})


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: write the report, print `key: path` per output, return the exit
    status (0 done, 1 a write failed (disk full), 2 not an experiment or no such storage)."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Build Parquet tables, report.md and plots for a sweep's experiment "
        "directory (finished, interrupted or still running).",
    )
    parser.add_argument("experiment", help="experiment directory, or an s3:// / gs:// URI")
    parser.add_argument(
        "--out", default=None, help="write outputs here (default: the experiment directory)"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        paths = write_report(args.experiment, out_dir=args.out)
    except (ExperimentNotFound, SpecError, pa.ArrowInvalid) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, quota: every earlier output is still whole
        where = f" {e.filename}" if e.filename else ""
        print(f"error: could not write the report{where}: {e.strerror or e}; the previous "
              "outputs are unchanged", file=sys.stderr)
        return 1
    for line in output_lines(args.experiment, args.out, paths):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
