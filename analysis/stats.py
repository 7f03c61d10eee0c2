"""The statistics behind report.md's comparisons, in plain Python (math only).

- `welch`: Welch's two-sample t-test from summary statistics (mean, sample std, n), the
  test used to say whether one cell's lead over another exceeds the seed-to-seed spread;
- `t_sf2`: the two-sided tail of Student's t distribution, via the regularized
  incomplete beta function `betainc` (a Lentz continued fraction, Numerical Recipes
  6.4), so that no scipy is needed and the figures are the same on every machine;
- `eta_squared`: one-way ANOVA's share of the variance that one grouping explains.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 500


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The fraction converges fast only below the mean; above it, use I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with `df` (> 0, may be fractional)
    degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2.0))
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class Welch:
    """Welch's t statistic, its Welch-Satterthwaite degrees of freedom, two-sided p."""

    t: float
    df: float
    p: float


def welch(
    mean1: float, std1: float, n1: int, mean2: float, std2: float, n2: int
) -> Welch | None:
    """Welch's unequal-variance t-test of two means from their sample std (ddof=1).

    None when either side has fewer than two values (no spread to compare against).
    Two samples without any spread are told apart exactly when their means differ.
    """
    if n1 < 2 or n2 < 2:
        return None
    v1, v2 = std1 * std1 / n1, std2 * std2 / n2
    se2 = v1 + v2
    diff = mean1 - mean2
    if se2 == 0.0:
        df = float(n1 + n2 - 2)
        return Welch(math.copysign(math.inf, diff) if diff else 0.0, df, 0.0 if diff else 1.0)
    df = se2 * se2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    t = diff / math.sqrt(se2)
    return Welch(t, df, t_sf2(t, df))


def eta_squared(values: Sequence[float], groups: Sequence[Hashable]) -> float | None:
    """One-way ANOVA eta²: the between-group sum of squares over the total sum of squares
    of `values` grouped by `groups` (in [0, 1]). None without any variance to explain."""
    if len(values) != len(groups):
        raise ValueError("values and groups differ in length")
    if len(values) < 2:
        return None
    mean = math.fsum(values) / len(values)
    total = math.fsum((v - mean) ** 2 for v in values)
    if total <= 0.0:
        return None
    by_group: dict[Hashable, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        by_group.setdefault(g, []).append(v)
    between = math.fsum(
        len(vs) * (math.fsum(vs) / len(vs) - mean) ** 2 for vs in by_group.values()
    )
    return min(1.0, between / total)
