"""How `analysis/explore.ipynb` finds the repository and its experiment (`analysis.notebook`):
a relative `SWEEPER_EXPERIMENT` from the directory Jupyter was launched in, else the
repository root, whatever the kernel's working directory; a clear error otherwise.

The notebook itself runs headless against a real sweep in tests/test_e2e.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from analysis import ExperimentNotFound
from analysis.notebook import experiment_location, newest_experiment, repository

ROOT = Path(__file__).resolve().parents[1]


def experiment(parent: Path, name: str) -> Path:
    exp = parent / "results" / name
    exp.mkdir(parents=True)
    (exp / "sweep.json").write_text("{}")
    return exp


def test_repository_is_this_checkout() -> None:
    assert repository() == ROOT


def test_relative_path_from_the_launch_directory_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jupyter runs the kernel in the notebook's folder; the path is read from where the
    user launched it (`$PWD`), even when the repository has an experiment of that name."""
    launch, root, kernel = tmp_path / "launch", tmp_path / "root", tmp_path / "root" / "analysis"
    kernel.mkdir(parents=True)
    mine = experiment(launch, "quickstart")
    experiment(root, "quickstart")
    monkeypatch.chdir(kernel)
    assert experiment_location("results/quickstart", launch_dir=launch, root=root) == str(mine)
    monkeypatch.setenv("PWD", str(launch))  # what a shell sets, and the kernel inherits
    assert experiment_location("results/quickstart", root=root) == str(mine)


def test_relative_path_from_the_repository_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Launched elsewhere (or `$PWD` unset), the path is read from the repository root,
    never from the kernel's folder (analysis/)."""
    root, kernel = tmp_path / "root", tmp_path / "root" / "analysis"
    kernel.mkdir(parents=True)
    exp = experiment(root, "quickstart")
    monkeypatch.chdir(kernel)
    monkeypatch.delenv("PWD", raising=False)
    assert experiment_location("results/quickstart", root=root) == str(exp)
    assert experiment_location("results/quickstart", launch_dir=tmp_path, root=root) == str(exp)


def test_missing_experiment_names_every_place_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, launch = tmp_path / "root", tmp_path / "launch"
    root.mkdir()
    launch.mkdir()
    monkeypatch.chdir(root)
    with pytest.raises(ExperimentNotFound) as e:
        experiment_location("results/nope", launch_dir=launch, root=root)
    msg = str(e.value)
    assert msg.startswith("SWEEPER_EXPERIMENT='results/nope': no such folder")
    assert str(launch / "results" / "nope") in msg and str(root / "results" / "nope") in msg


def test_uris_and_absolute_paths_as_given(tmp_path: Path) -> None:
    assert experiment_location("s3://bucket/sweeps/q", root=tmp_path) == "s3://bucket/sweeps/q"
    assert experiment_location(str(tmp_path / "x"), root=tmp_path) == str(tmp_path / "x")


def test_unset_opens_the_newest_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = experiment(tmp_path, "old"), experiment(tmp_path, "new")
    os.utime(old / "sweep.json", (1, 1))
    monkeypatch.delenv("SWEEPER_EXPERIMENT", raising=False)
    assert experiment_location(root=tmp_path) == str(new)
    assert experiment_location("", root=tmp_path) == str(new)
    with pytest.raises(ExperimentNotFound, match=r"no experiment under .*: run a sweep first"):
        newest_experiment(tmp_path / "empty")


def first_cell() -> str:
    nb = json.loads((ROOT / "analysis" / "explore.ipynb").read_text(encoding="utf-8"))
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


def test_notebook_copy_without_sweeper_installed_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of the notebook outside the repository, in an environment where `analysis`
    cannot be imported: one clear ImportError, not a bare StopIteration."""
    pytest.importorskip("IPython")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWEEPER_REPO", raising=False)
    for name in [m for m in sys.modules if m == "analysis" or m.startswith("analysis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "analysis", None)  # `import analysis` raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e .*SWEEPER_REPO"):
        exec(compile(first_cell(), "explore.ipynb", "exec"), {})

