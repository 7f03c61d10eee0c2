"""Sampling searches through Ray Tune on the tiny model: Optuna proposing while ASHA stops
trials, and a random search killed with SIGKILL and rerun. The trials are the ones Tune's
searcher proposes offline for the same seed (tests/test_search.py's `propose`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sweeper.spec import validate
from tests.conftest import base_doc
from tests.test_cluster import Cli, checkpointed, expected_steps, status, steps, wait_for

# The fixture that kills what a failing test leaves running.
from tests.test_cluster import clis as clis
from tests.test_search import propose

LR = {"loguniform": [1.0e-4, 1.0e-2]}


def sweep_doc(tmp_path: Path, total_steps: int, every: int, **tune: object) -> dict:
    doc = base_doc(tmp_path)
    doc["train"] = {"lr": 1e-3, "budget": {"steps": total_steps}}
    doc["eval"] = {"every_steps": every}
    doc["grid"]["train.lr"] = LR
    doc["tune"] = tune
    doc["scaling"] = {"num_workers": 1, "max_concurrent_trials": 2}
    return doc


def write_spec(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def folders(exp: Path) -> list[str]:
    return sorted(p.name for p in (exp / "trials").iterdir() if not p.name.startswith("."))


def test_optuna_proposes_and_asha_stops(tmp_path: Path, cache_dir: Path,
                                        clis: list[Cli]) -> None:
    """Optuna (TPE, seeded) proposes 3 trials, at most 2 at once, over a variant choice and
    a log-uniform learning rate; ASHA stops each at its second report (max_t), long before
    its 600 steps. The trials are the seed's proposals, inside their bounds, and
    trials.parquet holds the sampled values as a float column."""
    doc = sweep_doc(tmp_path, 600, 50, search="optuna", num_samples=3, scheduler="asha",
                    grace_period=1, max_t=2)
    doc["grid"]["variant"] = {"choice": ["siglip", "siglit"]}
    expected = dict(propose(validate(doc)))
    cli = Cli(write_spec(tmp_path, doc), cache_dir, log=tmp_path / "run.log")
    clis.append(cli)
    rc = cli.wait(900)
    out = cli.output()
    assert rc == 0, cli.tail()
    print(f"optuna + asha, 3 trials: {cli.elapsed:.0f}s")
    assert "3 terminated (3 stopped early by the scheduler)" in out, out[-3000:]
    exp = tmp_path / "results" / "t"
    assert folders(exp) == sorted(expected)
    for name, point in expected.items():
        tdir = exp / "trials" / name
        st = json.loads((tdir / "status.json").read_text())
        assert st["status"] == "terminated" and st["stopped_early"] is True, st
        assert steps(tdir)[-1] < 600  # stopped, not run out
        cfg = json.loads((tdir / "config.json").read_text())
        assert cfg["train"]["lr"] == point["train.lr"] and cfg["variant"] == point["variant"]
    lrs = [p["train.lr"] for p in expected.values()]
    assert all(1e-4 <= v <= 1e-2 for v in lrs) and len(set(lrs)) == 3
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["train__lr"].dtype == "float64" and len(trials) == 3
    assert trials["stopped_early"].all()
    assert "## Sampled axes" in (exp / "report.md").read_text()


@pytest.mark.slow
def test_random_search_resumes_after_sigkill(tmp_path: Path, cache_dir: Path,
                                             clis: list[Cli]) -> None:
    """A random search (2 variants x 2 draws of the learning rate) is killed with SIGKILL,
    its local Ray included, once a trial has finished and another has checkpointed. The
    same command ends it: exactly its 4 trials finish (Tune restored its searcher: no trial
    drawn again or beyond num_samples), the finished trial is not trained again, and every
    step is in each history once."""
    total, every = 300, 50
    doc = sweep_doc(tmp_path, total, every, search="random", num_samples=2)
    doc["grid"]["variant"] = ["siglip", "siglit"]
    names = [name for name, _ in propose(validate(doc))]
    assert len(names) == 4
    exp = tmp_path / "results" / "t"
    tdirs = [exp / "trials" / n for n in names]
    spec = write_spec(tmp_path, doc)
    cli = Cli(spec, cache_dir, log=tmp_path / "run1.log")
    clis.append(cli)

    def one_done_one_checkpointed() -> list[Path] | None:
        done = [t for t in tdirs if status(t) == "terminated"]
        going = [t for t in tdirs if status(t) == "running" and checkpointed(t)]
        return done if done and going else None

    done = wait_for(one_done_one_checkpointed, 600, "a trial to finish and another to "
                    "checkpoint", cli)
    cli.kill()
    kept = {t: (t / "history.jsonl").read_bytes() for t in done}
    killed_at = {t.name: steps(t) for t in tdirs}
    again = Cli(spec, cache_dir, log=tmp_path / "run2.log")
    clis.append(again)
    rc = again.wait(900)
    out = again.output()
    assert rc == 0, again.tail()
    print(f"random search: killed at {killed_at}; rerun {again.elapsed:.0f}s")
    assert "Number of trials: 4/4 (4 TERMINATED)" in out, out[-3000:]
    assert folders(exp) == sorted(names)
    for t in tdirs:
        assert status(t) == "terminated", t.name
        assert steps(t) == expected_steps(total, every), (t.name, steps(t))
    for t, history in kept.items():
        assert (t / "history.jsonl").read_bytes() == history  # not trained again
    trials = pd.read_parquet(exp / "trials.parquet")
    assert sorted(trials["trial_id"]) == sorted(names)
    assert set(trials["status"]) == {"terminated"}
