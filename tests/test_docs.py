"""The documentation: the strict MkDocs build, links that resolve, a short README, and a
repository that refers to nothing outside itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a clone does not have: the folders beside the repository on the machine it was
# written on (split so that this file does not match itself).
OUTSIDE = [re.compile(p) for p in (r"\.\./" + "shared", "/" + "work/", r"shared/" + "reference",
                                   r"shared/" + "tools")]
# Markdown files outside docs/ (the site's strict build checks the links of docs/).
MARKDOWN = ["README.md", "SECURITY.md", "bench/README.md", "analysis/SCHEMA.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / p for p in out.stdout.decode().split("\0") if p]


def test_no_tracked_file_refers_outside_the_repository() -> None:
    """No tracked file names a path outside the repository, and every tracked link (docs/'s
    pages of SECURITY.md and SCHEMA.md) points inside it."""
    found = []
    for path in tracked_files():
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(ROOT) or not target.exists():
                found.append(f"{path.relative_to(ROOT)} -> {path.readlink()}")
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # images and other binary files
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_the_outside_patterns_catch_what_they_should() -> None:
    assert any(p.search("see ../" + "shared/" + "reference/experiments.md") for p in OUTSIDE)
    assert any(p.search("python3 /" + "work/tools/check.py") for p in OUTSIDE)
    assert not any(p.search("--storage /shared/sweeps") for p in OUTSIDE)  # a cluster mount


def test_markdown_links_resolve() -> None:
    """Every relative link of the README and the other markdown files outside docs/
    names a file of the repository."""
    broken = []
    for name in MARKDOWN:
        md = ROOT / name
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor of the same page
            if not (md.parent / target.split("#")[0]).exists():
                broken.append(f"{name}: {target}")
    assert not broken, broken


def test_readme_stays_short() -> None:
    """The README is the first page a newcomer reads; the rest goes to docs/ pages."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move sections to docs/"


def test_docs_build_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link, a missing anchor or a page left out of the
    nav fails (mkdocs.yml's `validation`)."""
    pytest.importorskip("mkdocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "studies" / "index.html").is_file()
    assert (tmp_path / "quickstart_parallel_coordinates.png").is_file()  # images come along


def test_docs_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The strict build is what catches broken links: a copy of the docs with one fails."""
    pytest.importorskip("mkdocs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "docs", tmp_path / "docs", symlinks=False)
    page = tmp_path / "docs" / "studies.md"
    page.write_text(page.read_text(encoding="utf-8") + "\n[gone](results.md#no-such-heading)\n",
                    encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "no-such-heading" in done.stderr
