"""Which axis mattered: the share of the variance of final val top-1 each grid axis explains.

The method is one-way ANOVA per axis: eta² = between-group sum of squares / total sum of
squares of the finished trials' final val top-1, grouping the trials by that axis's value
alone (`analysis.stats.eta_squared`). In a balanced grid the shares of the axes add up to
at most 1; the rest is interactions between axes and seed-to-seed noise. With few trials
the figures are only indicative (see `Importance.indicative`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pandas as pd

from analysis.stats import eta_squared
from analysis.tables import METRIC, axis_label, finished, group_axes, py, varying

# Below these, one trial more or less moves the shares a lot: they are indicative only.
INDICATIVE_TRIALS = 20
INDICATIVE_PER_LEVEL = 5

METHOD = (
    "one-way ANOVA per axis: eta² = between-group sum of squares / total sum of squares of "
    "the final val top-1 of terminated trials, grouped by that axis alone"
)


@dataclass(frozen=True)
class AxisShare:
    """One axis: its number of levels, trials per level (fewest, most), and eta²."""

    axis: str
    levels: int
    fewest: int
    most: int
    eta2: float | None


@dataclass(frozen=True)
class Importance:
    """The shares of every varying axis over `n` finished trials, largest first."""

    n: int
    shares: list[AxisShare]

    @property
    def indicative(self) -> list[str]:
        """Why the shares are only indicative (empty when they are not)."""
        why = []
        if self.n < INDICATIVE_TRIALS:
            why.append(f"{self.n} trials (fewer than {INDICATIVE_TRIALS})")
        if any(s.fewest < INDICATIVE_PER_LEVEL for s in self.shares):
            why.append(f"a level with fewer than {INDICATIVE_PER_LEVEL} trials")
        return why


def importance(trials: pd.DataFrame, metric: str = METRIC) -> Importance | None:
    """Each varying axis's share of the variance of `metric` over the finished trials.

    None unless the grid varies two or more axes (seeds are repeats, not an axis). An
    axis's share is None when the finished trials' values do not vary at all.
    """
    axes = varying(trials, group_axes(trials))
    if len(axes) < 2:
        return None
    done = finished(trials)
    done = done[done[metric].notna()]
    values = [float(v) for v in done[metric]]
    shares = []
    for axis in axes:
        groups = [py(v) for v in done[axis]]
        counts = Counter(groups)
        shares.append(
            AxisShare(
                axis=axis,
                levels=len(counts),
                fewest=min(counts.values(), default=0),
                most=max(counts.values(), default=0),
                eta2=eta_squared(values, groups),
            )
        )
    # Largest share first; axes without a share last, each group in grid order.
    shares.sort(key=lambda s: -1.0 if s.eta2 is None else -s.eta2)
    return Importance(len(done), shares)


def render_importance(imp: Importance) -> str:
    """The importance table as markdown, with the method and, when it applies, the
    warning that the shares are indicative."""
    lines = [
        "| axis | levels | trials per level | share of variance (eta²) |",
        "|---|---|---|---|",
    ]
    for s in imp.shares:
        per = str(s.fewest) if s.fewest == s.most else f"{s.fewest}-{s.most}"
        share = "–" if s.eta2 is None else f"{s.eta2 * 100:.1f}%"
        lines.append(f"| {axis_label(s.axis)} | {s.levels} | {per} | {share} |")
    notes = [
        f"Share of the variance of final val top-1 over {imp.n} terminated trials that each "
        f"axis explains on its own ({METHOD}). In a balanced grid the shares add up to at "
        "most 100%; the rest is interactions between axes and seed-to-seed noise.",
    ]
    if imp.indicative:
        notes.append(f"Indicative only: {' and '.join(imp.indicative)}.")
    return "\n".join([*notes[:1], "", *lines, "", *notes[1:]]).rstrip()
