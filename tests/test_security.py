"""Hostile or mistaken input is refused before any trial launches, in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeper.spec import validate
from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]


def cli(spec: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeper.run", str(spec), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_trust_remote_code_is_off_unless_set(tmp_path: Path) -> None:
    assert validate(base_doc(tmp_path)).model.trust_remote_code is False
    doc = base_doc(tmp_path)
    doc["model"]["trust_remote_code"] = True
    assert validate(doc).model.trust_remote_code is True


def test_missing_model_directory_refused_before_trials(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["model"] = {"pretrained": str(tmp_path / "no-such-model")}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = cli(p)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: model.pretrained: directory '{tmp_path / 'no-such-model'}' does not exist")
    assert not (tmp_path / "results").exists()


def test_unreachable_hub_id_refused_before_trials(tmp_path: Path, monkeypatch) -> None:
    from sweeper.models import ModelError, check_loadable
    from sweeper.spec import ModelSpec

    # Offline mode makes the hub lookup fail at once, as on a machine with no network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    try:
        check_loadable(ModelSpec(pretrained="nobody/no-such-model-xyz"))
    except ModelError as e:
        msg = str(e)
    else:  # pragma: no cover
        raise AssertionError("an unreachable hub id was accepted")
    assert msg.startswith("model.pretrained: 'nobody/no-such-model-xyz'") and "\n" not in msg


_LOCAL_RAY = """
import json, os, sys, psutil, ray
from sweeper.orchestration import init_ray
info = init_ray(None)
ray.get(ray.remote(lambda: 1).remote())  # a worker process listens too
tree = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
sockets = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
           for c in psutil.net_connections(kind="inet")
           if c.status == psutil.CONN_LISTEN and c.pid in tree]
print(json.dumps({"dashboard_url": info["dashboard_url"], "sockets": sockets,
                  "gcs": ray.get_runtime_context().gcs_address}), flush=True)
sys.stdin.read()
ray.shutdown()
"""

_JOIN = "import ray; ray.init(address={gcs!r}); print('JOINED')"


def _http(url: str, token: str | None = None) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # refused: nothing listens there


@pytest.mark.slow
def test_local_ray_network_exposure() -> None:
    """The local Ray of a sweep: its dashboard listens on loopback only and answers 401
    without the token; the Ray ports that must take other nodes' connections (GCS,
    raylet, agents: Ray binds them to all interfaces and will not take a loopback node IP)
    refuse a driver with a wrong token, and the agent's HTTP API asks for the token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.Popen([sys.executable, "-c", _LOCAL_RAY], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        url = info["dashboard_url"]
        port = int(url.rsplit(":", 1)[1])
        node_ip = info["gcs"].split(":")[0]
        bound = {ip for ip, p, _ in info["sockets"] if p == port}
        assert bound == {"127.0.0.1"}, info["sockets"]
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        assert _http(f"{url}/api/v0/actors") == 401
        assert _http(f"{url}/api/v0/actors", token) == 200
        if node_ip != "127.0.0.1":  # from the network side, no dashboard at all
            assert _http(f"http://{node_ip}:{port}/api/v0/actors", token) == 0
        agents = {p for ip, p, name in info["sockets"] if "DashboardAgent" in name
                  and ip == node_ip}
        assert any(_http(f"http://{node_ip}:{p}/api/v0/actors") == 401 for p in agents), \
            info["sockets"]
        for extra in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                      {"RAY_AUTH_MODE": "token"}):
            r = subprocess.run([sys.executable, "-c", _JOIN.format(gcs=info["gcs"])],
                               capture_output=True, text=True, timeout=180,
                               env={**env, **extra})
            joined = "JOINED" in r.stdout
            assert joined == ("RAY_AUTH_TOKEN" not in extra), (extra, r.stderr[-2000:])
        print("listening:", sorted(info["sockets"]))
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
