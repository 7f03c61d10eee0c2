"""The Tune grid of a sweep: its axes, its points in Tune's `grid_search` order, and the
deterministic trial name of each point (the trial's folder and Tune's trial name).

Pure functions of a validated `SweepSpec` (`sweeper.spec`); the orchestration hands the
axes to `tune.grid_search`, and `trials.trial_configs` resolves each point into a trial.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from typing import Any


def grid_axes(spec: Any) -> dict[str, list[Any]]:
    """The grid's axes in a fixed order: the named ones, then dotted extras as written."""
    g = spec.grid
    axes: dict[str, list[Any]] = {
        "variant": list(g.variant),
        "text_source": list(g.text_source),
        "batch_size": list(g.batch_size),
        "n_train_classes": list(g.n_train_classes),
        "seed": list(g.seed),
    }
    axes.update({k: list(v) for k, v in (g.model_extra or {}).items()})
    return axes


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(v))


def trial_id_for(point: dict[str, Any]) -> str:
    """Deterministic, readable trial name derived from the grid point."""
    short = {"batch_size": "bs", "n_train_classes": "k", "seed": "s"}
    parts = [str(point["variant"]), str(point["text_source"])]
    parts += [f"{short[k]}{point[k]}" for k in ("batch_size", "n_train_classes", "seed")]
    extras = {k: v for k, v in point.items() if "." in k}
    for k, v in extras.items():
        parts.append(f"{k.split('.')[-1]}{_fmt(v)}")
    name = "-".join(parts)
    if len(name) > 120:  # keep directory names sane; the hash keeps them unique
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:10]
        name = name[:100] + "-" + digest
    return name


def setting_values(spec: Any, path: str) -> list[tuple[str, Any]]:
    """(key, value) of every value the sweep gives the dotted setting `path` (a `data.*` or
    `eval.*` key, which variants cannot override): the grid axis's values when the grid
    sweeps it, else the spec's one value."""
    extra = spec.grid.model_extra or {}
    if path in extra:
        return [(f"grid.{path}[{i}]", v) for i, v in enumerate(extra[path])]
    section, key = path.split(".", 1)
    return [(path, getattr(getattr(spec, section), key))]


def grid_points(spec: Any) -> list[dict[str, Any]]:
    """Cartesian product of the axes, in Tune's grid_search order."""
    axes = grid_axes(spec)
    # Tune resolves grid axes in sorted key order, the first varying fastest; mirror it so
    # the dry-run table lists trials in the order the sweep runs them.
    keys = sorted(axes)
    combos = itertools.product(*(axes[k] for k in reversed(keys)))
    points = [dict(zip(reversed(keys), c, strict=True)) for c in combos]
    return [{k: p[k] for k in axes} for p in points]
