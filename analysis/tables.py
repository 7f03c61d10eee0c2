"""Aggregate trials over seeds and lay the results out as markdown tables.

Everything here works on the pandas DataFrame of `trials.parquet`, so `report.md` and the
notebook draw the same tables from the same data.

Conventions (also stated at the top of every report):

- a cell is `mean ± std (n)` over the seeds of one setting, in percent; std has ddof=1
  and is "–" when n = 1; a cell with no finished trial is "–";
- only `terminated` trials enter a cell: a running trial's metrics are not final, and
  a diverged or errored one is listed on its own instead of dragging the mean;
- the best cell of each column (by the mean as printed) is bold; in the comparison
  tables (per axis, batch size × classes) a † marks a cell that Welch's t-test over seeds
  (two-sided, p >= 0.05) cannot tell apart from the best, and `lead_line` says whether
  the best cell's lead over the runner-up exceeds the seed-to-seed spread;
- the course report's figures stand beside ours only for the same study: its model on
  real data (`reference.same_setting`) and its axes (`reference.lookup`);
- per-axis tables: rows are the axis, columns the variants (with the course report's
  figure beside a variant where our table reproduces one of its studies); the other
  axes are held fixed, one table per combination of their values; axes with a single
  value in the sweep are stated once, above all tables.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis import reference
from analysis.collect import NAMED_AXES, is_extra_axis_column
from analysis.stats import Welch, welch
from sweeper import search

INCLUDED_STATUSES = ("terminated",)
METRIC = "val_top1"
_SCALE = 100.0  # accuracies are stored as fractions, shown in percent
ALPHA = 0.05  # Welch's t-test: a lead with p below this exceeds the seed-to-seed spread
TIE_MARK = "†"

AXIS_LABELS = {k: a.label for k, a in search.NAMED_AXES.items()}


@dataclass(frozen=True)
class Stats:
    """Mean and sample std (ddof=1, None when n < 2) of n values, as fractions."""

    mean: float | None
    std: float | None
    n: int


EMPTY = Stats(None, None, 0)


@dataclass
class Column:
    """One value column of a table. Reference columns hold single published figures."""

    label: str
    cells: list[Stats]
    reference: bool = False
    variant: str | None = None
    baseline: list[Stats] = field(default_factory=list)  # zero-shot (step 0) per cell


@dataclass
class Table:
    """A table of `Stats` cells: `row_labels[i]` are the leading label cells of row i."""

    key: str
    heading: str | None
    row_header: list[str]
    row_labels: list[list[str]]
    columns: list[Column]
    axis: str | None = None
    row_values: list[Any] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    compare: bool = False  # mark cells not told apart from the best (Welch over seeds)


# --------------------------------------------------------------------------- values


def py(v: Any) -> Any:
    """A plain Python value: numpy scalars unwrapped, NaN/NA as None."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def fmt_value(v: Any) -> str:
    """An axis value as a table label: 64.0 -> 64, 1e-05 -> 1e-05, None -> –."""
    v = py(v)
    if v is None:
        return "–"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:g}"
    return str(v)


def axis_label(column: str) -> str:
    """Display name of an axis column (`train__lr` -> `train.lr`)."""
    return AXIS_LABELS.get(column, column.replace("__", "."))


def stats(values: Sequence[Any] | pd.Series) -> Stats:
    """Mean ± sample std over the non-null values."""
    vals = [float(v) for v in (py(x) for x in values) if v is not None]
    vals = [v for v in vals if math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return EMPTY
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return Stats(mean, std, n)


def fmt_stats(s: Stats) -> str:
    """`89.82 ± 1.23 (3)` in percent; `89.82 ± – (1)`; `–` without data."""
    if s.n == 0 or s.mean is None:
        return "–"
    std = f"{s.std * _SCALE:.2f}" if s.std is not None else "–"
    return f"{s.mean * _SCALE:.2f} ± {std} ({s.n})"


def fmt_reference(s: Stats) -> str:
    """A published figure: the percentage alone (it is one run), or `–`."""
    return "–" if s.mean is None else f"{s.mean * _SCALE:.2f}"


def _shown(s: Stats) -> float | None:
    # Best cells are judged on the printed figure, so the bold mark never disagrees
    # with what a reader can see.
    return None if s.mean is None else round(s.mean * _SCALE, 2)


def best_rows(column: Column) -> set[int]:
    """Rows holding the highest mean of the column (all of them on a tie)."""
    shown = [_shown(c) for c in column.cells]
    vals = [v for v in shown if v is not None]
    if not vals:
        return set()
    top = max(vals)
    return {i for i, v in enumerate(shown) if v == top}


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class Lead:
    """The best cell of one column against the others, by Welch's t-test over seeds.

    `ties`: rows whose cells the test cannot tell apart from the best (p >= ALPHA);
    `runner_up` and `test`: the next-best row and the test of the best against it (None
    when either has fewer than two seeds, or there is no other row)."""

    best: frozenset[int]
    runner_up: int | None
    test: Welch | None
    ties: frozenset[int]


def lead(column: Column) -> Lead | None:
    """The Lead of a column of ours (None for a reference column or one without data)."""
    top = best_rows(column)
    if column.reference or not top:
        return None
    best = column.cells[min(top)]
    ties, tests = set(), {}
    for i, c in enumerate(column.cells):
        if i in top or c.mean is None:
            continue
        if best.n >= 2 and c.n >= 2:
            tests[i] = welch(best.mean, best.std or 0.0, best.n, c.mean, c.std or 0.0, c.n)
            if tests[i] is not None and tests[i].p >= ALPHA:
                ties.add(i)
    others = [i for i, c in enumerate(column.cells) if i not in top and _shown(c) is not None]
    runner_up = max(others, key=lambda i: (_shown(column.cells[i]), -i)) if others else None
    return Lead(frozenset(top), runner_up, tests.get(runner_up), frozenset(ties))


def _fmt_p(p: float) -> str:
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


def lead_line(table: Table) -> str | None:
    """One line per comparison table: does each column's best cell lead the runner-up by
    more than the seed-to-seed spread? None when no column has two seeds to test."""
    parts = []
    for col in table.columns:
        ld = lead(col)
        if ld is None or ld.runner_up is None or ld.test is None:
            continue
        best, other = min(ld.best), ld.runner_up
        gap = (col.cells[best].mean - col.cells[other].mean) * _SCALE
        verdict = "beyond the seed spread" if ld.test.p < ALPHA else "within the seed spread"
        parts.append(
            f"{col.label}: {' / '.join(table.row_labels[best])} leads "
            f"{' / '.join(table.row_labels[other])} by {gap:.2f} points, "
            f"{_fmt_p(ld.test.p)}, {verdict}"
        )
    if not parts:
        return None
    return "Best vs runner-up (Welch's t-test over seeds, two-sided, p < 0.05): " + "; ".join(
        parts
    ) + "."


def render(table: Table) -> str:
    """The table as GitHub markdown (heading, optional note, table), best cells bold; in
    a comparison table, cells not told apart from the best marked †."""
    header = [*table.row_header, *(c.label for c in table.columns)]
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    best = [best_rows(c) for c in table.columns]
    ties = [
        (ld.ties if table.compare and (ld := lead(c)) is not None else frozenset())
        for c in table.columns
    ]
    for i, labels in enumerate(table.row_labels):
        cells = [_escape(x) for x in labels]
        for col, top, tied in zip(table.columns, best, ties, strict=True):
            text = (fmt_reference if col.reference else fmt_stats)(col.cells[i])
            text = f"**{text}**" if i in top else text
            cells.append(f"{text} {TIE_MARK}" if i in tied else text)
        lines.append("| " + " | ".join(cells) + " |")
    out = []
    if table.heading:
        out += [f"### {table.heading}", ""]
    if table.note:
        out += [table.note, ""]
    return "\n".join([*out, *lines])


# --------------------------------------------------------------------------- axes


def axis_columns(trials: pd.DataFrame) -> list[str]:
    """The grid-axis columns of a trials frame: named axes, then dotted extras."""
    named = [a for a in NAMED_AXES if a in trials.columns]
    return named + [c for c in trials.columns if is_extra_axis_column(c)]


def sampled_columns(trials: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The axis columns a sampling search drew from a range, {column: {kind: args}}
    (`analysis.dataset.to_pandas` reads them from the Parquet file's metadata)."""
    return dict(trials.attrs.get("sampled_axes") or {})


def group_axes(trials: pd.DataFrame) -> list[str]:
    """Axes that define a setting; seeds are the repeats averaged over, and an axis drawn
    from a range is a value of each trial, not a setting trials share."""
    sampled = sampled_columns(trials)
    return [a for a in axis_columns(trials) if a != "seed" and a not in sampled]


def varying(trials: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns with more than one value in the sweep (pending trials included)."""
    return [c for c in columns if len(unique(trials[c])) > 1]


def unique(series: pd.Series) -> list[Any]:
    """Distinct values: numbers sorted ascending, anything else in order of appearance."""
    seen: list[Any] = []
    for v in (py(x) for x in series):
        if v not in seen:
            seen.append(v)
    present = [v for v in seen if v is not None]
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        present.sort()
    return present + ([None] if None in seen else [])


def mask(frame: pd.DataFrame, values: dict[str, Any]) -> pd.Series:
    """Rows of `frame` whose columns equal `values` (None matches null)."""
    m = pd.Series(True, index=frame.index)
    for col, v in values.items():
        m &= frame[col].isna() if v is None else frame[col].map(py) == v
    return m


def combos(trials: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Every combination of `columns`' values that some trial has, in sorted order."""
    if not columns:
        return [{}]
    # Ranks from `unique` give each column its display order (numbers ascending, names
    # as the grid lists them); only combinations present in the data are visited.
    ranks = [{v: i for i, v in enumerate(unique(trials[c]))} for c in columns]
    present = {tuple(py(v) for v in row) for row in trials[list(columns)].itertuples(index=False)}
    ordered = sorted(present, key=lambda t: [r[v] for r, v in zip(ranks, t, strict=True)])
    return [dict(zip(columns, values, strict=True)) for values in ordered]


def fixed_values(trials: pd.DataFrame, columns: Sequence[str]) -> dict[str, Any]:
    """The columns that hold a single value in `trials`, with that value."""
    out = {}
    for c in columns:
        vals = unique(trials[c])
        if len(vals) == 1:
            out[c] = vals[0]
    return out


def describe(values: dict[str, Any]) -> str:
    """`train classes = 10, text source = templates`."""
    return ", ".join(f"{axis_label(k)} = {fmt_value(v)}" for k, v in values.items())


def slug(values: dict[str, Any]) -> str:
    """A file-name-safe key for a combination of axis values."""
    text = "_".join(f"{k}-{fmt_value(v)}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)[:100]


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials whose metrics are final and enter the tables."""
    return trials[trials["status"].isin(INCLUDED_STATUSES)]


def variant_kind(trials: pd.DataFrame, variant: Any) -> str | None:
    """Which reference model (`siglip`, `siglit`) a variant reproduces, if any."""
    rows = trials[mask(trials, {"variant": variant})]
    if any(py(v) is not None for v in rows.get("peft_method", [])):
        return None  # LoRA reproduces neither: both references train every weight they train
    loss = next((py(v) for v in rows.get("loss", []) if py(v) is not None), None)
    frozen = next((py(v) for v in rows.get("freeze_vision", []) if py(v) is not None), None)
    return reference.model_kind(loss, frozen)


def reference_applies(rows: pd.DataFrame) -> bool:
    """The trials run the course report's model on real data (`reference.same_setting`);
    a frame without the columns (an older trials.parquet) does not say so."""
    if "pretrained" not in rows or "synthetic_data" not in rows:
        return False
    return reference.same_setting(
        (py(v) for v in rows["pretrained"]), (py(v) for v in rows["synthetic_data"])
    )


# --------------------------------------------------------------------------- tables


def axis_tables(trials: pd.DataFrame, axis: str, metric: str = METRIC) -> list[Table]:
    """Rows = `axis`, one column per variant (+ its reference figure where a study of the
    course report matches), one table per combination of the other varying axes."""
    axes = group_axes(trials)
    if axis not in axes or axis not in varying(trials, axes):
        return []
    others = [a for a in axes if a not in (axis, "variant")]
    done = finished(trials)
    variants = unique(trials["variant"])
    tables = []
    for combo in combos(trials, varying(trials, others)):
        sub = trials[mask(trials, combo)]
        sub_done = done[mask(done, combo)]
        rows = unique(sub[axis])
        fixed = fixed_values(sub, others)
        columns = []
        for v in variants:
            of_v = sub_done[mask(sub_done, {"variant": v})]
            at = [of_v[mask(of_v, {axis: r})] for r in rows]
            columns.append(
                Column(
                    fmt_value(v),
                    [stats(d[metric]) for d in at],
                    variant=v,
                    baseline=[stats(d["zero_shot_top1"]) for d in at],
                )
            )
            study = reference.lookup(variant_kind(trials, v), axis, fixed)
            same = study is not None and reference_applies(sub[mask(sub, {"variant": v})])
            if metric == METRIC and same:
                figs = [reference.figure(study, r) for r in rows]
                if any(f is not None for f in figs):
                    ref_cells = [
                        Stats(f / _SCALE, None, 1) if f is not None else EMPTY for f in figs
                    ]
                    columns.append(
                        Column(f"{fmt_value(v)} (reference)", ref_cells, reference=True, variant=v)
                    )
        tables.append(
            Table(
                key=f"{metric}_vs_{axis}" + (f"__{slug(combo)}" if combo else ""),
                heading=describe(combo) or None,
                row_header=[axis_label(axis)],
                row_labels=[[fmt_value(r)] for r in rows],
                columns=columns,
                axis=axis,
                row_values=rows,
                fixed=fixed,
                compare=True,
            )
        )
    return tables


def grid_tables(trials: pd.DataFrame, metric: str = METRIC) -> list[Table]:
    """Batch size × train classes, one table per variant (and per value of any other
    varying axis): rows are batch sizes, columns the numbers of training classes."""
    axes = group_axes(trials)
    if not {"batch_size", "n_train_classes"} <= set(varying(trials, axes)):
        return []
    others = varying(trials, [a for a in axes if a not in ("batch_size", "n_train_classes")])
    done = finished(trials)
    tables = []
    for combo in combos(trials, others):
        sub = trials[mask(trials, combo)]
        sub_done = done[mask(done, combo)]
        sizes, ks = unique(sub["batch_size"]), unique(sub["n_train_classes"])
        columns = [
            Column(
                f"k={fmt_value(k)}",
                [
                    stats(sub_done[mask(sub_done, {"batch_size": b, "n_train_classes": k})][metric])
                    for b in sizes
                ],
            )
            for k in ks
        ]
        tables.append(
            Table(
                key=f"{metric}_grid" + (f"__{slug(combo)}" if combo else ""),
                heading=describe(combo) or None,
                row_header=["batch size"],
                row_labels=[[fmt_value(b)] for b in sizes],
                columns=columns,
                row_values=sizes,
                compare=True,
            )
        )
    return tables


def group_table(
    trials: pd.DataFrame,
    columns: Sequence[tuple[str, str | Callable[[pd.DataFrame], pd.Series]]],
    key: str,
) -> Table:
    """One row per setting (the varying non-seed axes), one column per metric.

    A metric is a column name or a function of the finished trials (e.g. a difference).
    """
    keys = varying(trials, group_axes(trials))
    done = finished(trials)
    row_labels, cols = [], [Column(label, []) for label, _ in columns]
    for combo in combos(trials, keys):
        row_labels.append([fmt_value(v) for v in combo.values()] or ["all trials"])
        sub = done[mask(done, combo)]
        for col, (_, metric) in zip(cols, columns, strict=True):
            values = metric(sub) if callable(metric) else sub[metric]
            col.cells.append(stats(values))
    return Table(
        key=key,
        heading=None,
        row_header=[axis_label(k) for k in keys] or ["setting"],
        row_labels=row_labels,
        columns=cols,
    )


def zero_shot_table(trials: pd.DataFrame) -> Table:
    """Zero-shot baseline (step 0) against the final and best val top-1, per setting."""
    return group_table(
        trials,
        [
            ("zero-shot top-1", "zero_shot_top1"),
            ("final top-1", "val_top1"),
            ("gain (points)", lambda d: d["val_top1"] - d["zero_shot_top1"]),
            ("best top-1", "best_val_top1"),
        ],
        key="zero_shot_vs_final",
    )


def _has(done: pd.DataFrame, columns: list[str]) -> bool:
    """Whether some finished trial has a value in one of `columns`."""
    return all(c in done for c in columns) and not done[columns].isna().all().all()


def seen_unseen_table(trials: pd.DataFrame) -> Table | None:
    """Final val top-1 on the training classes, the others, and all, and the same as mean
    per-class recall (each class weighing the same) when recorded; None without data."""
    done = finished(trials)
    if not _has(done, ["val_top1_seen", "val_top1_unseen"]):
        return None
    columns: list[tuple[str, Any]] = [
        ("seen classes", "val_top1_seen"),
        ("unseen classes", "val_top1_unseen"),
        ("all classes", "val_top1"),
    ]
    recall = "val_mean_per_class_recall"
    if _has(done, [recall]):
        columns += [("seen, per class", f"{recall}_seen"),
                    ("unseen, per class", f"{recall}_unseen"), ("all, per class", recall)]
    return group_table(trials, columns, key="seen_vs_unseen")


RETRIEVAL = [(f"{label} R@{k}", f"val_{d}_r{k}")
             for d, label in (("i2t", "image→text"), ("t2i", "text→image")) for k in (1, 5, 10)]


def retrieval_table(trials: pd.DataFrame) -> Table | None:
    """Final image-text retrieval recall@1/5/10 both ways, per setting; None when no
    trial evaluated retrieval (no captioned val images)."""
    if not _has(finished(trials), [c for _, c in RETRIEVAL]):
        return None
    return group_table(trials, RETRIEVAL, key="retrieval")


def _pct(v: Any) -> str:
    v = py(v)
    return "–" if v is None else f"{float(v) * _SCALE:.2f}"


TRIAL_LIST_LIMIT = 100  # rows of the all-trials table; a larger sweep shows a selection
_EXTREMES = 3  # best and worst finished trials shown per setting of a large sweep
_FAILED = ("errored", "diverged")


def trial_selection(trials: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The trials the all-trials table lists, and a line on what it leaves out (None when
    it lists them all, i.e. up to TRIAL_LIST_LIMIT trials).

    Beyond the limit: errored and diverged trials first (up to half the limit), then the
    best and worst few finished trials by final val top-1 of each setting, or of each
    variant when the settings are too many for the limit.
    """
    n = len(trials)
    if n <= TRIAL_LIST_LIMIT:
        return trials, None
    failed = trials[trials["status"].isin(_FAILED)]
    shown_failed = failed.iloc[: TRIAL_LIST_LIMIT // 2]
    budget = TRIAL_LIST_LIMIT - len(shown_failed)
    done = finished(trials)
    done = done[done[METRIC].notna()]
    keys, unit = varying(trials, group_axes(trials)), "setting"
    groups = combos(done, keys) if not done.empty else []
    if 2 * len(groups) > budget:
        keys, unit = (["variant"] if "variant" in keys else []), "variant"
        groups = combos(done, keys) if not done.empty else []
    per = max(1, min(_EXTREMES, budget // (2 * max(len(groups), 1))))
    picks = []
    for combo in groups:
        ranked = done[mask(done, combo)].sort_values(METRIC, ascending=False, kind="stable")
        picks += [ranked.head(per), ranked.iloc[max(per, len(ranked) - per) :]]
    best_worst = pd.concat(picks).iloc[:budget] if picks else done.iloc[:0]
    shown = pd.concat([shown_failed, best_worst])
    if len(failed) > len(shown_failed):
        lead_in = (
            f"the first {len(shown_failed)} of {len(failed)} errored and diverged trials, then "
        )
    elif len(failed):
        lead_in = "every errored and diverged trial, then "
    else:
        lead_in = ""
    note = (
        f"Showing {len(shown)} of {n} trials: {lead_in}the {per} best and {per} worst finished "
        f"trials (final val top-1) of each {unit}. Every trial, with every column, is in "
        "`trials.parquet`."
    )
    return shown, note


def trial_list(trials: pd.DataFrame) -> str:
    """The trials on one line each: status, steps done (/ planned), their own accuracies,
    and the share of the training loop spent waiting for data."""
    lines = [
        "| trial | status | steps | zero-shot top-1 | final top-1 | best top-1 | data wait % |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in trials.iterrows():
        steps = fmt_value(r["steps"])
        if py(r.get("total_steps")) is not None:
            steps += f" / {fmt_value(r['total_steps'])}"
        lines.append(
            f"| `{r['trial_id']}` | {r['status']} | {steps} | "
            f"{_pct(r['zero_shot_top1'])} | {_pct(r['val_top1'])} | {_pct(r['best_val_top1'])} | "
            f"{_pct(r.get('data_wait_frac'))} |"
        )
    return "\n".join(lines)


def fmt_values(values: Sequence[Any], limit: int = 12) -> str:
    """Distinct values on one line: runs of three or more integers as ranges, the count
    when there is more than one value, at most `limit` items (`0-1249 (1250)`,
    `0, 2, 5-9 (7)`, `a, b, c, …, z (40)`)."""
    vals = unique(pd.Series(list(values), dtype=object))
    # A null in an int64 column turns it float in pandas: 3.0 is the seed 3.
    vals = [int(v) if isinstance(v, float) and v.is_integer() else v for v in vals if v is not None]
    if not vals:
        return "–"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        items, start = [], 0
        for i in range(1, len(vals) + 1):
            if i == len(vals) or vals[i] != vals[i - 1] + 1:
                run = vals[start:i]
                items += [f"{run[0]}-{run[-1]}"] if len(run) >= 3 else [str(v) for v in run]
                start = i
    else:
        items = [fmt_value(v) for v in vals]
    if len(items) > limit:
        items = [*items[: limit - 1], "…", items[-1]]
    text = ", ".join(items)
    return text if len(vals) == 1 else f"{text} ({len(vals)})"


def status_counts(trials: pd.DataFrame) -> str:
    """`12 trials: 8 terminated, 2 running, 1 errored, 1 pending`."""
    order = ["terminated", "diverged", "errored", "running", "pending"]
    counts = trials["status"].value_counts()
    names = order + sorted(str(s) for s in counts.index if s not in order)
    parts = [f"{int(counts[s])} {s}" for s in names if s in counts.index]
    n = len(trials)
    return f"{n} trial{'s' if n != 1 else ''}: " + (", ".join(parts) if parts else "none")
