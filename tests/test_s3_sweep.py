"""A sweep whose `storage` is a bucket on a real S3 protocol server (moto's server mode on
127.0.0.1, conftest.py), through the real CLI and a local Ray: 4 trials; the CLI (its Ray
included) SIGKILLed once a trial has finished and the slow one has checkpointed; the node's
local copy of the bucket deleted (a fresh node); the same command resumes from the bucket,
and in that rerun a training worker is killed and restarts from its checkpoint in the
bucket. One sweep (the module's fixture) serves every test here."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

import analysis
from sweeper.prepare import prepare_inputs
from sweeper.spec import validate
from sweeper.storage import Location, resolve
from tests.conftest import S3Server
from tests.test_cluster import (
    Cli,
    expected_steps,
    kill_session,
    session_procs,
    slow_fast_doc,
    trial_ids,
    wait_for,
    write_spec,
)
from tests.test_storage import objects

pytestmark = pytest.mark.slow

SLOW, EVERY = 400, 50  # the slow trial: steps, and a report + checkpoint every EVERY


def steps(tdir: Location) -> list[int]:
    from sweeper.sink import TrialSink

    return [int(r["step"]) for r in TrialSink.at(tdir).history()]


def status(tdir: Location) -> dict[str, Any]:
    return (tdir / "status.json").read_json() or {}


def checkpointed(tdir: Location) -> bool:
    """Ray Train has registered a checkpoint of the trial in the bucket."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snap = (tdir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_json() or {}
    return bool(snap.get("latest_checkpoint_result")) and max(steps(tdir), default=0) > 0


@pytest.fixture(scope="module")
def s3_sweep(s3: S3Server, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("s3sweep")
    bucket = s3.bucket()
    doc = slow_fast_doc(tmp, SLOW, EVERY)
    doc["storage"] = f"s3://{bucket}/sweeps"
    # 4 trials, run two at a time in this order: three quick ones, then the slow one.
    doc["variants"].update({"quick2": {"loss": "sigmoid"}, "quick3": {"loss": "sigmoid"}})
    doc["grid"]["variant"] = ["quick", "quick2", "quick3", "slow"]
    doc["scaling"]["max_failures"] = 1
    exp = resolve(doc["storage"]) / "t"
    tdirs = {t: exp / "trials" / t for t in trial_ids(doc)}
    quick = [t for t in tdirs if t.startswith("quick")]
    slow = [t for t in tdirs if t.startswith("slow")]
    spec = write_spec(tmp, doc)
    # The tiny model first (once per session's cache), so the waits below time the sweep.
    prepare_inputs(validate(doc), cache_dir, announce=False)
    started: list[Cli] = []
    try:
        cli = Cli(spec, cache_dir, log=tmp / "run1.log")
        started.append(cli)

        def one_done_one_checkpointed() -> tuple[str, str] | None:
            done = [t for t in quick if status(tdirs[t]).get("status") == "terminated"]
            ckpt = [t for t in slow if checkpointed(tdirs[t])]
            return (done[0], ckpt[0]) if done and ckpt else None

        finished, resumed = wait_for(one_done_one_checkpointed, 600,
                                     "a trial to finish and a slow one to checkpoint", cli)
        cli.kill()
        assert not session_procs(cli.proc.pid)
        killed_at = steps(tdirs[resumed])
        before = objects(tdirs[finished])
        # The interrupted experiment, read from the bucket while nothing runs.
        interrupted = analysis.load(str(exp), refresh=True)[0].set_index("trial_id")["status"]
        # A fresh node: nothing of the bucket is left on local disk.
        shutil.rmtree(cache_dir / "storage" / "s3" / bucket, ignore_errors=True)

        again = Cli(spec, cache_dir, log=tmp / "run2.log")
        started.append(again)

        def resumed_and_checkpointed() -> int | None:
            node = (tdirs[resumed] / "nodes" / "0.json").read_json() or {}
            done = steps(tdirs[resumed])
            if node.get("resumed_from_checkpoint") and done and killed_at[-1] < done[-1] < SLOW:
                return node["pid"]
            return None

        pid = wait_for(resumed_and_checkpointed, 600, "the slow trial to resume", again)
        os.kill(pid, signal.SIGKILL)
        worker_killed_at = steps(tdirs[resumed])
        rc = again.wait(900)
        print(f"s3 sweep: CLI killed at {killed_at}, worker at {worker_killed_at}; "
              f"rerun {again.elapsed:.0f}s")
        return {"bucket": bucket, "exp": exp, "tdirs": tdirs, "finished": finished,
                "resumed": resumed, "before": before, "killed_at": killed_at,
                "worker_killed_at": worker_killed_at, "worker_pid": pid, "rc": rc,
                "out": again.output(), "interrupted": interrupted.to_dict()}
    finally:
        for c in started:
            if c.proc.poll() is None or session_procs(c.proc.pid):
                kill_session(c.proc.pid)


def test_s3_sweep_resumes_from_the_bucket(s3_sweep: dict[str, Any]) -> None:
    r = s3_sweep
    assert r["rc"] == 0, r["out"][-5000:]
    tdirs = r["tdirs"]
    # What the kill left was readable: finished trials terminated, the others not.
    assert r["interrupted"][r["finished"]] == "terminated"
    assert r["interrupted"][r["resumed"]] == "running"
    # The trial that had finished was not touched again: byte for byte.
    assert objects(tdirs[r["finished"]]) == r["before"]
    # Every trial finished, every step in its history once.
    for tid, tdir in tdirs.items():
        st = status(tdir)
        assert st["status"] == "terminated", (tid, st)
        want = expected_steps(SLOW, EVERY) if tid.startswith("slow") else [0, st["steps"]]
        assert steps(tdir) == want, tid
    # The killed worker restarted from its checkpoint in the bucket.
    assert r["killed_at"][-1] < r["worker_killed_at"][-1] < SLOW
    node = (tdirs[r["resumed"]] / "nodes" / "0.json").read_json()
    assert node["resumed_from_checkpoint"] is True and node["pid"] != r["worker_pid"]
    assert node["checkpoint"].startswith(
        f"{r['bucket']}/sweeps/t/trials/{r['resumed']}/checkpoint_"), node
    assert status(tdirs[r["resumed"]])["restarts"] >= 2


def test_s3_sweep_layout_and_analysis(s3_sweep: dict[str, Any]) -> None:
    """The bucket holds the experiment's layout on disk; the report went there and the CLI
    named its local copy; `analysis.load` reads the URI."""
    r = s3_sweep
    exp: Location = r["exp"]
    names = set(objects(exp))
    assert {"sweep.json", "spec.yaml", "trials.parquet", "history.parquet",
            "per_class.parquet", "report.md"} <= names
    assert any(re.fullmatch(r"plots/.+\.png", n) for n in names)
    for tid in r["tdirs"]:
        for f in ("status.json", "history.jsonl", "per_class.jsonl", "config.json"):
            assert f"trials/{tid}/{f}" in names
        assert any(re.fullmatch(rf"trials/{tid}/checkpoint_[^/]+/state\.pt", n) for n in names)
        assert f"{tid}/params.json" in names  # Tune's folder
    assert re.search(rf"report: {re.escape(str(exp))}/report\.md \(local copy: \S+report\.md\)",
                     r["out"]), r["out"][-3000:]
    trials, history = analysis.load(str(exp))
    assert sorted(trials["trial_id"]) == sorted(r["tdirs"])
    assert set(trials["status"]) == {"terminated"}
    assert len(history) == sum(len(steps(t)) for t in r["tdirs"].values())
