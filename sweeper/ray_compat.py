"""Every private Ray API sweeper uses, one shim each, pinned to Ray 2.60.

Each shim names the public API it stands in for and why Ray has none; each has a test
(tests/test_ray_compat.py) that fails when an upgrade of Ray moves what it reaches into.
The rest of the code calls these functions, never `ray._private`, `ray._raylet` or
`ray.train._internal` itself.
"""

from __future__ import annotations

import os
from typing import Any


def tune_session() -> Any:
    """This process's Tune function-trainable session, or None outside a Tune trial.

    Stands in for: a public `ray.tune.get_context()` that says whether Tune has asked the
    trial to stop. Tune's context has no such field; the session's `stop_event` is the
    only signal that a trial's TorchTrainer failed *because* Tune is stopping it (ASHA,
    Ctrl-C) rather than by an error of its own."""
    try:
        from ray.train._internal.session import get_session

        return get_session()
    except Exception:
        return None


def token_auth_enabled() -> bool:
    """Whether the connected Ray cluster asks for an access token.

    Stands in for: a public query of the authentication mode. `ray get-auth-token` exists
    as a command, but no Python API says which mode the cluster runs in; without Ray's
    own answer we read the same environment variable Ray reads."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return get_authentication_mode() == AuthenticationMode.TOKEN
    except Exception:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def canonical_address(address: str) -> str:
    """`address` ('auto', 'host:port') as the GCS address `ray.init` will connect to.

    Stands in for: a public resolver of 'auto' (Ray reads /tmp/ray/ray_current_cluster).
    The workers of a sweep must be told the same concrete address as RAY_ADDRESS, which
    `ray.init(address="auto")` resolves only internally."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die(address)


def set_restored_tuner_config(tuner: Any, tune_config: Any, callbacks: list[Any],
                              verbose: int, progress_reporter: Any = None) -> None:
    """Give a `Tuner.restore(...)`d tuner this run's TuneConfig, callbacks, verbosity and
    progress reporter.

    Stands in for: `Tuner.restore(..., tune_config=..., run_config=...)`, which Ray 2.60
    does not take (only the trainable and `param_space` may be re-specified). Without it a
    resumed sweep would keep the first run's concurrency, scheduler and callbacks."""
    inner = tuner._local_tuner
    if not (hasattr(inner, "_tune_config") and hasattr(inner, "_run_config")):
        raise RuntimeError("this Ray's restored Tuner keeps its config elsewhere: "
                           "sweeper.ray_compat.set_restored_tuner_config needs updating")
    inner._tune_config = tune_config
    inner._run_config.callbacks = callbacks
    inner._run_config.verbose = verbose
    inner._run_config.progress_reporter = progress_reporter


def lean_torch_trainer(**kwargs: Any) -> Any:
    """A `TorchTrainer(**kwargs)` that starts no Ray Data actor when it is given no datasets.

    Stands in for: a switch for Train V2's DatasetsCallback, which every run gets and which
    starts a DatasetManager actor (a process of its own that imports Ray Data, ~2.5 s of
    CPU on a small machine) before the workers' train context, datasets or not. A trainer
    without datasets never asks it for a shard; with datasets nothing is changed."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return LeanTorchTrainer(**kwargs)


# The report queue of this process's last trial, kept for the next trial a reused Tune
# actor runs (`tune_report_callback`).
_REPORT_QUEUE: Any = None


def tune_report_callback() -> Any:
    """Ray's `TuneReportCallback` for this Tune trial, on the report queue of the previous
    trial this process ran when that queue is empty.

    Stands in for: a queue that outlives one trial. The callback sends rank 0's reports from
    Train's controller to the Tune trial through a Ray queue actor (a process) that the
    trial's session creates and forgets at every trial; with `reuse_actors` the same
    process runs many trials, and one queue serves all of them. A queue still holding an
    item (a trial that ended without Tune reading its last report) is not reused."""
    global _REPORT_QUEUE
    from ray.tune.integration.ray_train import TuneReportCallback

    session = tune_session()
    queue = _REPORT_QUEUE
    if session is not None and queue is not None and \
            getattr(session, "_inter_actor_queue", "missing") is None:
        try:
            if queue.empty():
                session._inter_actor_queue = queue
        except Exception:  # its actor is gone: the callback makes a new one
            pass
    callback = TuneReportCallback()
    _REPORT_QUEUE = getattr(session, "_inter_actor_queue", None)
    return callback
