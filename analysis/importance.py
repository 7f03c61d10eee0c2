"""Which axis mattered: the share of final val top-1 each axis explains.

For a grid, the method is one-way ANOVA per axis: eta² = between-group sum of squares /
total sum of squares of the finished trials' final val top-1, grouping the trials by that
axis's value alone (`analysis.stats.eta_squared`). In a balanced grid the shares of the
axes add up to at most 1; the rest is interactions between axes and seed-to-seed noise.

When a sampling search drew an axis from a range (no two trials share its value, so there
are no groups), the method is Optuna's PED-ANOVA (`optuna.importance.
PedAnovaImportanceEvaluator`, Watanabe et al., IJCAI 2023) over every varying axis: how far
each axis's distribution among the best trials (the top `target_quantile` by final val
top-1) is from its distribution over all finished trials, normalised to sum to 1. It needs
the `optuna` extra; without it the grid axes get eta² and the sampled ones are named as
not covered. With few trials the figures are only indicative (`Importance.indicative`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis.stats import eta_squared
from analysis.tables import (
    METRIC,
    axis_label,
    finished,
    group_axes,
    py,
    sampled_columns,
    unique,
    varying,
)
from sweeper.search import Distribution

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
    """The shares of every varying axis over `n` finished trials, largest first.
    `method` is `eta2` (AxisShare.eta2 is eta²) or `ped-anova` (AxisShare.eta2 is the
    axis's normalised PED-ANOVA importance, `sampled` the axes drawn from a range)."""

    n: int
    shares: list[AxisShare]
    method: str = "eta2"
    sampled: dict[str, str] = field(default_factory=dict)  # column: distribution, as text
    target_quantile: float | None = None
    not_covered: list[str] = field(default_factory=list)  # sampled axes left out

    @property
    def indicative(self) -> list[str]:
        """Why the shares are only indicative (empty when they are not)."""
        why = []
        if self.n < INDICATIVE_TRIALS:
            why.append(f"{self.n} trials (fewer than {INDICATIVE_TRIALS})")
        grouped = [s for s in self.shares if s.axis not in self.sampled]
        if any(s.fewest < INDICATIVE_PER_LEVEL for s in grouped):
            why.append(f"a level with fewer than {INDICATIVE_PER_LEVEL} trials")
        return why


def importance(trials: pd.DataFrame, metric: str = METRIC) -> Importance | None:
    """Each varying axis's share of `metric` over the finished trials: eta² for a grid,
    PED-ANOVA when some axis was drawn from a range (see the module docstring).

    None unless two or more axes vary (seeds are repeats, not an axis). An axis's eta² is
    None when the finished trials' values do
    not vary at all.
    """
    sampled = {c: d for c, d in sampled_columns(trials).items()
               if c in trials.columns and len(unique(trials[c])) > 1}
    if sampled:
        try:
            import optuna  # noqa: F401  (the `optuna` extra)
        except ImportError:
            imp = _eta2(trials, metric)
            return None if imp is None else Importance(imp.n, imp.shares,
                                                       not_covered=list(sampled))
        return _ped_anova(trials, sampled, metric)
    return _eta2(trials, metric)


def _eta2(trials: pd.DataFrame, metric: str) -> Importance | None:
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


# PED-ANOVA's authors advise 5 or more trials above the target quantile.
PED_ANOVA_TOP_TRIALS = 5
PED_ANOVA_MIN_TRIALS = 4


def _optuna_distribution(doc: dict[str, Any] | None, values: list[Any]) -> Any:
    """The Optuna distribution of an axis: of its sampled range, else its values'."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if doc is None:
        return CategoricalDistribution(values)
    dist = Distribution.parse(doc)
    lo, hi = dist.args[0], dist.args[1]
    if dist.kind == "randint":
        return IntDistribution(lo, hi - 1)
    # The trials' values bound the range too: a quantised draw may round past an end.
    lo, hi = min(lo, *values), max(hi, *values)
    return FloatDistribution(lo, hi, log=dist.kind == "loguniform")


def _ped_anova(trials: pd.DataFrame, sampled: dict[str, dict[str, Any]],
               metric: str) -> Importance | None:
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    axes = [*varying(trials, group_axes(trials)), *sampled]
    if len(axes) < 2:
        return None
    done = finished(trials)
    done = done[done[metric].notna() & done[axes].notna().all(axis=1)]
    if len(done) < PED_ANOVA_MIN_TRIALS:
        return None
    dists = {a: _optuna_distribution(sampled.get(a), unique(done[a])) for a in axes}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in done.iterrows():
        params = {a: py(row[a]) for a in axes}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                  value=float(row[metric])))
    quantile = min(0.5, max(0.1, PED_ANOVA_TOP_TRIALS / len(done)))
    with warnings.catch_warnings():  # experimental in older Optuna
        warnings.simplefilter("ignore")
        shares = get_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile))
    out = []
    for a in axes:
        counts = Counter(py(v) for v in done[a])
        share = shares.get(a)
        out.append(AxisShare(axis=a, levels=len(counts), fewest=min(counts.values()),
                             most=max(counts.values()),
                             eta2=None if share is None or math.isnan(share) else share))
    out.sort(key=lambda s: -1.0 if s.eta2 is None else -s.eta2)
    return Importance(len(done), out, method="ped-anova",
                      sampled={a: str(Distribution.parse(d)) for a, d in sampled.items()},
                      target_quantile=quantile)


def render_importance(imp: Importance) -> str:
    """The importance table as markdown, with the method and, when it applies, the
    warning that the shares are indicative."""
    if imp.method == "ped-anova":
        return _render_ped_anova(imp)
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
    if imp.not_covered:
        notes.append(f"Not covered: {', '.join(axis_label(a) for a in imp.not_covered)}, "
                     "drawn from a range (no two trials share a value, so no groups); their "
                     "importance (PED-ANOVA) needs Optuna: pip install -e \".[optuna]\".")
    if imp.indicative:
        notes.append(f"Indicative only: {' and '.join(imp.indicative)}.")
    return "\n".join([*notes[:1], "", *lines, "", *notes[1:]]).rstrip()


PED_ANOVA_METHOD = (
    "PED-ANOVA, Optuna's `optuna.importance.PedAnovaImportanceEvaluator` (Watanabe et al., "
    "IJCAI 2023): how far each axis's distribution among the best {top} of the terminated "
    "trials by final val top-1 is from its distribution over all of them (Pearson "
    "divergence of Parzen estimates), normalised to sum to 100%"
)


def _render_ped_anova(imp: Importance) -> str:
    lines = ["| axis | values | share of importance (PED-ANOVA) |", "|---|---|---|"]
    for s in imp.shares:
        what = imp.sampled.get(s.axis) or f"{s.levels} levels"
        share = "–" if s.eta2 is None else f"{s.eta2 * 100:.1f}%"
        lines.append(f"| {axis_label(s.axis)} | {what} | {share} |")
    top = f"{imp.target_quantile:.0%}" if imp.target_quantile else "?"
    notes = [f"Importance of each axis for reaching the top {top} of final val top-1 over "
             f"{imp.n} terminated trials ({PED_ANOVA_METHOD.format(top=top)}). Sampled axes "
             "are drawn from a range; the others list their levels."]
    if imp.indicative:
        notes.append(f"Indicative only: {' and '.join(imp.indicative)}.")
    return "\n".join([*notes[:1], "", *lines, "", *notes[1:]]).rstrip()
