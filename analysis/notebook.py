"""Which experiment `analysis/explore.ipynb` opens: `SWEEPER_EXPERIMENT` resolved as the
documentation says, wherever the kernel runs.

Jupyter starts a notebook's kernel in the notebook's own folder (`analysis/`), not in the
directory the user launched Jupyter from, so a relative path cannot be read from the
kernel's working directory. The launch directory survives in `$PWD`, which the shell set and
the kernel inherits; the repository root is where this package lives (an editable install,
`pip install -e .`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from analysis.collect import ExperimentNotFound

VARIABLE = "SWEEPER_EXPERIMENT"


def repository() -> Path | None:
    """The checkout this `analysis` package lives in, or None when it was installed
    elsewhere (a wheel in site-packages has no `search_spaces/` beside it)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "search_spaces").is_dir() and (root / "sweeper").is_dir() else None


def _is_uri(value: str) -> bool:
    return "://" in value


def _bases(launch_dir: str | Path | None, root: Path | None) -> list[Path]:
    """Where a relative path may start, in order, without repeats: the launch directory,
    the kernel's working directory, the repository root."""
    out: list[Path] = []
    for base in (launch_dir, Path.cwd(), root):
        if base is not None and str(base) and Path(base).resolve() not in out:
            out.append(Path(base).resolve())
    return out


def newest_experiment(results: Path) -> Path:
    """The most recently created experiment (a folder with `sweep.json`) under `results`."""
    found = sorted(results.glob("*/sweep.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ExperimentNotFound(
            f"no experiment under {results}: run a sweep first (python -m sweeper.run "
            f"search_spaces/quickstart.yaml) or set {VARIABLE}")
    return found[-1].parent


def experiment_location(
    value: str | None = None,
    launch_dir: str | Path | None = None,
    root: Path | None = None,
) -> str:
    """The experiment to open, from `value` (default: `$SWEEPER_EXPERIMENT`).

    A URI (`s3://...`, `gs://...`, `file://...`) or an absolute path is taken as given. A
    relative path is looked up from the directory Jupyter was launched in (`launch_dir`,
    default `$PWD`), then the kernel's working directory, then the repository root (`root`,
    default `repository()`); the first that holds it wins. Unset or empty: the newest
    experiment under the repository's `results/` (the working directory's without one).
    Raises ExperimentNotFound naming the places tried.
    """
    value = os.environ.get(VARIABLE) if value is None else value
    root = repository() if root is None else root
    if not value:
        return str(newest_experiment((root or Path.cwd()) / "results"))
    if _is_uri(value) or Path(value).expanduser().is_absolute():
        return value
    launch_dir = os.environ.get("PWD") if launch_dir is None else launch_dir
    bases: Sequence[Path] = _bases(launch_dir, root)
    for base in bases:
        if (base / value).is_dir():
            return str(base / value)
    tried = ", ".join(str(b / value) for b in bases)
    raise ExperimentNotFound(
        f"{VARIABLE}={value!r}: no such folder (tried {tried}); give it relative to the "
        "repository root (results/NAME) or as the absolute path a sweep prints after "
        "`Experiment:`")
