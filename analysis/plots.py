"""Plots of a sweep, drawn from the same frames and tables as report.md.

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot: no global
backend is switched (the notebook keeps its inline one) and nothing is left open. Files
are rendered by the Agg canvas into memory and written atomically. Every plot function
returns None when the data cannot support the plot (one batch size, no evaluation yet),
and the report then simply has no image there.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.tables import (
    Table,
    axis_label,
    combos,
    describe,
    finished,
    fmt_value,
    group_axes,
    mask,
    py,
    slug,
    stats,
    unique,
    varying,
)
from sweeper.sink import atomic_write_bytes

_DPI = 110


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


def axis_plot(table: Table) -> Figure | None:
    """Val top-1 against the table's axis, one line per variant with ±std error bars over
    seeds and the reference figures dashed in the same colour. Log2 x for batch size.

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


def _curves(
    history: pd.DataFrame, trials: pd.DataFrame, variant: Any, metric: str
) -> list[tuple[dict[str, Any], pd.Series]]:
    """(setting, mean over seeds by step) for each setting with two evaluations or more.
    `variant=None` takes every variant, and the variant is then part of the setting."""
    if history.empty or metric not in history.columns:
        return []
    keys = varying(trials, group_axes(trials))
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
    facet = next(iter(curves[0][0]), None) if len(curves) > _MAX_LINES else None
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
        if facet:
            ax.set_title(describe({facet: value}), fontsize="medium")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols :]:
        ax.set_xlabel("step")
    for ax in axes[::ncols]:
        ax.set_ylabel("val top-1 (%)")
    # One legend for the figure: the panel with the most lines names them all.
    fullest = max(range(len(panels)), key=lambda i: len(axes[i].get_lines()))
    handles, labels = axes[fullest].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize="x-small" if len(labels) > _MAX_LINES else "small",
    )
    title = "learning curves, mean over seeds"
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
    are few) or `learning_curves__variant-<name>` (one per variant), `seen_vs_unseen`.
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
    # plots/ belongs to the analysis: drop images of an earlier run that this data no
    # longer supports, so the folder shows what report.md shows.
    for stale in sorted(set(plots_dir.glob("*.png")) - set(out.values())):
        stale.unlink(missing_ok=True)
    return out
