"""A real sweep through Ray Tune and Ray Train: 2 trials, then the Parquet and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]
# Messages of Ray and transformers that say nothing about the sweep (sweeper.console).
NOISE = ("must be `None` or an integer within the vocabulary", "requires torchvision",
         "RayDeprecationWarning", "PreemptionWatcher", "started with configuration",
         "[State Transition]", "Exception ignored in", "Token authentication is enabled",
         "Checkpoint successfully created", "Setting up process group")


def run_cli(spec_path: Path, cache_dir: Path, *extra: str, timeout: int = 600):
    return subprocess.run(
        [sys.executable, "-m", "sweeper.run", str(spec_path), "--cache-dir", str(cache_dir),
         *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )


@pytest.fixture(scope="module")
def two_trial_sweep(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A real 2-trial sweep through the CLI: (its spec, its storage folder, the run)."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    doc = base_doc(tmp_path)
    doc["grid"]["variant"] = ["siglip", "siglit"]
    doc["scaling"]["max_concurrent_trials"] = 2
    # Two checkpoints per trial (steps 3 and 6), uploaded in Ray Train's background thread.
    doc["train"]["epochs"] = 2
    doc["checkpoint"] = {"keep": 1, "upload": "async"}
    spec = tmp_path / "two.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return spec, tmp_path, run_cli(spec, cache_dir)


@pytest.mark.slow
def test_two_trial_sweep_end_to_end(
    two_trial_sweep: tuple[Path, Path, subprocess.CompletedProcess], cache_dir: Path
) -> None:
    spec, tmp_path, r = two_trial_sweep
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    console = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    for noise in NOISE:
        assert not [ln for ln in console if noise in ln], noise
    assert len(console) <= 80, "\n".join(console)
    assert sum(ln.endswith(" started") and "] trial " in ln for ln in console) == 2
    assert sum("terminated: val top-1 " in ln for ln in console) == 2
    assert any("samples/s ETA" in ln for ln in console)  # per-epoch progress
    exp = tmp_path / "results" / "t"
    assert f"trials: {exp / 'trials.parquet'}" in r.stdout
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 2
    for col in ("trial_id", "variant", "loss", "freeze_vision", "text_source", "batch_size",
                "n_train_classes", "seed", "status", "zero_shot_top1", "val_top1",
                "best_val_top1"):
        assert col in trials.columns, col
    assert set(trials["status"]) == {"terminated"}
    assert trials["val_top1"].between(0, 1).all()
    assert (trials["best_val_top1"] >= trials["val_top1"] - 1e-12).all()
    assert set(trials["freeze_vision"]) == {True, False}
    for tid in trials["trial_id"]:
        # Pruned to the best trained checkpoint, weights only (no optimizer state).
        tdir = exp / "trials" / tid
        kept = sorted(tdir.glob("checkpoint_*"))
        assert [sorted(f.name for f in kept[0].iterdir())] == [["state.pt"]], kept
        step = torch.load(kept[0] / "state.pt", weights_only=True)["state"]["step"]
        rows = [json.loads(ln) for ln in (tdir / "history.jsonl").read_text().splitlines()]
        best = max((r for r in rows if r["step"] > 0), key=lambda r: r["val_top1"])
        assert step == best["step"] and [r["step"] for r in rows] == [0, 3, 6]
    report = (exp / "report.md").read_text()
    assert "siglit" in report and "siglip" in report
    # Rerunning the same command resumes a finished experiment: nothing is trained again.
    before = (exp / "trials" / trials["trial_id"][0] / "history.jsonl").read_text()
    r2 = run_cli(spec, cache_dir, "--verbose")
    assert r2.returncode == 0, r2.stderr[-3000:]
    # --verbose: Tune's own output engine (its experiment box and results line).
    assert "View detailed results here" in r2.stdout
    assert "View detailed results here" not in r.stdout
    assert (exp / "trials" / trials["trial_id"][0] / "history.jsonl").read_text() == before
    assert len(pd.read_parquet(exp / "trials.parquet")) == 2


@pytest.mark.slow
def test_notebook_from_the_repository_root(
    two_trial_sweep: tuple[Path, Path, subprocess.CompletedProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The documented command, `SWEEPER_EXPERIMENT=results/NAME jupyter execute
    analysis/explore.ipynb` from the repository root, on a real sweep: the kernel runs in
    analysis/ (as Jupyter runs it) and still finds `results/NAME` from the root."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    _, tmp_path, r = two_trial_sweep
    assert r.returncode == 0, r.stderr[-3000:]
    results = ROOT / "results"  # ignored by git; the quickstart's storage
    made = not results.exists()
    results.mkdir(exist_ok=True)
    name = f"notebook-test-{os.getpid()}"
    (results / name).symlink_to(tmp_path / "results" / "t", target_is_directory=True)
    monkeypatch.setenv("SWEEPER_EXPERIMENT", f"results/{name}")
    monkeypatch.setenv("PWD", str(ROOT))  # what the shell at the root sets; the kernel inherits
    nb = nbformat.read(ROOT / "analysis" / "explore.ipynb", as_version=4)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "analysis")}}).execute()
    finally:
        (results / name).unlink()
        if made:
            results.rmdir()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"experiment: {ROOT / 'results' / name}\n" in printed
    text = json.dumps([o.get("data", o.get("text", "")) for o in outputs])
    assert "siglip-templates-bs16-k4-s0" in text and "siglit-templates-bs16-k4-s0" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
