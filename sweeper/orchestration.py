"""Everything Ray: the Tuner over the grid, the per-trial driver that runs a `TorchTrainer`,
the resource math, resume, and the Ray-side context given to the worker loop.

Ray Train V2 does not take a `TorchTrainer` inside a `Tuner`; the documented pattern is a
Tune function trainable (the *driver*) that builds a `TorchTrainer` and calls `fit()` with
`TuneReportCallback`, which forwards rank 0's metrics to Tune. The driver holds a
negligible CPU share (`DRIVER_CPU`) and no GPU, so trials never hold the CPUs their workers
need; by default a CPU worker asks for `1 - DRIVER_CPU` CPUs, so a trial of N workers never
needs more than N CPUs, its driver included (see `worker_resources`).

The experiment directory is the source of truth (`sink.py`): a trial whose status.json says
terminated or diverged is never trained again, an errored one only with `--retry-errored`,
and any other one resumes from its last Ray Train checkpoint (Train V2 restores a run of the
same name and storage path). Tune's own experiment state is restored when it exists, but may
lag the trial folders after a killed driver; the driver of each trial checks the folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.sink import (
    TrialSink,
    atomic_write_bytes,
    atomic_write_json,
    first_error_line,
    read_json,
    trial_dir,
)
from sweeper.spec import (
    ScalingSpec,
    SpecError,
    SweepSpec,
    TrialConfig,
    grid_axes,
    resolve_trial,
    spec_fingerprint,
    trial_configs,
    trial_id_for,
)

log = logging.getLogger(__name__)

DRIVER_CPU = 0.01
FINISHED = ("terminated", "diverged")
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Start attempts of a worker group that cannot get its resources: the first and one retry.
START_RETRIES = 1
# Environment of every Ray worker process of a sweep (drivers, controllers, workers).
WORKER_ENV = {
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",  # Train runs listed in the dashboard
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no tqdm bars interleaved from several processes
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Train's controller polls its workers every 2 s by default, so each trial waits up to
    # 2 s to be seen finished (bench/sweep_overhead.py: 0.1 s polling cut sweep wall time
    # 15-30 %); 0.5 s keeps most of that at a quarter of the polls.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Keys of the spec that say where and how fast trials run, not what they compute: an
# existing experiment resumes when only these changed.
RESOURCE_KEYS = (
    "storage",
    "loggers",
    "scaling.resources_per_worker",
    "scaling.placement_strategy",
    "scaling.max_concurrent_trials",
    "scaling.max_failures",
    "scaling.worker_start_timeout_s",
)
LOGGER_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


# --------------------------------------------------------------------------- resources


def worker_resources(sc: ScalingSpec) -> dict[str, float]:
    """The Ray resources one training worker reserves.

    `resources_per_worker` as written (zeros dropped); a CPU worker that names no CPU gets
    `1 - DRIVER_CPU`, so that N one-CPU workers and their driver fit in N CPUs on any node;
    a GPU worker gets `GPU: 1` unless it names a (possibly fractional) GPU share, and no CPU
    unless it names one (Ray Train's own default)."""
    per = {k: float(v) for k, v in (sc.resources_per_worker or {}).items() if v}
    if sc.use_gpu:
        per.setdefault("GPU", 1.0)
    elif "CPU" not in (sc.resources_per_worker or {}):
        per["CPU"] = 1.0 - DRIVER_CPU
    return per


def _fmt_res(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def trial_demand(sc: ScalingSpec) -> str:
    """What one trial asks for, in words (for messages)."""
    return (f"{sc.num_workers} x {_fmt_res(worker_resources(sc))} ({sc.placement_strategy})"
            f" + driver {{CPU: {DRIVER_CPU:g}}}")


def _per_node_capacity(per: dict[str, float], node: dict[str, float]) -> int:
    """How many workers of `per` fit on a node with resources `node`."""
    caps = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per.items() if v > 0]
    return min(caps) if caps else 0


def trials_at_once(sc: ScalingSpec, nodes: list[dict[str, float]]) -> int:
    """How many trials of `sc` the nodes (total resources of each) hold at the same time."""
    per, n = worker_resources(sc), sc.num_workers
    caps = [_per_node_capacity(per, node) for node in nodes]
    if sc.placement_strategy == "STRICT_PACK":
        fit = sum(c // n for c in caps)
    elif sc.placement_strategy == "STRICT_SPREAD":
        # t trials need, on n distinct nodes each, one worker per trial.
        fit = 0
        while sum(min(c, fit + 1) for c in caps) >= n * (fit + 1) and fit < 10**6:
            fit += 1
    else:
        fit = sum(caps) // n
    cpu_total = sum(node.get("CPU", 0.0) for node in nodes)
    cpu_per_trial = per.get("CPU", 0.0) * n + DRIVER_CPU
    return min(fit, math.floor(cpu_total / cpu_per_trial + 1e-9))


def _describe_nodes(nodes: list[dict[str, float]], keys: list[str]) -> str:
    total = {k: sum(node.get(k, 0.0) for node in nodes) for k in keys}
    largest = max(nodes, key=lambda node: _per_node_capacity(
        {k: 1.0 for k in keys}, node)) if nodes else {}
    where = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    if len(nodes) > 1:
        where += f", largest {_fmt_res({k: largest.get(k, 0.0) for k in keys})}"
    return f"{_fmt_res(total)} ({where})"


def check_fits(spec: SweepSpec, nodes: list[dict[str, float]] | None = None) -> int:
    """Refuse up front a trial that can never fit the cluster (workers + driver); return
    how many trials fit at once. `nodes`: total resources of each node (default: the
    connected cluster's alive nodes)."""
    if nodes is None:
        nodes = cluster_nodes()
    sc = spec.scaling
    fit = trials_at_once(sc, nodes)
    if fit < 1:
        keys = sorted(set(worker_resources(sc)) | {"CPU"})
        raise SpecError(f"scaling: one trial needs {trial_demand(sc)} but the cluster has "
                        f"{_describe_nodes(nodes, keys)}; lower scaling.num_workers or "
                        "scaling.resources_per_worker, or add nodes")
    return fit


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def local_nodes() -> list[dict[str, float]]:
    """The one node a local `ray.init()` would start, without starting it."""
    import psutil
    from ray._private.utils import get_num_cpus

    res: dict[str, float] = {"CPU": float(get_num_cpus()),
                             "memory": float(psutil.virtual_memory().total)}
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        n_gpu = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            n_gpu = min(n_gpu, len([d for d in visible.split(",") if d.strip()]))
        if n_gpu:
            res["GPU"] = float(n_gpu)
    except Exception:  # no detector: the check after ray.init() still runs
        pass
    return [res]


def cluster_address(address: str | None) -> str | None:
    """The cluster to join (`--address`, else RAY_ADDRESS), or None for a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


# --------------------------------------------------------------------------- preflight


def storage_path(storage: str) -> Path:
    """`storage` as a local (possibly shared) path; refuse object-store URIs."""
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage):
        scheme = storage.split("://", 1)[0]
        raise SpecError(
            f"storage: {storage!r}: {scheme}:// URIs are not supported, because every trial "
            "appends its history to files in place; mount the bucket or a shared filesystem "
            "(NFS, Lustre, a FUSE mount) at the same path on every node and give that path")
    return Path(storage).expanduser().resolve()


def preflight(spec: SweepSpec, address: str | None = None) -> None:
    """Checks of the spec against this environment that need no data, no model and no
    Ray: storage, the loggers' packages, resources (the spec's own consistency, resource
    values included, is checked by `sweeper.spec.validate`).

    A local run (no `--address`, no RAY_ADDRESS) is checked against this machine's CPUs
    and GPUs here; a cluster run again after joining. Raises SpecError (one line)."""
    storage_path(spec.storage)
    for i, name in enumerate(spec.loggers):
        pkg = LOGGER_PACKAGES.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise SpecError(f"loggers[{i}]: {name} needs the {pkg!r} package, which is not "
                            f"installed (pip install {pkg}), or remove it from loggers")
    if cluster_address(address) is None:
        check_fits(spec, local_nodes())


# --------------------------------------------------------------------------- worker side


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker: build the Ray-free context, run the loop."""
    import ray.train
    import ray.train.torch

    from sweeper.worker import WorkerContext, run_trial

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sweeper").setLevel(logging.INFO)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # progress bars are cosmetic
        pass
    cfg = TrialConfig.model_validate(config["trial"])
    tctx = ray.train.get_context()
    ckpt = ray.train.get_checkpoint()
    rank = tctx.get_world_rank()
    tdir = Path(config["trial_dir"])
    if ckpt is None and rank == 0:
        # A start without a checkpoint trains from step 0: drop the rows of an earlier
        # attempt that was killed before its first checkpoint was registered, so that the
        # history holds every step once (a resume truncates after its checkpoint's step).
        TrialSink(tdir).truncate_after(-1)
    # Where each rank runs (node, host, pid): read by people and by the fault-injection
    # tests; rewritten by every start of the worker group.
    atomic_write_json(tdir / "nodes" / f"{rank}.json", {
        "rank": rank, "world_size": tctx.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(), "pid": os.getpid(),
        "resumed_from_checkpoint": ckpt is not None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    ctx = WorkerContext(
        rank=rank,
        world_size=tctx.get_world_size(),
        device=ray.train.torch.get_device(),
        trial_dir=tdir,
        report=report,
        cache_dir=Path(config["cache_dir"]) if config.get("cache_dir") else None,
    )
    if ckpt is not None:
        with ckpt.as_directory() as d:
            ctx.resume_from = Path(d)
            run_trial(cfg, ctx)
    else:
        run_trial(cfg, ctx)


# --------------------------------------------------------------------------- driver side


class TrialFailed(RuntimeError):
    """A trial's TorchTrainer failed; the message is the one-line reason."""


def _last_metrics(sink: TrialSink) -> dict[str, Any]:
    hist = [r for r in sink.history() if r.get("val_top1") is not None]
    return {k: v for k, v in (hist[-1] if hist else {}).items() if not isinstance(v, dict)}


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def _root_cause(e: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (TrainingFailedError, RayTaskError)."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = None
        if hasattr(e, "worker_failures") and e.worker_failures:  # WorkerGroupError
            inner = e.worker_failures[min(e.worker_failures)]
        elif getattr(e, "controller_failure", None) is not None:  # ControllerError
            inner = e.controller_failure
        elif getattr(e, "cause", None) is not None:  # RayTaskError / RayActorError
            inner = e.cause
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def describe_failure(e: BaseException, sc: ScalingSpec) -> str:
    """One line saying why a trial's TorchTrainer failed."""
    cause = _root_cause(e)
    name = type(cause).__name__
    if name == "WorkerGroupStartupTimeoutError":
        try:
            import ray

            free = _fmt_res({k: v for k, v in ray.available_resources().items()
                             if k in worker_resources(sc) or k == "CPU"})
            total = _fmt_res({k: v for k, v in ray.cluster_resources().items()
                              if k in worker_resources(sc) or k == "CPU"})
        except Exception:
            free = total = "?"
        tries = START_RETRIES + 1
        return (f"workers did not start: {tries} attempts of {sc.worker_start_timeout_s:g} s "
                f"each could not reserve {trial_demand(sc)}; the cluster has {free} free of "
                f"{total} (other trials or jobs hold the rest, or a node is gone); raise "
                "scaling.worker_start_timeout_s or lower scaling.max_concurrent_trials")
    if name == "InsufficientClusterResourcesError":
        return f"{name}: {_one_line(str(cause))}"
    if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError"):
        return f"{name}: a training worker process died ({_one_line(str(cause), 300)})"
    msg = str(cause).strip()
    # A RayTaskError's text is the remote traceback; its last line names the error.
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if len(lines) > 1:
        msg = lines[-1]
    return _one_line(f"{name}: {msg}" if msg and not msg.startswith(name) else msg or name)


def trial_driver(config: dict[str, Any], *, spec_json: str, experiment_dir: str,
                 cache_dir: str | None) -> None:
    """One Tune trial: resolve its config, run its TorchTrainer, record how it ended."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = SweepSpec.model_validate_json(spec_json)
    point = {k: config[k] for k in grid_axes(spec)}
    cfg = resolve_trial(spec, point)
    tdir = trial_dir(experiment_dir, cfg.trial_id)
    sink = TrialSink(tdir)
    previous = sink.status()
    if previous.get("status") in FINISHED:
        # Finished in an earlier run of this experiment: keep its results, train nothing.
        tune.report({**_last_metrics(sink), "resumed_finished": True})
        return
    if previous.get("status") == "errored":
        # run_sweep sets errored trials back to pending with --retry-errored only.
        raise TrialFailed(f"errored in an earlier run ({previous.get('error')}); "
                          "rerun with --retry-errored to train it again")
    sink.write_config(cfg.model_dump(mode="json"))
    session = _tune_session()
    sc = cfg.scaling
    # Bounded start: Ray Train would otherwise wait for workers forever.
    os.environ[START_TIMEOUT_ENV] = f"{sc.worker_start_timeout_s:g}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": cfg.model_dump(mode="json"), "trial_dir": str(tdir),
                           "cache_dir": cache_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=worker_resources(sc),
            placement_strategy=sc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.trial_id,
            storage_path=str(Path(experiment_dir) / "trials"),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep,
                checkpoint_score_attribute="val_top1",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=sc.max_failures,
                # Default -1 retries a worker group that cannot start forever: a silent hang.
                controller_failure_limit=START_RETRIES,
            ),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:
        if _tune_is_stopping(session):
            # Tune stops this trial (ASHA, Ctrl-C): the process exits and takes the Train
            # controller with it, which is what fit() reports. Not an error: the sink
            # callback in the driver process records how the trial ended.
            return
        reason = describe_failure(e, sc)
        sink.update_status(status="errored", error=reason, error_detail=str(e)[:20000],
                           ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        raise TrialFailed(reason) from e


def _tune_session() -> Any:
    """This trial's Tune function session (None outside Tune)."""
    try:
        from ray.train._internal.session import get_session

        return get_session()
    except Exception:
        return None


def _tune_is_stopping(session: Any) -> bool:
    """Whether Tune has asked the trial of `session` to stop: Trainable.stop() sets the
    session's stop event, then shuts the session down (so it is captured up front)."""
    if session is None:
        return False
    event = getattr(session, "stop_event", None)
    return bool(event is not None and event.is_set()) or _tune_session() is not session


# --------------------------------------------------------------------------- experiment


@dataclass
class SweepResult:
    """How a sweep ended, for the CLI's exit status and summary."""

    experiment_dir: Path
    statuses: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    stopped_early: list[str] = field(default_factory=list)
    report_paths: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False
    signal_number: int = signal.SIGINT  # which signal interrupted the sweep
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 every trial terminated or diverged, 1 some did not, 128 + the signal when
        interrupted (130 Ctrl-C, 143 SIGTERM)."""
        if self.interrupted:
            return 128 + int(self.signal_number)
        return 1 if self.errors else 0


def experiment_dir(spec: SweepSpec) -> Path:
    """`<storage>/<name>`, absolute (Tune needs absolute storage paths)."""
    return storage_path(spec.storage) / spec.name


def _spec_doc(spec: SweepSpec | dict[str, Any]) -> dict[str, Any]:
    doc = spec.model_dump(mode="json") if isinstance(spec, SweepSpec) else json.loads(
        json.dumps(spec))
    for key in RESOURCE_KEYS:
        node, *rest = key.split(".")
        if rest:
            doc.get(node, {}).pop(rest[0], None)
        else:
            doc.pop(node, None)
    doc.pop("name", None)
    return doc


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            d = _first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if old != new:
        return f"{path or '<root>'}: {json.dumps(old)[:60]} -> {json.dumps(new)[:60]}"
    return None


def spec_change(old_sweep: dict[str, Any], spec: SweepSpec) -> str | None:
    """None when `spec` computes the same trials as the experiment of `old_sweep`
    (sweep.json), else the first differing key path (`train.lr: 0.001 -> 0.0003`).
    Resource keys (RESOURCE_KEYS) may change: they say where trials run, not what they do."""
    if old_sweep.get("fingerprint") == spec_fingerprint(spec):
        return None
    old_spec = old_sweep.get("spec")
    if not isinstance(old_spec, dict):
        return "fingerprint differs"
    try:  # keys added to the spec since, at their defaults, are no change
        old_doc = _spec_doc(SweepSpec.model_validate(old_spec))
    except Exception:
        old_doc = _spec_doc(old_spec)
    return _first_difference(old_doc, _spec_doc(spec))


def prepare_experiment(spec: SweepSpec, spec_text: str | None, new: bool,
                       resume: bool = False) -> SweepSpec:
    """Create or reopen the experiment folder, refusing a changed spec unless `new`.

    With `new`, an existing experiment of another spec keeps its folder and the new one
    gets a suffixed name (`name-2`, `name-3`, ...). With `resume`, the experiment must exist.
    Changes to resource keys only (RESOURCE_KEYS) reopen the experiment as it is."""
    base = spec.name
    k = 1
    while True:
        exp = experiment_dir(spec)
        old = read_json(exp / "sweep.json")
        change = spec_change(old, spec) if isinstance(old, dict) else None
        if old is None or change is None:
            break
        if not new:
            raise SpecError(
                f"name: experiment {exp} exists with a different spec ({change}); pass --new "
                "to start another beside it, or another --name")
        k += 1
        spec = spec.model_copy(update={"name": f"{base}-{k}"})
    if resume and old is None:
        raise SpecError(f"name: no experiment {exp} to resume (drop --resume to start it)")
    trials = trial_configs(spec)
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        raise SpecError("grid: two grid points map to the same trial name")
    exp.mkdir(parents=True, exist_ok=True)
    if old is None:
        atomic_write_json(exp / "sweep.json", {
            "name": spec.name,
            "fingerprint": spec_fingerprint(spec),
            "spec": spec.model_dump(mode="json"),
            "axes": grid_axes(spec),
            "trials": [{"trial_id": t.trial_id, "axes": t.axes,
                        "config": t.model_dump(mode="json")} for t in trials],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if spec_text is not None:
            atomic_write_bytes(exp / "spec.yaml", spec_text.encode())
    return spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_auth() -> bool:
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return get_authentication_mode() == AuthenticationMode.TOKEN
    except Exception:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def init_ray(address: str | None, dashboard_host: str = "127.0.0.1") -> dict[str, Any]:
    """Join a cluster (`address`, or RAY_ADDRESS) or start a local one with its dashboard
    bound to `dashboard_host` (loopback unless told otherwise).

    Every Ray process of the sweep is told which cluster it belongs to (RAY_ADDRESS, or the
    dashboard's URL as RAY_API_SERVER_ADDRESS): Ray's state API, which Train's placement
    group cleaner calls from inside the cluster, otherwise guesses, and fails when this
    machine runs more than one Ray."""
    import ray

    os.environ.update({k: v for k, v in WORKER_ENV.items() if k not in os.environ})
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    env_vars = {k: os.environ[k] for k in WORKER_ENV}  # the user's values win
    address = cluster_address(address)
    if ray.is_initialized():
        return {"dashboard_url": None, "local": False}
    if address:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        import sweeper

        try:
            if "://" not in address:
                address = canonicalize_bootstrap_address_or_die(address)
                env_vars["RAY_ADDRESS"] = address
            # Ship this package to every node, so that all of them run the same sweeper
            # code (its dependencies must be installed there).
            env = {"env_vars": env_vars,
                   "py_modules": [str(Path(sweeper.__file__).parent)]}
            ctx = ray.init(address=address, runtime_env=env, log_to_driver=True)
        except ConnectionError as e:
            raise SpecError(f"--address {address}: {_one_line(str(e), 300)}") from None
        except Exception as e:
            if type(e).__name__ != "AuthenticationError":
                raise
            raise SpecError(
                f"--address {address}: the cluster asks for its access token: export "
                "RAY_AUTH_MODE=token, with the token of the cluster in ~/.ray/auth_token "
                "or RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)") from None
        local = False
    else:
        port = _free_port()
        host = "127.0.0.1" if dashboard_host in ("0.0.0.0", "::", "localhost") \
            else dashboard_host
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://{host}:{port}"
        # address="local": a new Ray of our own even when `ray start` left a cluster address
        # in /tmp/ray (ray.init() would join that one).
        ctx = ray.init(address="local", include_dashboard=True, dashboard_host=dashboard_host,
                       dashboard_port=port, runtime_env={"env_vars": env_vars},
                       log_to_driver=True)
        local = True
    url = getattr(ctx, "dashboard_url", None)
    return {"dashboard_url": f"http://{url}" if url and "://" not in url else url,
            "local": local}


def dashboard_banner(info: dict[str, Any], dashboard_host: str) -> str:
    """What the CLI prints about the dashboard: URL, and how to get the access token."""
    url = info.get("dashboard_url")
    if not url:
        return ("Ray dashboard: none on this cluster (start the head with "
                "--include-dashboard=true): Train runs are not listed, and the placement "
                "groups of trials stopped early may leak (ray-project/ray#54305)")
    lines = [f"Ray dashboard: {url}"]
    if _token_auth():
        lines.append("  It asks for the cluster's access token: `ray get-auth-token` prints "
                     "it (stored in ~/.ray/auth_token); API clients send "
                     "'Authorization: Bearer <token>'.")
    if info.get("local") and dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(f"  Listening on {dashboard_host}: reachable from other machines.")
    return "\n".join(lines)


def check_shared_storage(exp: Path, timeout_s: float = 120.0) -> None:
    """On a multi-node cluster, refuse storage that some node does not see (a local disk
    instead of a shared filesystem): trials write there from whichever node runs them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = exp / f".storage-check-{uuid.uuid4().hex}"
    atomic_write_bytes(marker, b"ok")
    try:
        probe = ray.remote(num_cpus=0)(_path_exists)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(marker)) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        missing = [n.get("NodeManagerAddress", n["NodeID"]) for n, r in zip(nodes, refs,
                                                                            strict=True)
                   if r in ready and not ray.get(r)]
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        raise SpecError(f"storage: {exp.parent} is not visible from node(s) "
                        f"{', '.join(missing)}; mount a shared filesystem at the same path on "
                        "every node")


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def make_sink_callback(exp: Path, name_of: Any) -> Any:
    """A Tune callback (driver process) that records in status.json what only Tune knows:
    trials stopped early by the scheduler, and trials whose driver died."""
    from ray.tune import Callback

    class SinkCallback(Callback):
        def __init__(self) -> None:
            self.stopped_early: list[str] = []

        def _sink(self, trial: Any) -> tuple[str, TrialSink]:
            tid = name_of(trial)
            return tid, TrialSink(trial_dir(exp, tid))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                              **info: Any) -> None:
            tid, sink = self._sink(trial)
            if sink.status().get("status") in ("running", "pending", None):
                # A driver returns only after its workers wrote how the trial ended: this
                # one was stopped by the scheduler (ASHA).
                sink.update_status(status="terminated", stopped_early=True,
                                   ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                self.stopped_early.append(tid)

        def on_trial_error(self, iteration: int, trials: list, trial: Any,
                           **info: Any) -> None:
            _, sink = self._sink(trial)
            if sink.status().get("status") != "errored":
                sink.update_status(status="errored", error=_tune_error(trial),
                                   ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    return SinkCallback()


def _tune_error(trial: Any) -> str:
    try:
        text = Path(trial.error_file).read_text(encoding="utf-8", errors="replace")
    except Exception:
        return "the trial's Tune actor failed (no error file)"
    return _one_line(first_error_line(text) or "the trial's Tune actor failed")


def build_caches(spec: SweepSpec, exp: Path, cache_dir: str | None) -> None:
    """Build, before any trial starts, the shared stores the trials read (`sweeper.cache`:
    frozen-tower image features, decode-once images), one Ray task per set of stores (a GPU
    each when the trials use GPUs). Stores already built start no task. A failed build is
    only logged: each trial then builds the store itself (rank 0, under a file lock)."""
    import ray

    from sweeper import cache as C

    try:
        jobs = C.cache_jobs(spec, exp.parent, cache_dir)
        if not jobs:
            return
        print(f"Building {len(jobs)} shared cache(s) before the trials ...", flush=True)
        task = ray.remote(C.run_job).options(
            num_cpus=1, num_gpus=1 if spec.scaling.use_gpu else 0, max_retries=0)
        for out in ray.get([task.remote(j) for j in jobs]):
            log.info("cache: %s built in %.1fs on %s", out["kind"], out["seconds"],
                     out["device"])
    except Exception as e:  # the trials build what is missing themselves
        log.warning("cache: pre-trial build failed (%s); the trials will build it",
                    _one_line(str(e), 300))


def run_sweep(spec: SweepSpec, *, address: str | None = None, resume: bool = True,
              retry_errored: bool = False, cache_dir: str | None = None,
              dashboard_host: str = "127.0.0.1", verbose: int = 1) -> SweepResult:
    """Run (or continue) every trial of the spec with Ray Tune; write the report.

    Raises SpecError when the cluster can never hold one trial (nothing ran)."""
    import ray
    from ray import tune

    exp = experiment_dir(spec)
    result = SweepResult(exp)
    info = init_ray(address, dashboard_host)
    try:
        print(dashboard_banner(info, dashboard_host), flush=True)
        fit = check_fits(spec)
        if not info.get("local"):
            check_shared_storage(exp)
    except BaseException:
        if info.get("local"):
            ray.shutdown()
        raise
    concurrency = spec.scaling.max_concurrent_trials
    if concurrency > fit:
        note = (f"scaling.max_concurrent_trials: {concurrency} trials of "
                f"{trial_demand(spec.scaling)} do not fit the cluster at once; running "
                f"{fit} at a time")
        print(note, flush=True)
        result.notes.append(note)
        concurrency = fit
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if retry_errored:
            for t in trial_configs(spec):
                s = TrialSink(trial_dir(exp, t.trial_id))
                if s.status().get("status") == "errored":
                    s.update_status(status="pending", error=None, error_detail=None)
        build_caches(spec, exp, cache_dir)
        trainable = tune.with_resources(
            tune.with_parameters(trial_driver, spec_json=spec.model_dump_json(),
                                 experiment_dir=str(exp), cache_dir=cache_dir),
            {"cpu": DRIVER_CPU},
        )
        axes = grid_axes(spec)
        keys = list(axes)

        def name_of(trial: Any) -> str:
            return trial_id_for({k: trial.config[k] for k in keys})

        sink_cb = make_sink_callback(exp, name_of)
        tune_config = tune.TuneConfig(
            max_concurrent_trials=concurrency,
            trial_name_creator=name_of,
            trial_dirname_creator=name_of,
            scheduler=_scheduler(spec),
            reuse_actors=False,
        )
        callbacks = [sink_cb, *_logger_callbacks(spec, exp)]
        if resume and tune.Tuner.can_restore(str(exp)):
            tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True,
                                       restart_errored=retry_errored)
            # This run's concurrency, scheduler and callbacks, not the first run's (Ray 2.60
            # keeps them on the restored TunerInternal).
            inner = tuner._local_tuner
            inner._tune_config = tune_config
            inner._run_config.callbacks = callbacks
            inner._run_config.verbose = verbose
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={k: tune.grid_search(v) for k, v in axes.items()},
                tune_config=tune_config,
                run_config=tune.RunConfig(name=spec.name, storage_path=str(exp.parent),
                                          callbacks=callbacks, verbose=verbose),
            )
        _install_interrupt_handlers(result)
        tuner.fit()
        result.stopped_early = list(sink_cb.stopped_early)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            _collect(spec, result)
            _write_report(result)
        finally:
            if info.get("local") and ray.is_initialized():
                ray.shutdown()
    return result


def _install_interrupt_handlers(result: SweepResult) -> None:
    """First Ctrl-C (or SIGTERM, what schedulers and `kill` send): let Tune stop the trials
    and save the experiment state (through its SIGUSR1 handler), then exit 128 + signal. A
    second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    def on_signal(signum: int, frame: Any) -> None:
        result.interrupted = True
        result.signal_number = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.default_int_handler)
        if not callable(signal.getsignal(signal.SIGUSR1)):  # Tune's loop has not started
            raise KeyboardInterrupt
        print(f"\nInterrupted ({signal.Signals(signum).name}): stopping the trials and saving "
              "the experiment state (Ctrl-C again to quit at once) ...", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)


def _scheduler(spec: SweepSpec) -> Any:
    if spec.tune.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(metric="val_top1", mode="max", time_attr="training_iteration",
                             grace_period=spec.tune.grace_period,
                             reduction_factor=spec.tune.reduction_factor,
                             max_t=spec.tune.max_t)
    return None


def _write_report(result: SweepResult) -> None:
    try:
        from analysis.report import write_report

        result.report_paths = write_report(result.experiment_dir)
    except Exception as e:  # the sweep's results stay on disk; say why no report
        log.error("report failed: %s", e)


def _collect(spec: SweepSpec, result: SweepResult) -> None:
    for t in trial_configs(spec):
        st = TrialSink(trial_dir(result.experiment_dir, t.trial_id)).status()
        status = st.get("status") or "pending"
        result.statuses[t.trial_id] = status
        if status == "errored":
            result.errors[t.trial_id] = str(st.get("error") or "").splitlines()[0][:300] \
                if st.get("error") else "errored"
        elif status not in FINISHED and not result.interrupted:
            result.errors[t.trial_id] = f"did not finish (status {status})"


def _logger_callbacks(spec: SweepSpec, exp: Path) -> list[Any]:
    out: list[Any] = []
    for name in spec.loggers:
        if name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        elif name == "csv":
            from ray.tune.logger import CSVLoggerCallback

            out.append(CSVLoggerCallback())
        elif name == "json":
            from ray.tune.logger import JsonLoggerCallback

            out.append(JsonLoggerCallback())
        elif name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            # MLFLOW_TRACKING_URI (a server, sqlite:///...) when set; else a file store in
            # the experiment, which works offline (MLflow 3 wants an explicit opt-in for
            # it) and which `mlflow ui --backend-store-uri <experiment>/mlruns` reads.
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (exp / "mlruns").as_uri()
            out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=spec.name))
        elif name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            offline = not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ
            if offline:
                os.environ["WANDB_MODE"] = "offline"  # `wandb sync` uploads later
            out.append(WandbLoggerCallback(project=spec.name,
                                           **({"mode": "offline"} if offline else {})))
    return out


def remove_experiment(exp: Path) -> None:
    """Delete an experiment folder (used by tests and `--new` clean-ups)."""
    shutil.rmtree(exp, ignore_errors=True)
