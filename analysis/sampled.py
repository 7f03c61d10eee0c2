"""The report's view of a sampling search (`tune.search: random` or `optuna`): val top-1
against each axis drawn from a range (log x for log-uniform axes), the best-so-far curve
over the trials in the order they finished, and the best trials with their sampled values.

Works on the trials frame of `analysis.dataset.to_pandas`, whose `attrs["sampled_axes"]`
names the sampled columns and their distributions; a grid sweep has none, and then nothing
here draws or writes anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.plots import _new_figure, plot_name, save
from analysis.tables import (
    METRIC,
    axis_label,
    finished,
    fmt_value,
    group_axes,
    py,
    sampled_columns,
    unique,
    varying,
)
from sweeper.search import Distribution

BEST_LISTED = 10


def _done(trials: pd.DataFrame) -> pd.DataFrame:
    done = finished(trials)
    return done[done[METRIC].notna()]


def metric_vs_sampled(trials: pd.DataFrame) -> Any:
    """Final val top-1 of each terminated trial against each sampled axis, one panel per
    axis (log x for a log-uniform one), coloured by the varying grid or choice axis with
    the fewest levels (the variant, typically); trials stopped early are hollow. None when
    no axis was sampled or no trial has finished."""
    sampled = {c: d for c, d in sampled_columns(trials).items() if c in trials.columns}
    done = _done(trials)
    if not sampled or done.empty:
        return None
    groups = varying(trials, group_axes(trials))
    by = min(groups, key=lambda a: len(unique(trials[a]))) if groups else None
    levels = unique(trials[by]) if by else [None]
    fig = _new_figure(4.2 * len(sampled) + 0.6, 3.8)
    panels = fig.subplots(1, len(sampled), sharey=True, squeeze=False)[0]
    early = done["stopped_early"].fillna(False).astype(bool) if "stopped_early" in done \
        else pd.Series(False, index=done.index)
    for ax, (col, doc) in zip(panels, sampled.items(), strict=True):
        dist = Distribution.parse(doc)
        for i, level in enumerate(levels):
            rows = done if by is None else done[done[by].map(py) == level]
            colour = f"C{i % 10}"
            for hollow in (False, True):
                part = rows[early.loc[rows.index] == hollow]
                if part.empty:
                    continue
                ax.scatter(part[col], part[METRIC] * 100, s=36, edgecolors=colour,
                           facecolors="none" if hollow else colour,
                           label=None if hollow else (f"{axis_label(by)} = {fmt_value(level)}"
                                                      if by else None))
        if dist.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(f"{axis_label(col)} ({dist})")
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("final val top-1 (%)")
    if by is not None:
        panels[0].legend(fontsize="small")
    title = "final val top-1 against the sampled axes"
    if early.any():
        title += " (hollow: stopped early by the scheduler)"
    fig.suptitle(title)
    return fig


def finish_order(trials: pd.DataFrame) -> pd.DataFrame:
    """The terminated trials in the order they finished (`ended_at`, then trial id)."""
    done = _done(trials)
    ended = done["ended_at"].fillna("") if "ended_at" in done else ""
    return done.assign(_ended=ended).sort_values(["_ended", "trial_id"],
                                                 kind="stable").drop(columns="_ended")


def best_so_far(trials: pd.DataFrame) -> Any:
    """Each terminated trial's final val top-1 in the order the trials finished, and the
    best of them so far as a step line: how fast the search found its best. None with
    fewer than two finished trials."""
    done = finish_order(trials)
    if len(done) < 2:
        return None
    ys = done[METRIC].to_numpy(dtype=float) * 100
    xs = np.arange(1, len(ys) + 1)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.scatter(xs, ys, s=24, color="C0", alpha=0.6, label="trial")
    ax.step(xs, np.maximum.accumulate(ys), where="post", color="C3", label="best so far")
    ax.set_xlabel("trials finished")
    ax.set_ylabel("final val top-1 (%)")
    ax.set_title("best val top-1 so far, in the order the trials finished")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def sampled_plots(plots_dir: Path, trials: pd.DataFrame) -> dict[str, Path]:
    """Draw the plots of a sampling search into `plots_dir` ({} for a grid sweep): keys
    `sampled_axes` and `best_so_far`. Call after `plots.write_plots`, which clears the
    plots it did not draw."""
    if not sampled_columns(trials):
        return {}
    out = {}
    for key, fig in (("sampled_axes", metric_vs_sampled(trials)),
                     ("best_so_far", best_so_far(trials))):
        if fig is not None:
            out[key] = save(fig, plots_dir / plot_name(key))
    return out


def best_trials(trials: pd.DataFrame, limit: int = BEST_LISTED) -> str:
    """The best terminated trials by final val top-1 with their value of every varying
    axis, sampled ones included, as markdown."""
    sampled = [c for c in sampled_columns(trials) if c in trials.columns]
    cols = [*varying(trials, group_axes(trials)), *sampled]
    done = _done(trials).sort_values(METRIC, ascending=False, kind="stable").head(limit)
    lines = ["| trial | " + " | ".join(axis_label(c) for c in cols) + " | final top-1 |",
             "|---" * (len(cols) + 2) + "|"]
    for _, r in done.iterrows():
        vals = [fmt_value(r[c]) if not isinstance(py(r[c]), float) else f"{py(r[c]):.3g}"
                for c in cols]
        early = " (stopped early)" if py(r.get("stopped_early")) else ""
        lines.append(f"| `{r['trial_id']}` | " + " | ".join(vals)
                     + f" | {r[METRIC] * 100:.1f}{early} |")
    return "\n".join(lines)


def sampled_section(trials: pd.DataFrame, plots: dict[str, Path], out: Path) -> list[str]:
    """The report's section on the sampled axes ([] for a grid sweep)."""
    sampled = sampled_columns(trials)
    if not sampled or _done(trials).empty:
        return []
    axes = ", ".join(f"`{axis_label(c)}` ~ {Distribution.parse(d)}" for c, d in sampled.items())
    lines = ["## Sampled axes", "",
             f"Drawn by the search for each trial: {axes}. Tables above group trials by the "
             "grid axes only, so a cell there spans the sampled values; here each trial "
             f"stands alone. The {min(BEST_LISTED, len(_done(trials)))} best terminated "
             "trials:", "", best_trials(trials), ""]
    for key, text in (("sampled_axes", "Final val top-1 against each sampled axis."),
                      ("best_so_far", "The best final val top-1 so far, trial by trial in "
                                      "the order they finished.")):
        if key in plots:
            rel = plots[key].relative_to(out).as_posix()
            lines += [text, "", f"![{key}]({rel})", ""]
    return lines
