"""One test per shim of `sweeper.ray_compat`: each fails when an upgrade of Ray moves the
private API the shim reaches into, instead of the sweep silently losing what it gives."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeper import ray_compat

ROOT = Path(__file__).resolve().parents[1]


def test_tune_session_is_none_outside_tune() -> None:
    assert ray_compat.tune_session() is None


def test_token_auth_reads_rays_own_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # The private API exists (else the shim would only ever read the environment).
    from ray._raylet import AuthenticationMode, get_authentication_mode  # noqa: F401

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert ray_compat.token_auth_enabled() is False


def test_canonical_address_is_a_concrete_ip_and_port() -> None:
    # Ray rewrites a loopback host to this node's IP, which the workers can reach.
    host, port = ray_compat.canonical_address("127.0.0.1:6379").rsplit(":", 1)
    ipaddress.ip_address(host)
    assert port == "6379"


# In a fresh process: a local Ray, one Tune function trainable that reads its session, then
# a restored Tuner given a new TuneConfig.
_SCRIPT = r"""
import json, sys
from pathlib import Path
import ray
from ray import tune
from sweeper import ray_compat

def trainable(config):
    s = ray_compat.tune_session()
    tune.report({"has_session": s is not None,
                 "has_stop_event": hasattr(s, "stop_event") and not s.stop_event.is_set()})

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
storage = sys.argv[1]
tuner = tune.Tuner(trainable, run_config=tune.RunConfig(name="e", storage_path=storage,
                                                        verbose=0))
res = tuner.fit()[0].metrics
restored = tune.Tuner.restore(str(Path(storage) / "e"), trainable)
tc, cb = tune.TuneConfig(max_concurrent_trials=3), [tune.Callback()]
ray_compat.set_restored_tuner_config(restored, tc, cb, 0)
inner = restored._local_tuner
print(json.dumps({"session": res["has_session"], "stop_event": res["has_stop_event"],
                  "tune_config": inner._tune_config is tc,
                  "max_concurrent": inner._tune_config.max_concurrent_trials,
                  "callbacks": inner._run_config.callbacks is cb,
                  "verbose": inner._run_config.verbose}))
ray.shutdown()
"""


def test_tune_session_and_restored_tuner_config(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"session": True, "stop_event": True, "tune_config": True,
                   "max_concurrent": 3, "callbacks": True, "verbose": 0}
