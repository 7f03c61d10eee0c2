"""Faults during training end in the documented way while the other trials finish."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sweeper import faults
from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]


def test_fault_spec_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "oom@a-b-s1:3, dataloader@a-b-s1:2,oom@other:1")
    assert faults.for_trial("a-b-s1") == {"oom": 3, "dataloader": 2}
    assert faults.for_trial("nobody") == {}
    with pytest.raises(torch_oom()):
        faults.maybe_oom({"oom": 3}, 3)
    faults.maybe_oom({"oom": 3}, 2)
    c = faults.FaultyCollate(lambda items: items, 2)
    assert c([1]) == [1]
    with pytest.raises(faults.InjectedFault):
        c([2])


def torch_oom() -> type:
    import torch

    return torch.OutOfMemoryError


@pytest.mark.slow
def test_dataloader_error_and_oom_recorded_while_others_finish(tmp_path: Path,
                                                                cache_dir: Path) -> None:
    doc = base_doc(tmp_path)
    doc["grid"]["seed"] = [0, 1, 2]
    doc["scaling"]["max_concurrent_trials"] = 1
    spec = tmp_path / "faults.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = {**os.environ, faults.ENV: "dataloader@siglip-templates-bs16-k4-s1:2,"
                                     "oom@siglip-templates-bs16-k4-s2:1"}
    r = subprocess.run([sys.executable, "-m", "sweeper.run", str(spec), "--cache-dir",
                        str(cache_dir)], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    trials = pd.read_parquet(tmp_path / "results" / "t" / "trials.parquet").set_index("seed")
    assert trials.loc[0, "status"] == "terminated"
    assert trials.loc[1, "status"] == "errored"
    assert "injected DataLoader fault" in trials.loc[1, "error"]
    assert trials.loc[2, "status"] == "errored"
    assert "OutOfMemoryError" in trials.loc[2, "error"]
    assert "errored siglip-templates-bs16-k4-s1" in r.stdout
