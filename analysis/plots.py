"""Plots of a sweep, drawn from the same frames and tables as report.md.

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot: no global
backend is switched (the notebook keeps its inline one) and nothing is left open. Files
are rendered by the Agg canvas into memory and written atomically. Every plot function
returns None when the data cannot support the plot (one batch size, no evaluation yet),
and the report then simply has no image there.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from analysis.tables import (
    METRIC,
    Table,
    axis_label,
    combos,
    describe,
    finished,
    fmt_value,
    group_axes,
    mask,
    py,
    sampled_columns,
    slug,
    stats,
    unique,
    varying,
)
from sweeper.sink import atomic_write_bytes

_DPI = 110
_ZERO_SHOT = {"color": "black", "linestyle": ":", "linewidth": 1.5}
_SAME_BASELINE = 0.1  # points: zero-shot figures closer than this are drawn as one line
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0}


def _new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)  # attach the raster canvas; no pyplot state involved
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (Agg; the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def save(fig: Figure, path: str | Path) -> Path:
    """Atomically write `fig` as a PNG at `path`."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(fig))
    return path


def _numeric(values: list[Any]) -> bool:
    return bool(values) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )


def _zero_shot_lines(ax: Any, xs: list[Any], ours: list[Any], colours: dict[Any, str]) -> None:
    """The zero-shot (step-0) accuracy as a reference line: one grey line when every cell
    starts from the same figure, else a dotted line per variant in its colour."""
    means = [
        [(x, b.mean * 100) for x, b in zip(xs, col.baseline, strict=True) if b.mean is not None]
        for col in ours
    ]
    flat = [m for pts in means for _, m in pts]
    if not flat:
        return
    if max(flat) - min(flat) < _SAME_BASELINE:
        ax.axhline(math.fsum(flat) / len(flat), label="zero-shot (step 0)", **_ZERO_SHOT)
        return
    for col, pts in zip(ours, means, strict=True):
        if pts:
            ax.plot([x for x, _ in pts], [m for _, m in pts], label=f"{col.label} zero-shot",
                    **{**_ZERO_SHOT, "color": colours.get(col.variant, "black")})


def axis_plot(table: Table) -> Figure | None:
    """Val top-1 against the table's axis, one line per variant with ±std error bars over
    seeds, the reference figures dashed in the same colour and the zero-shot (step-0)
    accuracy dotted, so that the plot shows whether fine-tuning helped. Log2 x for batch
    size.

    None when the axis is not numeric or no variant has two points to join.
    """
    xs = table.row_values
    if table.axis is None or not _numeric(xs):
        return None
    ours = [c for c in table.columns if not c.reference]
    if not any(sum(c.n > 0 for c in col.cells) >= 2 for col in ours):
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    colours = {}
    for i, col in enumerate(ours):
        pts = [(x, c) for x, c in zip(xs, col.cells, strict=True) if c.n > 0]
        if not pts:
            continue
        line = ax.errorbar(
            [x for x, _ in pts],
            [c.mean * 100 for _, c in pts],
            yerr=[(c.std or 0.0) * 100 for _, c in pts],
            marker="o",
            capsize=3,
            label=col.label,
            color=f"C{i}",
        )
        colours[col.variant] = line.lines[0].get_color()
    for col in table.columns:
        if not col.reference:
            continue
        pts = [(x, c.mean) for x, c in zip(xs, col.cells, strict=True) if c.mean is not None]
        ax.plot(
            [x for x, _ in pts],
            [m * 100 for _, m in pts],
            linestyle="--",
            marker="x",
            color=colours.get(col.variant, "grey"),
            label=col.label,
        )
    _zero_shot_lines(ax, xs, ours, colours)
    if table.axis == "batch_size":
        ax.set_xscale("log", base=2)
    elif min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([fmt_value(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(axis_label(table.axis))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(
        f"val top-1 vs {axis_label(table.axis)}" + (f"\n{table.heading}" if table.heading else "")
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


_MAX_LINES = 10  # more settings than this: one plot per variant, then one panel per value
_MAX_LEGEND = 30  # more lines than this in a panel: no legend (thousands would hide the plot)


def _curves(
    history: pd.DataFrame, trials: pd.DataFrame, variant: Any, metric: str
) -> list[tuple[dict[str, Any], pd.Series]]:
    """(setting, mean over seeds by step) for each setting with two evaluations or more.
    `variant=None` takes every variant, and the variant is then part of the setting."""
    if history.empty or metric not in history.columns:
        return []
    # A trial of a sampling search is a setting of its own: its sampled values tell it apart.
    keys = varying(trials, [*group_axes(trials), *sampled_columns(trials)])
    hist = history[history[metric].notna() & history["step"].notna()]
    if variant is not None:
        keys = [a for a in keys if a != "variant"]
        hist = hist[mask(hist, {"variant": variant})]
    curves = []
    for combo in combos(hist, keys):
        mean = hist[mask(hist, combo)].groupby("step", sort=True)[metric].mean()
        if len(mean) >= 2:
            curves.append((combo, mean))
    return curves


def learning_curves(
    history: pd.DataFrame, trials: pd.DataFrame, variant: Any = None, metric: str = "val_top1"
) -> Figure | None:
    """Val top-1 against step: one line per setting, the mean over seeds at each step
    (running trials included: a curve is useful before the end). One variant, or all of
    them with `variant=None`. With more than ten settings, one panel per value of the
    first varying axis, so that no panel holds dozens of lines.

    None when no setting has two evaluations to join.
    """
    curves = _curves(history, trials, variant, metric)
    if not curves:
        return None
    # Faceted by a grid axis, never by a sampled one (each of its values is one trial).
    grid_keys = [k for k in curves[0][0] if k not in sampled_columns(trials)]
    facet = next(iter(grid_keys), None) if len(curves) > _MAX_LINES else None
    panels: dict[Any, list[tuple[dict[str, Any], pd.Series]]] = {}
    for combo, mean in curves:
        panels.setdefault(combo.get(facet) if facet else None, []).append((combo, mean))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = _new_figure(4.2 * ncols + 2.5, 3.2 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (value, lines) in zip(axes, panels.items(), strict=False):
        many = len(lines) > _MAX_LINES
        for i, (combo, mean) in enumerate(lines):
            rest = {k: v for k, v in combo.items() if k != facet}
            label = describe(rest) or fmt_value(variant if variant is not None else "all")
            colour = _ramp(i, len(lines)) if many else f"C{i}"
            ax.plot(mean.index, mean.to_numpy() * 100, marker=".", label=label, color=colour)
        starts = [mean.loc[0] for _, mean in lines if 0 in mean.index]
        if starts:
            ax.axhline(math.fsum(starts) / len(starts) * 100, label="zero-shot (step 0), mean",
                       **_ZERO_SHOT)
        if facet:
            ax.set_title(describe({facet: value}), fontsize="medium")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("step")
    for ax in axes[::ncols]:
        ax.set_ylabel("val top-1 (%)")
    # One legend for the figure: the panel with the most lines names them all; beyond
    # _MAX_LEGEND entries a legend is unreadable, and the colour ramp (grid order) stays.
    fullest = max(range(len(panels)), key=lambda i: len(axes[i].get_lines()))
    handles, labels = axes[fullest].get_legend_handles_labels()
    title = "learning curves, mean over seeds"
    if len(labels) <= _MAX_LEGEND:
        fig.legend(
            handles,
            labels,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize="x-small" if len(labels) > _MAX_LINES else "small",
        )
    else:
        most = max(len(lines) for lines in panels.values())
        title += f" (up to {most} settings a panel, in grid order: dark to light)"
    fig.suptitle(title + (f": {fmt_value(variant)}" if variant is not None else ""))
    fig.tight_layout()
    return fig


def _ramp(i: int, n: int) -> tuple[float, float, float, float]:
    return colormaps["viridis"](i / max(n - 1, 1))


def seen_unseen_plot(trials: pd.DataFrame) -> Figure | None:
    """Final accuracy on unseen against seen classes, one point per setting (mean ± std
    over seeds of finished trials), coloured by variant; the diagonal is parity."""
    done = finished(trials)
    done = done[done["val_top1_seen"].notna() & done["val_top1_unseen"].notna()]
    if done.empty:
        return None
    keys = varying(trials, group_axes(trials))
    variants = unique(trials["variant"])
    fig = _new_figure(5.6, 5.0)
    ax = fig.add_subplot()
    labelled = set()
    for combo in combos(done, keys):
        rows = done[mask(done, combo)]
        seen, unseen = stats(rows["val_top1_seen"]), stats(rows["val_top1_unseen"])
        v = py(rows["variant"].iloc[0])
        colour = f"C{variants.index(v) % 10}" if v in variants else "grey"
        ax.errorbar(
            seen.mean * 100,
            unseen.mean * 100,
            xerr=(seen.std or 0.0) * 100,
            yerr=(unseen.std or 0.0) * 100,
            marker="o",
            capsize=2,
            color=colour,
            label=None if v in labelled else fmt_value(v),
        )
        labelled.add(v)
    ax.plot([0, 100], [0, 100], linestyle=":", color="grey", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("seen (training) classes: val top-1 (%)")
    ax.set_ylabel("unseen classes: val top-1 (%)")
    ax.set_title("seen vs unseen classes (one point per setting)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def parallel_coordinates(trials: pd.DataFrame, metric: str = METRIC) -> Figure | None:
    """One line per finished trial across every varying grid axis, ending at its final
    val top-1 and coloured by it, so that the axis whose levels sort the colours is the
    one that mattered. Every grid axis is a set of levels on evenly spaced ticks (numbers
    ascending, names in grid order), the lines through one level fanned out a little in
    order of their val top-1; the last axis is val top-1 with the mean zero-shot (step-0)
    accuracy marked. The best trials are drawn last, on top.

    None unless the grid varies two or more axes and some trial has finished.
    """
    axes = varying(trials, group_axes(trials))
    done = finished(trials)
    done = done[done[metric].notna()]
    if len(axes) < 2 or done.empty:
        return None
    done = done.sort_values(metric, kind="stable")
    scores = done[metric].to_numpy(dtype=float) * 100
    zero = done["zero_shot_top1"].dropna().to_numpy(dtype=float) * 100
    lo = min(scores.min(), zero.min()) if zero.size else scores.min()
    hi = max(scores.max(), zero.max()) if zero.size else scores.max()
    span = (hi - lo) or 1.0
    levels = [unique(trials[a]) for a in axes]
    ys = np.empty((len(done), len(axes) + 1))
    for j, (axis, values) in enumerate(zip(axes, levels, strict=True)):
        where = {v: i / (len(values) - 1) for i, v in enumerate(values)}
        base = pd.Series([where.get(py(v), 0.0) for v in done[axis]])
        # Fanned out by rank (`done` is sorted by score), a level's bundle shows its range
        # of colours rather than only the line drawn last.
        rank = base.groupby(base).cumcount().to_numpy()
        size = base.groupby(base).transform("size").to_numpy()
        half_width = min(0.04, 0.25 / (len(values) - 1))
        ys[:, j] = base.to_numpy() + (rank / np.maximum(size - 1, 1) - 0.5) * 2 * half_width
    ys[:, -1] = (scores - lo) / span
    xs = np.arange(len(axes) + 1, dtype=float)
    fig = _new_figure(max(6.4, 1.7 * (len(axes) + 1)), 4.4)
    ax = fig.add_subplot()
    # Thin and translucent when there are many lines, so that where they bunch shows.
    lines = LineCollection(
        [np.column_stack([xs, row]) for row in ys],
        array=scores,
        cmap="viridis",
        linewidths=1.5 if len(done) <= 50 else 0.6,
        alpha=1.0 if len(done) <= 50 else max(0.05, min(0.6, 30 / len(done))),
    )
    ax.add_collection(lines)
    for j, values in enumerate(levels):
        ax.axvline(j, color="black", linewidth=0.8)
        for i, v in enumerate(values):
            ax.text(j - 0.03, i / (len(values) - 1), fmt_value(v), ha="right", va="center",
                    fontsize="small", bbox=_LABEL_BOX)
    last = len(axes)
    ax.axvline(last, color="black", linewidth=0.8)
    for tick in np.linspace(lo, hi, 5):
        ax.text(last + 0.03, (tick - lo) / span, f"{tick:.1f}", ha="left", va="center",
                fontsize="small")
    if zero.size:
        z = (zero.mean() - lo) / span
        ax.plot([last - 0.08, last + 0.08], [z, z], color="red", linewidth=2,
                label=f"zero-shot (step 0), mean: {zero.mean():.1f}%")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.12))
    ax.set_xlim(-0.35, last + 0.35)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xticks(xs)
    ax.set_xticklabels([*(axis_label(a) for a in axes), "val top-1 (%)"])
    ax.set_yticks([])
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    # A mappable of its own: the colour bar must not take the lines' transparency.
    colours = ScalarMappable(norm=lines.norm, cmap=lines.get_cmap())
    fig.colorbar(colours, ax=ax, pad=0.08).set_label("final val top-1 (%)")
    ax.set_title(f"which axis mattered: one line per trial ({len(done)}), coloured by val top-1")
    return fig


def plot_name(key: str) -> str:
    """File name of a plot: its table key, made safe and bounded."""
    name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)
    return f"{name[:150]}.png"


def write_plots(
    plots_dir: Path,
    trials: pd.DataFrame,
    history: pd.DataFrame,
    axis_tables: list[Table],
) -> dict[str, Path]:
    """Draw every plot the data supports into `plots_dir`; returns {key: path}.

    Keys: each axis table's key, `learning_curves` (all settings in one plot when they
    are few) or `learning_curves__variant-<name>` (one per variant), `seen_vs_unseen`,
    `parallel_coordinates` (two or more varying axes).
    """
    out: dict[str, Path] = {}
    for table in axis_tables:
        fig = axis_plot(table)
        if fig is not None:
            out[table.key] = save(fig, plots_dir / plot_name(table.key))
    if len(_curves(history, trials, None, "val_top1")) <= _MAX_LINES:
        fig = learning_curves(history, trials)
        if fig is not None:
            out["learning_curves"] = save(fig, plots_dir / plot_name("learning_curves"))
    else:
        for v in unique(trials["variant"]):
            fig = learning_curves(history, trials, v)
            if fig is not None:
                key = f"learning_curves__{slug({'variant': v})}"
                out[key] = save(fig, plots_dir / plot_name(key))
    fig = seen_unseen_plot(trials)
    if fig is not None:
        out["seen_vs_unseen"] = save(fig, plots_dir / plot_name("seen_vs_unseen"))
    fig = parallel_coordinates(trials)
    if fig is not None:
        out["parallel_coordinates"] = save(fig, plots_dir / plot_name("parallel_coordinates"))
    # plots/ belongs to the analysis: drop images of an earlier run that this data no
    # longer supports, so the folder shows what report.md shows.
    for stale in sorted(set(plots_dir.glob("*.png")) - set(out.values())):
        stale.unlink(missing_ok=True)
    return out
