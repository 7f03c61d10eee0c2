"""Load: a sweep of many trivial trials completes with every trial exactly once.

CI runs 24 trials; `SWEEPER_LOAD_TRIALS=200 pytest -m slow tests/test_load.py` is the full
200-trial run (47 minutes measured on 2 cores, two trials at a time: each Ray Train trial
costs ~10-15 s to start).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_many_trivial_trials(tmp_path: Path, cache_dir: Path) -> None:
    n = int(os.environ.get("SWEEPER_LOAD_TRIALS", "24"))
    doc = base_doc(tmp_path)
    doc["grid"]["seed"] = list(range(n))
    doc["train"] = {"budget": {"steps": 1}, "lr": 1e-3}
    # As many trials at once as cores: a CPU worker reserves 0.99 CPU, its driver 0.01.
    doc["scaling"] = {"num_workers": 1, "max_concurrent_trials": os.cpu_count() or 2}
    spec = tmp_path / "load.yaml"
    spec.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "sweeper.run", str(spec), "--cache-dir",
                        str(cache_dir)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120 + 30 * n)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "results" / "t" / "trials.parquet")
    assert len(trials) == n
    assert trials["trial_id"].is_unique
    assert sorted(trials["seed"]) == list(range(n))
    assert set(trials["status"]) == {"terminated"}
    assert (trials["steps"] == 1).all()
    history = pd.read_parquet(tmp_path / "results" / "t" / "history.parquet")
    # Step 0 and step 1 per trial, none lost or duplicated.
    assert len(history) == 2 * n
    assert not history.duplicated(["trial_id", "step"]).any()
