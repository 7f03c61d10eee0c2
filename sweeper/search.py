"""The search space of a sweep, in one place: its axes (lists and distributions), Tune's
`param_space` and search algorithm, the trials when they are known up front, their names,
and the values an axis may take.

An axis of `grid:` is a list (a grid axis: every value is tried) or a distribution
(`{loguniform: [lo, hi]}`, `{uniform: ...}`, `{randint: [lo, hi]}` with hi exclusive,
`{quniform: [lo, hi, q]}`, `{choice: [a, b, ...]}`), sampled by the search algorithm
`tune.search` names (`ALGORITHMS`): `grid` (lists only), `random` (Tune's
`BasicVariantGenerator`: `tune.num_samples` draws, crossed with the grid axes) and `optuna`
(Tune's `OptunaSearch`, TPE; grid axes of one value only). The named axes (`NAMED_AXES`)
are keys of the trial itself; any other axis is a dotted spec path (`train.lr`).

The rest of sweeper asks this module instead of laying out the trials: `values` (what an
axis may take), `covering_points` (enough points to answer a question about a few axes:
which models, which caches), `points` (every trial, when the search is a grid). The
functions take a validated `SweepSpec` (`sweeper.spec`, which imports this module: the
spec is typed `Any` here). Ray is imported only inside `param_space`, `search_algorithm`
and `scheduler`, which the orchestration calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# Spec paths an axis may address (`train.lr`), beside the named axes.
SECTIONS = ("model", "train", "eval", "data", "checkpoint", "variants")
METRIC, MODE = "val_top1", "max"  # what the searchers and schedulers optimise


@dataclass(frozen=True)
class NamedAxis:
    """A key of the trial itself (TrialConfig), set by the grid: its display name and the
    prefix of its value in trial names (`bs16`)."""

    label: str
    prefix: str


# In the order of trial names and tables.
NAMED_AXES: dict[str, NamedAxis] = {
    "variant": NamedAxis("variant", ""),
    "text_source": NamedAxis("text source", ""),
    "batch_size": NamedAxis("batch size", "bs"),
    "n_train_classes": NamedAxis("train classes", "k"),
    "seed": NamedAxis("seed", "s"),
}


def label(axis: str) -> str:
    """Display name of an axis: `batch size` for `batch_size`, a dotted path as written."""
    named = NAMED_AXES.get(axis)
    return named.label if named else axis


# --------------------------------------------------------------------------- distributions

KINDS = {"loguniform": 2, "uniform": 2, "randint": 2, "quniform": 3, "choice": None}
MAX_CHOICES = 1000
MAX_ENUMERATED = 10_000  # a randint of more values is not listed value by value


def _number(v: Any, what: str, integer: bool = False) -> float | int:
    if isinstance(v, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
        with contextlib.suppress(ValueError):
            v = float(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{what} must be a {'whole ' if integer else ''}number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v!r}")
    if integer:
        if isinstance(v, float) and not v.is_integer():
            raise ValueError(f"{what} must be a whole number, got {v!r}")
        return int(v)
    return float(v)


@dataclass(frozen=True)
class Distribution:
    """A sampled axis: `kind` (a key of KINDS) and its arguments as written."""

    kind: str
    args: tuple[Any, ...]

    @classmethod
    def parse(cls, doc: Any) -> Distribution:
        """`{kind: [args]}` from YAML, validated; ValueError (one line) when malformed."""
        if isinstance(doc, Distribution):
            return doc
        kinds = ", ".join(KINDS)
        if not isinstance(doc, dict) or len(doc) != 1 or next(iter(doc)) not in KINDS:
            raise ValueError(f"a distribution is one key of {kinds} (e.g. "
                             "{loguniform: [1.0e-6, 1.0e-4]}), got "
                             f"{json.dumps(doc, default=str)[:80]}")
        kind, args = next(iter(doc.items()))
        if not isinstance(args, list | tuple):
            raise ValueError(f"{kind}: expected a list of arguments, got {args!r}")
        if kind == "choice":
            return cls._choice(list(args))
        n = KINDS[kind]
        if len(args) != n:
            names = "[lo, hi, q]" if n == 3 else "[lo, hi]"
            raise ValueError(f"{kind}: expected {names}, got {list(args)!r}")
        ints = kind == "randint"
        lo, hi = (_number(a, f"{kind} {w}", ints) for a, w in zip(args, ("lo", "hi"),
                                                                    strict=False))
        if not lo < hi:
            raise ValueError(f"{kind}: lo {lo} must be below hi {hi}"
                             + (" (hi is exclusive)" if ints else ""))
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform: lo must be > 0, got {lo}")
        if kind == "quniform":
            q = _number(args[2], "quniform q")
            if not 0 < q <= hi - lo:
                raise ValueError(f"quniform: q must be > 0 and at most hi - lo = {hi - lo:g}, "
                                 f"got {q:g}")
            return cls(kind, (lo, hi, q))
        return cls(kind, (lo, hi))

    @classmethod
    def _choice(cls, options: list[Any]) -> Distribution:
        if not options:
            raise ValueError("choice: needs at least one value")
        if len(options) > MAX_CHOICES:
            raise ValueError(f"choice: {len(options)} values; at most {MAX_CHOICES}")
        for i, v in enumerate(options):
            if isinstance(v, dict | list):
                raise ValueError(f"choice[{i}]: a value, not a {type(v).__name__}")
        keys = [json.dumps(v, sort_keys=True, default=str) for v in options]
        if len(set(keys)) != len(keys):
            dup = next(v for v, k in zip(options, keys, strict=True) if keys.count(k) > 1)
            raise ValueError(f"choice: {dup!r} is listed twice")
        return cls("choice", tuple(options))

    def doc(self) -> dict[str, list[Any]]:
        """The YAML form, `{kind: [args]}`."""
        return {self.kind: list(self.args)}

    def __str__(self) -> str:
        args = (f"{a:g}" if isinstance(a, float) else repr(a) for a in self.args)
        return f"{self.kind}({', '.join(args)})"

    @property
    def continuous(self) -> bool:
        """Numbers drawn from a range (every kind but `choice`)."""
        return self.kind != "choice"

    def finite_values(self) -> list[Any] | None:
        """Every value it can draw, when they are few enough to list (choice, randint)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint" and self.args[1] - self.args[0] <= MAX_ENUMERATED:
            return list(range(self.args[0], self.args[1]))
        return None

    def probe_values(self) -> list[Any]:
        """Values that stand for all it can draw when the spec is checked: its ends and, for
        a real range, a value between them (so an axis of whole numbers refuses it)."""
        if self.kind == "choice":
            return list(self.args)
        lo, hi = self.args[0], self.args[1]
        if self.kind == "randint":
            return [lo, hi - 1]
        if self.kind == "loguniform":
            mid = math.exp(math.log(lo) + 0.382 * (math.log(hi) - math.log(lo)))
        else:
            mid = lo + 0.382 * (hi - lo)
        if self.kind == "quniform":
            q = self.args[2]
            return [round(v / q) * q for v in (lo, hi)]
        return [lo, hi, mid]

    def tune_domain(self) -> Any:
        """Tune's sampling domain (`tune.loguniform(lo, hi)`, ...)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


Axis = list[Any] | Distribution


def parse_axis(raw: Any) -> Axis:
    """A grid axis as written: a non-empty list, or a distribution. ValueError otherwise."""
    if isinstance(raw, Distribution):
        return raw
    if isinstance(raw, list):
        if not raw:
            raise ValueError("must be a non-empty list of values or a distribution")
        return raw
    if isinstance(raw, dict):
        return Distribution.parse(raw)
    raise ValueError("must be a list of values or a distribution ({loguniform: [lo, hi]}, "
                     f"{{choice: [...]}}, ...), got {raw!r}"[:200])


def named_axis(value: Any, handler: Callable[[Any], Any]) -> Any:
    """Pydantic wrap validator of a named grid axis: a list validated as the field's type
    (`handler`), or a distribution whose probe values that type takes."""
    if isinstance(value, dict):
        dist = Distribution.parse(value)
        try:
            typed = handler(dist.probe_values())
        except ValueError as e:  # a ValidationError: keep its first line
            errors = getattr(e, "errors", lambda: [])()
            first = errors[0] if errors else {"msg": str(e), "input": "?"}
            raise ValueError(f"{dist} draws {first.get('input')!r}, which this axis does not "
                             f"take ({first['msg']})") from None
        return Distribution("choice", tuple(typed)) if dist.kind == "choice" else dist
    if isinstance(value, Distribution):
        return value
    return handler(value)


def serialize_axis(value: Any, handler: Callable[[Any], Any]) -> Any:
    """Pydantic wrap serializer: a distribution as its YAML form."""
    return value.doc() if isinstance(value, Distribution) else handler(value)


# --------------------------------------------------------------------------- algorithms


@dataclass(frozen=True)
class Algorithm:
    """A search algorithm `tune.search` may name: whether it crosses grid axes of several
    values with its samples, the package it needs (an extra of ours), and how Tune's search
    algorithm is built from the spec and the number of trials run at once."""

    grid_axes: bool
    distributions: bool
    samples: bool  # tune.num_samples applies
    package: str | None
    build: Callable[[Any, int], Any]


def _basic_variants(spec: Any, concurrency: int) -> Any:
    from ray.tune.search import BasicVariantGenerator

    # The seed draws the distributions; a grid has none to draw.
    return BasicVariantGenerator(max_concurrent=concurrency,
                                 random_state=spec.tune.search_seed)


def _optuna(spec: Any, concurrency: int) -> Any:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # TPE proposes from the finished trials: with one proposal per free slot, as many
    # trials run at once as the sweep allows, no more.
    return ConcurrencyLimiter(OptunaSearch(metric=METRIC, mode=MODE,
                                           seed=spec.tune.search_seed),
                              max_concurrent=concurrency)


ALGORITHMS: dict[str, Algorithm] = {
    "grid": Algorithm(grid_axes=True, distributions=False, samples=False, package=None,
                      build=_basic_variants),
    "random": Algorithm(grid_axes=True, distributions=True, samples=True, package=None,
                        build=_basic_variants),
    "optuna": Algorithm(grid_axes=False, distributions=True, samples=True, package="optuna",
                        build=_optuna),
}
# `tune.search` takes the names of ALGORITHMS: a new algorithm is one entry above.
SearchName = Literal[tuple(ALGORITHMS)]  # type: ignore[valid-type]


# --------------------------------------------------------------------------- axes


def axes(spec: Any) -> dict[str, Axis]:
    """Every axis of the sweep, named ones first, then dotted ones as written."""
    g = spec.grid
    out: dict[str, Axis] = {k: getattr(g, k) for k in NAMED_AXES}
    out.update({k: parse_axis(v) for k, v in (g.model_extra or {}).items()})
    return out


def grid_axes(spec: Any) -> dict[str, list[Any]]:
    """The axes given as lists (every value tried), in `axes` order."""
    return {k: list(v) for k, v in axes(spec).items() if isinstance(v, list)}


def sampled_axes(spec: Any) -> dict[str, Distribution]:
    """The axes given as distributions, in `axes` order."""
    return {k: v for k, v in axes(spec).items() if isinstance(v, Distribution)}


def varying(spec: Any) -> list[str]:
    """The axes that take more than one value."""
    return [k for k, v in axes(spec).items() if isinstance(v, Distribution) or len(v) > 1]


def values(spec: Any, axis: str) -> list[Any] | None:
    """Every value `axis` may take in the sweep, or None when it is drawn from a range too
    large to list (a real-valued distribution)."""
    ax = axes(spec)[axis]
    return list(ax) if isinstance(ax, list) else ax.finite_values()


def keyed_values(spec: Any, axis: str) -> list[tuple[str, Any]]:
    """(key path, value) of the values `axis` may take, for messages: `grid.batch_size[1]`;
    of a distribution, its listed values, or for a real range its probe values (ends and a
    middle value)."""
    ax = axes(spec)[axis]
    if isinstance(ax, list):
        return [(f"grid.{axis}[{i}]", v) for i, v in enumerate(ax)]
    if ax.kind == "choice":
        return [(f"grid.{axis}.choice[{i}]", v) for i, v in enumerate(ax.args)]
    listed = ax.finite_values()
    return [(f"grid.{axis}.{ax.kind}", v) for v in (listed if listed is not None
                                                    else ax.probe_values())]


def setting_values(spec: Any, path: str) -> list[tuple[str, Any]]:
    """(key, value) of every value the sweep gives the dotted setting `path` (a `data.*` or
    `eval.*` key, which variants cannot override): the axis's values when the grid sweeps
    it, else the spec's one value."""
    if path in (spec.grid.model_extra or {}):
        return keyed_values(spec, path)
    section, key = path.split(".", 1)
    return [(path, getattr(getattr(spec, section), key))]


def _first(ax: Axis) -> Any:
    return ax[0] if isinstance(ax, list) else ax.probe_values()[0]


def _product(chosen: dict[str, list[Any]]) -> list[dict[str, Any]]:
    # Tune resolves grid axes in sorted key order, the first varying fastest; mirror it so
    # that listings show trials in the order the sweep runs them.
    keys = sorted(chosen)
    combos = itertools.product(*(chosen[k] for k in reversed(keys)))
    points = [dict(zip(reversed(keys), c, strict=True)) for c in combos]
    return [{k: p[k] for k in chosen} for p in points]


def covering_points(spec: Any, select: Callable[[str], bool]) -> list[dict[str, Any]] | None:
    """Points that, together, give the axes `select` picks every combination of the values
    they may take, the other axes at one value each: enough to answer a question that
    depends on those axes alone (which models, which caches) without laying out every
    trial. None when a picked axis is drawn from a range too large to list."""
    chosen: dict[str, list[Any]] = {}
    for k, ax in axes(spec).items():
        if select(k):
            listed = ax if isinstance(ax, list) else ax.finite_values()
            if listed is None:
                return None
            chosen[k] = list(listed)
        else:
            chosen[k] = [_first(ax)]
    return _product(chosen)


def grid_points(spec: Any) -> list[dict[str, Any]]:
    """Every combination of the list axes, in Tune's grid_search order (distributions left
    out)."""
    return _product(grid_axes(spec))


def known_up_front(spec: Any) -> bool:
    """Whether every trial is known before the sweep (a grid search); a sampling search
    proposes its trials while the sweep runs."""
    return not ALGORITHMS[spec.tune.search].distributions


def points(spec: Any) -> list[dict[str, Any]] | None:
    """Every trial of the sweep when it is known up front (a grid search), else None."""
    return grid_points(spec) if known_up_front(spec) else None


def n_trials(spec: Any) -> int:
    """How many trials the sweep runs: grid points x samples (counted, not laid out)."""
    return math.prod(len(v) for v in grid_axes(spec).values()) * num_samples(spec)


def num_samples(spec: Any) -> int:
    """Tune's num_samples: the draws of a sampling search, 1 for a grid."""
    return spec.tune.num_samples if ALGORITHMS[spec.tune.search].samples else 1


def point_of(spec: Any, config: dict[str, Any]) -> dict[str, Any]:
    """A trial's point (its value of every axis) from Tune's config of the trial."""
    return {k: config[k] for k in axes(spec)}


# --------------------------------------------------------------------------- names


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(v))


def trial_name(point: dict[str, Any], index: int | None = None) -> str:
    """Deterministic, readable trial name of a point (its folder and Tune's trial name):
    the named axes' values, then each dotted axis's last key and value; a trial proposed by
    a sampling search ends with its index among the searcher's proposals (`-n7`), which no
    other trial has."""
    parts = [f"{a.prefix}{point[k]}" for k, a in NAMED_AXES.items()]
    parts += [f"{k.split('.')[-1]}{_fmt(v)}" for k, v in point.items() if k not in NAMED_AXES]
    name = "-".join(parts)
    if len(name) > 120:  # keep directory names sane; the hash keeps them unique
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:10]
        name = name[:100] + "-" + digest
    return name if index is None else f"{name}-n{index}"


def proposal_index(name: str) -> int | None:
    """The searcher's index at the end of a sampled trial's name (`...-n7`: 7)."""
    m = re.search(r"-n(\d+)$", name)
    return int(m[1]) if m else None


def tune_trial_name(spec: Any, config: dict[str, Any], experiment_tag: str) -> str:
    """The name of a Tune trial: of its point, and for a sampling search the index Tune's
    search algorithm gave it (the number that starts its `experiment_tag`, `7_lr=...`)."""
    index = None
    if not known_up_front(spec):
        m = re.match(r"\d+", str(experiment_tag))
        index = int(m[0]) if m else 0
    return trial_name(point_of(spec, config), index)


# --------------------------------------------------------------------------- checks


def check(spec: Any, max_trials: int) -> None:
    """What the search algorithm cannot take, the trial count, and trial names that two
    grid points share. Raises ValueError (one line naming the key)."""
    name = spec.tune.search
    algo = ALGORITHMS[name]
    sampled = sampled_axes(spec)
    if sampled and not algo.distributions:
        key = next(iter(sampled))
        raise ValueError(f"grid.{key}: {sampled[key]} is a distribution, which tune.search: "
                         f"{name} cannot sample; use tune.search: random or optuna, or list "
                         "the values")
    if not algo.grid_axes:
        for key, vals in grid_axes(spec).items():
            if len(vals) > 1:
                raise ValueError(f"grid.{key}: tune.search: {name} cannot cross a grid axis "
                                 f"({len(vals)} values) with its samples; write "
                                 f"{{choice: {json.dumps(vals, default=str)[:60]}}} to let it "
                                 "choose, or use tune.search: random")
        if not sampled:
            raise ValueError(f"tune.search: {name} needs a distribution in grid (e.g. "
                             "train.lr: {loguniform: [1.0e-6, 1.0e-4]})")
    if not algo.samples and spec.tune.num_samples != 1:
        raise ValueError(f"tune.num_samples: {spec.tune.num_samples} samples, but tune.search: "
                         f"{name} runs each grid point once (repeat with grid.seed)")
    n = n_trials(spec)
    if n > max_trials:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in grid_axes(spec).items() if len(v) > 1)
        if num_samples(spec) > 1:
            sizes = " x ".join(filter(None, (sizes, f"{num_samples(spec)} samples")))
        raise ValueError(f"grid: {n} trials ({sizes}) exceed the limit of {max_trials}; "
                         "split the study into several sweeps")
    seen: dict[str, dict[str, Any]] = {}
    for point in points(spec) or []:
        tid = trial_name(point)
        if tid in seen:
            a, b = seen[tid], point
            diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
            what = ", ".join(f"{k}: {x!r} and {y!r}" for k, (x, y) in diff.items()) \
                or "the same values twice"
            raise ValueError(f"grid: two grid points are both trial {tid!r} ({what}); "
                             "make the axis values distinct")
        seen[tid] = point


def missing_package(spec: Any) -> str | None:
    """The one-line refusal of a search algorithm whose package is not installed, or None."""
    import importlib.util

    package = ALGORITHMS[spec.tune.search].package
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return (f"tune.search: {spec.tune.search} needs the {package!r} package, which is not "
            f"installed: pip install -e \".[{package}]\" (or pip install {package})")


def describe(spec: Any) -> list[str]:
    """Lines of what a sampling search draws from, for a dry run."""
    name = spec.tune.search
    lines = [f"tune.search: {name}, {n_trials(spec)} trials "
             f"({num_samples(spec)} samples"
             + (f" x {len(grid_points(spec))} grid points" if len(grid_points(spec)) > 1
                else "")
             + f"), seed {spec.tune.search_seed}"]
    for k, ax in axes(spec).items():
        lines.append(f"  {label(k)}: {ax}" if isinstance(ax, Distribution) else
                     f"  {label(k)}: {', '.join(map(str, ax))}")
    return lines


# --------------------------------------------------------------------------- Tune


def param_space(spec: Any) -> dict[str, Any]:
    """Tune's param_space: a grid axis as `tune.grid_search`, a distribution as Tune's
    domain; for a search that takes no grid axes, a one-value list as the value itself."""
    from ray import tune

    takes_grid = ALGORITHMS[spec.tune.search].grid_axes
    out: dict[str, Any] = {}
    for k, ax in axes(spec).items():
        if isinstance(ax, Distribution):
            out[k] = ax.tune_domain()
        else:
            out[k] = tune.grid_search(list(ax)) if takes_grid else ax[0]
    return out


def search_algorithm(spec: Any, concurrency: int) -> Any:
    """Tune's search algorithm of the spec, running at most `concurrency` trials at once."""
    return ALGORITHMS[spec.tune.search].build(spec, concurrency)


def scheduler(spec: Any) -> Any:
    """Tune's trial scheduler: ASHA stops the trials that trail at the same number of
    reports (with a sampling search, the searcher proposes and ASHA stops the weak early);
    None for FIFO."""
    if spec.tune.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(metric=METRIC, mode=MODE, time_attr="training_iteration",
                             grace_period=spec.tune.grace_period,
                             reduction_factor=spec.tune.reduction_factor,
                             max_t=spec.tune.max_t)
    return None
