"""Sweeps through real Ray clusters: a killed driver and a killed worker, the dashboard,
ASHA, loggers, exit statuses and Ctrl-C on a local Ray; then two nodes and bounded worker
starts on a 2-node cluster started here (last, so that it lives only for its tests).

Every command runs in its own session (`start_new_session=True`) and every test ends by
killing that session's processes, the Ray processes it started included: never
`ray stop`, which would take other people's clusters on this machine with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
import yaml

from analysis.report import write_report
from sweeper.spec import validate
from sweeper.trials import trial_configs
from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(extra)
    return env


def session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def kill_session(sid: int, first: int = signal.SIGKILL, grace_s: float = 0.0) -> None:
    """Kill every process of the session `sid` (one we started): `first`, then SIGKILL."""
    if first != signal.SIGKILL:
        for p in session_procs(sid):
            with contextlib.suppress(psutil.Error):
                p.send_signal(first)
        deadline = time.time() + grace_s
        while time.time() < deadline and session_procs(sid):
            time.sleep(0.5)
    for _ in range(40):
        procs = session_procs(sid)
        if not procs:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=3)


class Cli:
    """`python -m sweeper.run` in its own session, output to a file."""

    def __init__(self, spec: Path, cache_dir: Path, *extra: str, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 (closed in wait/kill)
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sweeper.run", str(spec), "--cache-dir", str(cache_dir),
             *extra],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env=env or clean_env())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return self.output()[-n:]

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.tail()}") from None
        self.elapsed = time.time() - self.t0
        # The local Ray of the run goes with it; stragglers of a killed one are ours to end.
        kill_session(self.proc.pid, signal.SIGTERM, grace_s=5)
        self._log.close()
        return rc

    def kill(self) -> None:
        kill_session(self.proc.pid)
        self.proc.wait()
        self._log.close()


@pytest.fixture
def clis() -> Iterator[list[Cli]]:
    """Started CLIs; whatever a failing test leaves running is killed."""
    started: list[Cli] = []
    yield started
    for c in started:
        if c.proc.poll() is None or session_procs(c.proc.pid):
            c.kill()


def wait_for(cond: Callable[[], Any], timeout: float, what: str, cli: Cli | None = None,
             interval: float = 0.3) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        if cli is not None and cli.proc.poll() is not None:
            raise AssertionError(f"CLI exited ({cli.proc.returncode}) before {what}:\n"
                                 f"{cli.tail()}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f":\n{cli.tail()}" if cli else ""))


def read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def history(tdir: Path) -> list[dict]:
    rows = []
    try:
        lines = (tdir / "history.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def steps(tdir: Path) -> list[int]:
    return [int(r["step"]) for r in history(tdir)]


def status(tdir: Path) -> str | None:
    return read_json(tdir / "status.json").get("status")


def write_spec(tmp_path: Path, doc: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def trial_ids(doc: dict) -> list[str]:
    return [t.trial_id for t in trial_configs(validate(doc))]


def slow_fast_doc(tmp_path: Path, slow_steps: int, every: int) -> dict:
    """Two trials: `quick` (3 steps) and `slow` (`slow_steps` steps, a report and a
    checkpoint every `every` steps), so a test can act while `slow` trains."""
    doc = base_doc(tmp_path)
    doc["variants"] = {"quick": {"loss": "sigmoid"},
                       "slow": {"loss": "sigmoid", "train": {"budget": {"steps": slow_steps}}}}
    doc["train"] = {"lr": 1e-3}
    doc["eval"] = {"every_steps": every}
    doc["grid"]["variant"] = ["quick", "slow"]
    doc["scaling"] = {"num_workers": 1, "max_concurrent_trials": 2}
    return doc


SLOW, EVERY = 800, 100  # the slow trial: steps, and a report + checkpoint every EVERY


def checkpointed(tdir: Path) -> bool:
    """Ray Train has registered a checkpoint of the trial (a resume starts from it)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snap = read_json(tdir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    return bool(snap.get("latest_checkpoint_result")) and max(steps(tdir), default=0) > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_steps(total: int, every: int) -> list[int]:
    return sorted({0, *range(every, total + 1, every), total})


# --------------------------------------------------------------------------- local runs


def test_killed_driver_and_worker_resume_from_checkpoints(tmp_path: Path, cache_dir: Path,
                                                          clis: list[Cli]) -> None:
    """SIGKILL the whole CLI (its local Ray included) once `quick` finished and `slow` has
    checkpointed; the same command then finishes the sweep: `quick` is not run again and
    `slow` continues from its checkpoint. In that rerun a training worker of `slow` is
    killed too: with scaling.max_failures Ray Train restarts it from the last checkpoint.
    Every step is in the history exactly once."""
    doc = slow_fast_doc(tmp_path, SLOW, EVERY)
    doc["scaling"]["max_failures"] = 1
    quick, slow = (tmp_path / "results" / "t" / "trials" / t for t in trial_ids(doc))
    spec = write_spec(tmp_path, doc)
    cli = Cli(spec, cache_dir, log=tmp_path / "run1.log")
    clis.append(cli)
    wait_for(lambda: status(quick) == "terminated" and checkpointed(slow),
             300, "quick to finish and slow to checkpoint", cli)
    cli.kill()
    killed_at = steps(slow)
    assert not session_procs(cli.proc.pid)  # no Ray process of the killed run is left
    assert status(slow) == "running" and killed_at[-1] < SLOW, killed_at
    quick_history = (quick / "history.jsonl").read_bytes()
    quick_status = (quick / "status.json").read_bytes()
    # What the kill left is readable: the report shows one finished and one running trial.
    report = write_report(quick.parent.parent)
    rows = pd.read_parquet(report["trials"]).set_index("trial_id")["status"].to_dict()
    assert rows == {quick.name: "terminated", slow.name: "running"}, rows

    again = Cli(spec, cache_dir, log=tmp_path / "run2.log")
    clis.append(again)

    def resumed_and_checkpointed() -> int | None:
        node = read_json(slow / "nodes" / "0.json")
        done = steps(slow)
        if node.get("resumed_from_checkpoint") and done and killed_at[-1] < done[-1] < SLOW:
            return node["pid"]
        return None

    pid = wait_for(resumed_and_checkpointed, 300, "slow to resume and checkpoint", again)
    os.kill(pid, signal.SIGKILL)
    worker_killed_at = steps(slow)
    rc = again.wait(600)
    out = again.output()
    assert rc == 0, again.tail()
    # Progress: Tune's legacy status table (at its cadence and at the end), the resumed trial's
    # start line, each worker's lines forwarded, no progress bars.
    assert "== Status ==" in out, out[-3000:]
    assert re.search(r"trial slow-templates-bs16-k4-s0 started", out), out[-3000:]
    assert re.search(r"\(RayTrainWorker pid=\d+\).* \[slow-templates-bs16-k4-s0\] epoch \d+ "
                     rf"step \d+/{SLOW} loss \S+ \S+ samples/s ETA \d+s", out), out[-3000:]
    assert "Loading weights" not in out and "it/s]" not in out
    print(f"kills: driver at slow steps {killed_at}, worker at {worker_killed_at}; "
          f"rerun {again.elapsed:.0f}s")
    assert worker_killed_at[-1] < SLOW, worker_killed_at
    assert (quick / "history.jsonl").read_bytes() == quick_history
    assert (quick / "status.json").read_bytes() == quick_status
    final = steps(slow)
    assert final == expected_steps(SLOW, EVERY), final
    node = read_json(slow / "nodes" / "0.json")
    assert node["pid"] != pid and node["resumed_from_checkpoint"] is True
    st = read_json(slow / "status.json")
    assert st["status"] == "terminated" and st["restarts"] >= 2, st
    trials = pd.read_parquet(tmp_path / "results" / "t" / "trials.parquet")
    assert sorted(trials["trial_id"]) == sorted([quick.name, slow.name])
    assert set(trials["status"]) == {"terminated"}


def _get(url: str, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


def test_dashboard_asha_and_tensorboard(tmp_path: Path, cache_dir: Path,
                                        clis: list[Cli]) -> None:
    """A local run serves the dashboard on 127.0.0.1 behind the token and lists the
    trials' actors and Train runs; ASHA stops every trial early (max_t) and the sweep still
    finishes: each trial needs 1.5 of the 2 CPUs, so the second starts only once the first
    one's placement group is released. TensorBoard event files are written."""
    doc = base_doc(tmp_path)
    doc["train"] = {"lr": 1e-3, "budget": {"steps": 600}}
    doc["eval"] = {"every_steps": 50}
    doc["grid"]["seed"] = [0, 1]
    doc["scaling"] = {"num_workers": 1, "max_concurrent_trials": 1,
                      "resources_per_worker": {"CPU": 1.5}, "worker_start_timeout_s": 60}
    doc["tune"] = {"scheduler": "asha", "max_t": 2}
    doc["loggers"] = ["tensorboard"]
    ids = trial_ids(doc)
    exp = tmp_path / "results" / "t"
    cli = Cli(write_spec(tmp_path, doc), cache_dir, log=tmp_path / "cli.log")
    clis.append(cli)
    url = wait_for(lambda: (m := re.search(r"Ray dashboard: (\S+)", cli.output())) and m[1],
                   300, "the dashboard URL", cli)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
    assert "ray get-auth-token" in cli.output()
    token = subprocess.run([RAY, "get-auth-token"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert token
    assert _get(f"{url}/api/v0/actors", None)[0] == 401

    def trial_actors() -> list[dict] | None:
        code, body = _get(f"{url}/api/v0/actors?limit=1000", token)
        if code != 200:
            return None
        actors = body["data"]["result"]["result"]
        alive = [a for a in actors if a["state"] == "ALIVE"
                 and a["class_name"] in ("RayTrainWorker", "TrainController")]
        return alive or None

    actors = wait_for(trial_actors, 300, "the trials' actors in the dashboard", cli, 1.0)
    assert {"RayTrainWorker", "TrainController"} & {a["class_name"] for a in actors}

    def train_runs() -> set[str] | None:
        code, body = _get(f"{url}/api/train/v2/runs/v1", token)
        names = {r["name"] for r in (body or {}).get("train_runs", [])} if code == 200 else set()
        return names or None

    runs = wait_for(train_runs, 300, "Train runs in the dashboard", cli, 1.0)
    assert runs <= set(ids), runs

    rc = cli.wait(600)
    out = cli.output()
    assert rc == 0, out[-5000:]
    print(f"asha: {cli.elapsed:.0f}s")
    assert "2 terminated (2 stopped early by the scheduler)" in out
    for t in ids:
        st = read_json(exp / "trials" / t / "status.json")
        assert st["status"] == "terminated" and st["stopped_early"] is True, st
        assert 2 <= len(steps(exp / "trials" / t)) < 13
    events = list(exp.glob("*/events.out.tfevents.*"))
    assert {e.parent.name for e in events} == set(ids), events


def test_errored_trial_ctrl_c_and_resume(tmp_path: Path, cache_dir: Path,
                                         clis: list[Cli]) -> None:
    """A trial that raises is recorded as errored (with its error in trials.parquet) while
    the other trains; Ctrl-C exits 130 with the state saved; the rerun resumes the
    unfinished trial, does not retry the errored one, and exits 1 with a summary;
    --retry-errored trains it again."""
    doc = slow_fast_doc(tmp_path, SLOW, EVERY)
    quick, slow = (tmp_path / "results" / "t" / "trials" / t for t in trial_ids(doc))
    # A deterministic failure in the worker: its history file cannot be opened.
    (quick / "history.jsonl").mkdir(parents=True)
    spec = write_spec(tmp_path, doc)
    cli = Cli(spec, cache_dir, log=tmp_path / "run1.log")
    clis.append(cli)
    wait_for(lambda: status(quick) == "errored" and checkpointed(slow),
             300, "quick to error and slow to checkpoint", cli)
    os.killpg(cli.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    rc = cli.wait(180)
    out = cli.output()
    assert rc == 130, out[-5000:]
    assert "rerun the same command to resume" in out
    interrupted_at = steps(slow)
    assert status(slow) == "running", interrupted_at
    assert read_json(quick / "status.json")["error"].startswith("IsADirectoryError")

    again = Cli(spec, cache_dir, log=tmp_path / "run2.log")
    clis.append(again)
    rc = again.wait(600)
    out = again.output()
    assert rc == 1, out[-5000:]
    print(f"ctrl-c: interrupted at {interrupted_at}; rerun {again.elapsed:.0f}s")
    assert f"errored {quick.name}: IsADirectoryError" in out
    assert steps(slow) == expected_steps(SLOW, EVERY)
    trials = pd.read_parquet(tmp_path / "results" / "t" / "trials.parquet").set_index(
        "trial_id")
    assert trials.loc[slow.name, "status"] == "terminated"
    assert trials.loc[quick.name, "status"] == "errored"
    assert trials.loc[quick.name, "error"].startswith("IsADirectoryError")

    (quick / "history.jsonl").rmdir()
    retry = Cli(spec, cache_dir, "--retry-errored", log=tmp_path / "run3.log")
    clis.append(retry)
    assert retry.wait(600) == 0, retry.tail()
    print(f"retry-errored: {retry.elapsed:.0f}s")
    assert status(quick) == "terminated" and steps(quick) == [0, 3]
    assert steps(slow) == expected_steps(SLOW, EVERY)


def test_sigterm_saves_state_and_resume(tmp_path: Path, cache_dir: Path,
                                       clis: list[Cli]) -> None:
    """SIGTERM (what a batch scheduler or `kill` sends) stops the sweep like Ctrl-C: exit
    143, the experiment readable by analysis.report (the trial `running`), and `--resume`
    finishes it from its checkpoint with every step in the history once."""
    doc = slow_fast_doc(tmp_path, SLOW, EVERY)
    doc["grid"]["variant"] = ["slow"]
    (tid,) = trial_ids(doc)
    exp = tmp_path / "results" / "t"
    slow = exp / "trials" / tid
    spec = write_spec(tmp_path, doc)
    cli = Cli(spec, cache_dir, log=tmp_path / "run1.log")
    clis.append(cli)
    wait_for(lambda: checkpointed(slow), 300, "the trial to checkpoint", cli)
    cli.proc.send_signal(signal.SIGTERM)  # the CLI only, as `kill PID` does
    rc = cli.wait(180)
    out = cli.output()
    assert rc == 143, out[-5000:]
    assert "Interrupted (SIGTERM)" in out and "rerun the same command to resume" in out
    interrupted_at = steps(slow)
    assert status(slow) == "running" and interrupted_at[-1] < SLOW, interrupted_at
    trials = pd.read_parquet(exp / "trials.parquet")  # written on the way out
    assert list(trials["status"]) == ["running"]

    again = Cli(spec, cache_dir, "--resume", log=tmp_path / "run2.log")
    clis.append(again)
    assert again.wait(600) == 0, again.tail()
    print(f"sigterm: interrupted at {interrupted_at}; rerun {again.elapsed:.0f}s")
    assert steps(slow) == expected_steps(SLOW, EVERY)
    assert read_json(slow / "nodes" / "0.json")["resumed_from_checkpoint"] is True
    assert list(pd.read_parquet(exp / "trials.parquet")["status"]) == ["terminated"]


# --------------------------------------------------------------------------- a 2-node cluster


class RayCluster:
    """A head and one worker node on this machine, 1 CPU each, started like a user would
    (`ray start --block`), each in its own session, with their own temp dir (so that no
    `ray.init()` elsewhere on the machine finds and joins them)."""

    def __init__(self, log_dir: Path) -> None:
        # RAY_TMPDIR=<base> makes `--address auto` look for <base>/ray/ray_current_cluster,
        # which `ray start --temp-dir <base>/ray` writes; nothing else on the machine sees it.
        self.base = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.temp_dir = os.path.join(self.base, "ray")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        try:
            self._start_nodes(log_dir)
        except BaseException:
            self.stop()
            raise

    def _start_nodes(self, log_dir: Path) -> None:
        common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--block",
                  "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0"]
        self._start(log_dir / "head.log", [
            "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
            "--temp-dir", self.temp_dir, "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), *common])
        wait_for(lambda: self._log_has(0, "Ray runtime started"), 120, "the head node")
        self._start(log_dir / "worker.log", [
            "--address", self.address, "--node-ip-address", "127.0.0.1",
            "--dashboard-agent-listen-port", str(free_port()), *common])
        wait_for(lambda: self._log_has(1, "Ray runtime started"), 120, "the worker node")

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        """Token authentication on every node and driver (the head turns it on by itself
        when ~/.ray/auth_token exists; a joining node or driver only when told)."""
        return clean_env(RAY_AUTH_MODE="token", **extra)

    def _start(self, log: Path, args: list[str]) -> None:
        f = open(log, "w")  # noqa: SIM115 (the process owns it)
        self.procs.append(subprocess.Popen([RAY, "start", *args], stdout=f,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           env=self.env(RAY_TMPDIR=self.base)))
        self.logs.append(log)

    def _log_has(self, i: int, text: str) -> bool:
        if self.procs[i].poll() is not None:
            raise AssertionError(f"ray start exited:\n{self.logs[i].read_text()[-3000:]}")
        return text in self.logs[i].read_text(errors="replace")

    def stop(self) -> None:
        for p in reversed(self.procs):
            kill_session(p.pid, signal.SIGTERM, grace_s=3)
            p.wait()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    c = RayCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.stop()


def test_two_node_spread_trial(tmp_path: Path, cache_dir: Path, cluster: RayCluster,
                               clis: list[Cli]) -> None:
    """`--address auto` joins the cluster; a 2-worker SPREAD trial puts one worker on each
    node and its results land in the (shared) storage."""
    doc = base_doc(tmp_path)
    doc["scaling"] = {"num_workers": 2, "placement_strategy": "SPREAD",
                      "max_concurrent_trials": 1}
    doc["grid"]["batch_size"] = [16]
    (tid,) = trial_ids(doc)
    cli = Cli(write_spec(tmp_path, doc), cache_dir, "--address", "auto",
              log=tmp_path / "cli.log", env=cluster.env(RAY_TMPDIR=cluster.base))
    clis.append(cli)
    rc = cli.wait(600)
    out = cli.output()
    assert rc == 0, out[-5000:]
    print(f"2-node trial: {cli.elapsed:.0f}s")
    tdir = tmp_path / "results" / "t" / "trials" / tid
    nodes = [read_json(tdir / "nodes" / f"{r}.json") for r in (0, 1)]
    assert {n["rank"] for n in nodes} == {0, 1}
    assert nodes[0]["node_id"] != nodes[1]["node_id"], nodes
    assert status(tdir) == "terminated"
    assert read_json(tdir / "status.json")["world_size"] == 2
    assert steps(tdir) == [0, 3]
    trials = pd.read_parquet(tmp_path / "results" / "t" / "trials.parquet")
    assert list(trials["status"]) == ["terminated"]
    # The cluster's dashboard, not a local one.
    assert f"Ray dashboard: http://127.0.0.1:{cluster.dashboard_port}" in out
    assert "Started a local Ray instance" not in out


BLOCKER = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1])
pg = placement_group([{"CPU": 0.5}])
ray.get(pg.ready())
print("held", flush=True)
sys.stdin.read()
"""


def test_unplaceable_workers_fail_in_bounded_time(tmp_path: Path, cache_dir: Path,
                                                  cluster: RayCluster, clis: list[Cli]) -> None:
    """A trial whose workers cannot be placed (another job holds half a CPU, so a 2-worker
    SPREAD trial fits no more) fails after 2 x worker_start_timeout_s with an error naming
    the resources; the next trial runs once the resources are free; exit 1."""
    doc = base_doc(tmp_path)
    doc["grid"]["variant"] = ["siglip", "siglit"]
    doc["scaling"] = {"num_workers": 2, "placement_strategy": "SPREAD",
                      "max_concurrent_trials": 1, "worker_start_timeout_s": 5}
    exp = tmp_path / "results" / "t"
    blocker = subprocess.Popen([sys.executable, "-c", BLOCKER, cluster.address],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               start_new_session=True, env=cluster.env())
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "held"
        cli = Cli(write_spec(tmp_path, doc), cache_dir, log=tmp_path / "cli.log",
                  env=cluster.env(RAY_ADDRESS=cluster.address))
        clis.append(cli)
        ids = trial_ids(doc)
        first = wait_for(lambda: next((t for t in ids if status(exp / "trials" / t)
                                       == "errored"), None), 300, "a trial to error", cli)
        failed_after = time.time() - cli.t0
    finally:
        kill_session(blocker.pid)  # the job ends, its placement group goes
        blocker.wait()
    rc = cli.wait(600)
    out = cli.output()
    assert rc == 1, out[-5000:]
    print(f"unplaceable: errored after {failed_after:.0f}s, sweep {cli.elapsed:.0f}s")
    err = read_json(exp / "trials" / first / "status.json")["error"]
    assert err.startswith("workers did not start: 2 attempts of 5 s each could not reserve "
                          "2 x {CPU: 0.99} (SPREAD) + driver {CPU: 0.01}; the cluster has "
                          "{CPU: "), err
    (other,) = [t for t in ids if t != first]
    assert status(exp / "trials" / other) == "terminated"
    trials = pd.read_parquet(exp / "trials.parquet").set_index("trial_id")
    assert trials.loc[first, "status"] == "errored"
    assert trials.loc[first, "error"].startswith("workers did not start")
    assert f"errored {first}: workers did not start" in out
