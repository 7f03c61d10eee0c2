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


_LEAN = r"""
import json
from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from sweeper import ray_compat

def loop(config):
    pass

def kinds(trainer):
    return [type(c).__name__ for c in trainer._create_default_callbacks()]

bare = ray_compat.lean_torch_trainer(train_loop_per_worker=loop,
                                     scaling_config=ScalingConfig(num_workers=1))
print(json.dumps({"bare": kinds(bare),
                  "reference": kinds(type(bare).__mro__[1](
                      train_loop_per_worker=loop, scaling_config=ScalingConfig(num_workers=1))),
                  "is_torch_trainer": type(bare).__mro__[1].__name__}))
"""


def test_lean_torch_trainer_drops_only_the_datasets_callback() -> None:
    r = subprocess.run([sys.executable, "-c", _LEAN], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["is_torch_trainer"] == "TorchTrainer"
    assert "DatasetsCallback" in out["reference"]
    assert out["bare"] == [k for k in out["reference"] if k != "DatasetsCallback"]


# Two trials one at a time with reuse_actors: the second runs in the first one's process and
# gets its (empty) report queue; without reuse each trial has a process and queue of its own.
_QUEUE = r"""
import json, os, sys
import ray
from ray import tune
from sweeper import ray_compat

def trainable(config):
    cb = ray_compat.tune_report_callback()
    tune.report({"pid": os.getpid(),
                 "queue": cb._training_actor_item_queue.actor._actor_id.hex()})

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
out = {}
for reuse in (True, False):
    tuner = tune.Tuner(trainable, param_space={"i": tune.grid_search([0, 1])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1,
                                                   reuse_actors=reuse),
                       run_config=tune.RunConfig(name=f"q{reuse}", storage_path=sys.argv[1],
                                                 verbose=0))
    rows = [r.metrics for r in tuner.fit()]
    out[str(reuse)] = [len({r["pid"] for r in rows}), len({r["queue"] for r in rows})]
print(json.dumps(out))
ray.shutdown()
"""


def test_tune_report_callback_keeps_the_queue_of_a_reused_actor(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _QUEUE, str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"True": [1, 1], "False": [2, 2]}
