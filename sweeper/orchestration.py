"""Everything Ray: the Tuner over the grid, the per-trial driver that runs a `TorchTrainer`,
resume, the cluster checks, and the Ray-side context given to the worker loop.

The rest of sweeper never imports Ray; the resource arithmetic is `sweeper.resources`, the
experiment folder's rules `sweeper.experiment`, and Ray's private APIs `sweeper.ray_compat`.

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

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sweeper import ray_compat, search
from sweeper.checkpoint import checkpoint_upload, prune_finished, strip_older_optimizers
from sweeper.console import dashboard_banner, trial_ending
from sweeper.experiment import (
    FINISHED,
    SweepResult,
    collect,
    experiment_dir,
    reset_errored,
    supersede_lost,
)
from sweeper.preflight import cluster_address
from sweeper.prepare import node_local_model, publish_models
from sweeper.resources import DRIVER_CPU, check_fits, fmt_res, trial_demand, worker_resources
from sweeper.sink import TrialSink, first_error_line, trial_dir
from sweeper.spec import ScalingSpec, SpecError, SweepSpec, TrialConfig
from sweeper.storage import Location, mirror_dir, resolve
from sweeper.trials import resolve_trial

log = logging.getLogger(__name__)

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
PREEMPTION_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
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


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


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
    cache_dir = config.get("cache_dir")
    remote: Location | None = config.get("trial_location")
    # On a bucket the worker keeps its files in a node-local copy of the trial folder
    # (the sink uploads each one whole); the model too, if another node built it.
    tdir = mirror_dir(remote, cache_dir) if remote else Path(config["trial_dir"])
    if remote:
        cfg = node_local_model(cfg, remote.parent.parent.parent, cache_dir)
    sink = TrialSink(tdir, remote)
    if ckpt is None and rank == 0:
        # A start without a checkpoint trains from step 0: drop the rows of an earlier
        # attempt that was killed before its first checkpoint was registered, so that the
        # history holds every step once (a resume truncates after its checkpoint's step).
        sink.truncate_after(-1)
    # Where each rank runs (node, host, pid): read by people and by the fault-injection
    # tests; rewritten by every start of the worker group.
    sink.write_json(f"nodes/{rank}.json", {
        "rank": rank, "world_size": tctx.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(), "pid": os.getpid(),
        "resumed_from_checkpoint": ckpt is not None,
        "checkpoint": ckpt.path if ckpt is not None else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })

    upload = checkpoint_upload(cfg.checkpoint.upload, str(tdir))  # "sync" or "async"
    persisted: list[Any] = [ckpt] if ckpt else []  # in storage, oldest first

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        # An asynchronous upload copies the folder in a thread and deletes it when done.
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode[upload.upper()])
        if checkpoint is not None:
            strip_older_optimizers(persisted, ray.train.get_checkpoint())

    ctx = WorkerContext(
        rank=rank,
        world_size=tctx.get_world_size(),
        device=ray.train.torch.get_device(),
        trial_dir=tdir,
        remote=remote,
        report=report,
        cache_dir=Path(cache_dir) if cache_dir else None,
        local_world_size=tctx.get_local_world_size(),
        report_takes_checkpoint=upload == "async",
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

            free = fmt_res({k: v for k, v in ray.available_resources().items()
                             if k in worker_resources(sc) or k == "CPU"})
            total = fmt_res({k: v for k, v in ray.cluster_resources().items()
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


def trial_driver(config: dict[str, Any], *, spec_json: str,
                 experiment_dir: str | Location, cache_dir: str | None,
                 model_paths: dict[str, str], verbose: int = 1) -> None:
    """One Tune trial: resolve its config (its model resolved before the sweep, in
    `model_paths`), run its TorchTrainer, record how it ended. `experiment_dir`: a local
    path or the experiment's Location (a bucket folder). Below `verbose` 2, Ray Train's own
    INFO lines (state transitions, worker-group starts, each checkpoint) stay in its log
    files under the Ray session and off the console."""
    import ray.train
    from ray import tune

    spec = SweepSpec.model_validate_json(spec_json)
    point = search.point_of(spec, config)
    exp = experiment_dir if isinstance(experiment_dir, Location) else resolve(experiment_dir)
    sampled = not search.known_up_front(spec)
    # A sampled trial's name holds the searcher's index, which only Tune's trial knows.
    name = tune.get_context().get_trial_name() if sampled else search.trial_name(point)
    cfg = resolve_trial(spec, point, model_paths, trial_id=name)
    if sampled:
        for lost in supersede_lost(exp, name):
            log.warning("trial %s replaces %s, a proposal of a killed run that Tune's "
                        "saved state did not hold", name, lost)
    tdir = trial_dir(exp, cfg.trial_id)
    sink = TrialSink.at(tdir)
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
    session = ray_compat.tune_session()
    sc = cfg.scaling
    # Bounded start: Ray Train would otherwise wait for workers forever.
    os.environ[START_TIMEOUT_ENV] = f"{sc.worker_start_timeout_s:g}"
    trainer = ray_compat.lean_torch_trainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"trial": cfg.model_dump(mode="json"), "trial_dir": str(tdir),
                           "trial_location": tdir if tdir.remote else None,
                           "cache_dir": cache_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=worker_resources(sc),
            placement_strategy=sc.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.trial_id,
            # Checkpoints in the trial's folder, on the experiment's filesystem (None:
            # local); Train V2 restores the latest one from there on a restart or rerun.
            storage_path=(exp / "trials").fs_path,
            storage_filesystem=exp.fs,
            callbacks=[ray_compat.tune_report_callback()],
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose >= 2
                                                   else "WARNING"),
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
        result = trainer.fit()
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
    if sink.status().get("status") in FINISHED:
        prune_finished(result.best_checkpoints or [], cfg.checkpoint.keep)


def _tune_is_stopping(session: Any) -> bool:
    """Whether Tune has asked the trial of `session` to stop: Trainable.stop() sets the
    session's stop event, then shuts the session down (so it is captured up front)."""
    if session is None:
        return False
    event = getattr(session, "stop_event", None)
    return bool(event is not None and event.is_set()) or ray_compat.tune_session() is not session


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None, dashboard_host: str = "127.0.0.1",
             verbose: int = 1) -> dict[str, Any]:
    """Join a cluster (`address`, or RAY_ADDRESS) or start a local one with its dashboard
    bound to `dashboard_host` (loopback unless told otherwise). Below `verbose` 2 every Ray
    process of the sweep drops the known-harmless messages (`sweeper.console`).

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
    quiet: dict[str, Any] = {}
    if verbose < 2:
        quiet = {"logging_level": logging.WARNING}  # the CLI prints its own dashboard line
        setup_hook = {"worker_process_setup_hook": "sweeper.console.quiet_process"}
    else:
        setup_hook = {}
    if address:
        import sweeper

        try:
            if "://" not in address:
                address = ray_compat.canonical_address(address)
                env_vars["RAY_ADDRESS"] = address
            # Ship this package to every node, so that all of them run the same sweeper
            # code (its dependencies must be installed there).
            env = {"env_vars": env_vars, **setup_hook,
                   "py_modules": [str(Path(sweeper.__file__).parent)]}
            ctx = ray.init(address=address, runtime_env=env, log_to_driver=True, **quiet)
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
        # No node of a local Ray is ever preempted: its watcher would be one more process
        # per trial (and a line of noise).
        env_vars.setdefault(PREEMPTION_ENV, os.environ.get(PREEMPTION_ENV, "0"))
        # address="local": a new Ray of our own even when `ray start` left a cluster address
        # in /tmp/ray (ray.init() would join that one).
        ctx = ray.init(address="local", include_dashboard=True, dashboard_host=dashboard_host,
                       dashboard_port=port, runtime_env={"env_vars": env_vars, **setup_hook},
                       log_to_driver=True, **quiet)
        local = True
    url = getattr(ctx, "dashboard_url", None)
    return {"dashboard_url": f"http://{url}" if url and "://" not in url else url,
            "local": local}


def check_shared_storage(exp: Location, timeout_s: float = 120.0) -> None:
    """On a multi-node cluster, refuse storage that some node does not see (a local disk
    instead of a shared filesystem, a bucket without credentials on that node): trials
    write there from whichever node runs them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = exp / f".storage-check-{uuid.uuid4().hex}"
    marker.write_bytes(b"ok")
    try:
        probe = ray.remote(num_cpus=0)(_exists)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(marker) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        missing = [n.get("NodeManagerAddress", n["NodeID"]) for n, r in zip(nodes, refs,
                                                                            strict=True)
                   if r in ready and not ray.get(r)]
    finally:
        marker.delete()
    if missing:
        fix = ("give every node credentials that may read and write it" if exp.remote else
               "mount a shared filesystem at the same path on every node")
        raise SpecError(f"storage: {exp.parent} is not visible from node(s) "
                        f"{', '.join(missing)}; {fix}")


def _exists(location: Location) -> bool:
    try:
        return location.exists()
    except OSError:  # no credentials or no route on that node
        return False


def make_sink_callback(exp: Location | Path, name_of: Any, echo: bool = False) -> Any:
    """A Tune callback (driver process) that records in status.json what only Tune knows:
    trials stopped early by the scheduler, and trials whose driver died. With `echo` it
    prints one line when a trial starts and one when it ends (its val top-1, or the first
    line of its error)."""
    from ray.tune import Callback

    def say(line: str) -> None:
        if echo:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    class SinkCallback(Callback):
        def __init__(self) -> None:
            self.stopped_early: list[str] = []

        def _sink(self, trial: Any) -> tuple[str, TrialSink]:
            tid = name_of(trial)
            return tid, TrialSink.at(trial_dir(exp, tid))

        def on_trial_start(self, iteration: int, trials: list, trial: Any,
                           **info: Any) -> None:
            say(f"trial {name_of(trial)} started")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                              **info: Any) -> None:
            tid, sink = self._sink(trial)
            st = sink.status()
            if st.get("status") in ("running", "pending", None):
                # A driver returns only after its workers wrote how the trial ended: this
                # one was stopped by the scheduler (ASHA).
                st = sink.update_status(status="terminated", stopped_early=True,
                                        ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                self.stopped_early.append(tid)
            say(f"trial {tid} {trial_ending(st, trial.last_result or {})}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any,
                           **info: Any) -> None:
            tid, sink = self._sink(trial)
            st = sink.status()
            if st.get("status") != "errored":
                st = sink.update_status(status="errored", error=_tune_error(trial),
                                        ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            say(f"trial {tid} errored: {first_error_line(st.get('error')) or '?'}")

    return SinkCallback()


def _progress_reporter(spec: SweepSpec, verbose: int) -> Any:
    """At `verbose` 1, Tune's legacy status table every two minutes (and at the end), with the
    axes that vary and a few metrics, instead of the new engine's per-trial boxes."""
    if verbose != 1:
        return None
    from ray.tune import CLIReporter

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new engine ignores reporters
    varying = search.varying(spec)
    return CLIReporter(parameter_columns=varying or None,
                       metric_columns={"step": "step", "train_loss": "loss",
                                       "val_top1": "val_top1"},
                       max_report_frequency=120, max_progress_rows=20, sort_by_metric=False)


def _tune_error(trial: Any) -> str:
    try:
        text = Path(trial.error_file).read_text(encoding="utf-8", errors="replace")
    except Exception:
        return "the trial's Tune actor failed (no error file)"
    return _one_line(first_error_line(text) or "the trial's Tune actor failed")


def build_caches(spec: SweepSpec, exp: Location, cache_dir: str | None,
                 model_paths: dict[str, str]) -> None:
    """Build, before any trial starts, the shared stores the trials read (`sweeper.cache`:
    frozen-tower image features, decode-once images), one Ray task per set of stores (a GPU
    each when the trials use GPUs). Stores already built start no task. A failed build is
    only logged: each trial then builds the store itself (rank 0, under a file lock)."""
    import ray

    from sweeper import cache as C

    try:
        # Stores are memory-mapped: on a bucket they live in each node's local mirror,
        # and are uploaded to <storage>/.cache for the other nodes to copy.
        storage = exp.parent
        jobs = C.cache_jobs(spec, mirror_dir(storage, cache_dir), model_paths, cache_dir,
                            remote=storage / ".cache" if storage.remote else None)
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
              dashboard_host: str = "127.0.0.1", verbose: int = 1,
              model_paths: dict[str, str] | None = None) -> SweepResult:
    """Run (or continue) every trial of the spec with Ray Tune. `model_paths`: the
    checkpoint directory of each model (`sweeper.prepare.prepare_inputs`, which runs here
    when not given).

    Raises SpecError when the cluster can never hold one trial (nothing ran)."""
    import ray
    from ray import tune

    from sweeper.prepare import prepare_inputs

    if model_paths is None:
        model_paths = prepare_inputs(spec, cache_dir, announce=False)

    exp = experiment_dir(spec)
    if exp.remote:  # nodes without the preset models copy them from the bucket
        publish_models(spec, model_paths, exp.parent)
    result = SweepResult(exp)
    info = init_ray(address, dashboard_host, verbose)
    try:
        print(dashboard_banner(info, dashboard_host, ray_compat.token_auth_enabled()), flush=True)
        fit = check_fits(spec, cluster_nodes())
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
            reset_errored(spec, exp)
        build_caches(spec, exp, cache_dir, model_paths)
        trainable = tune.with_resources(
            tune.with_parameters(trial_driver, spec_json=spec.model_dump_json(),
                                 experiment_dir=exp, cache_dir=cache_dir,
                                 model_paths=model_paths, verbose=verbose),
            {"cpu": DRIVER_CPU},
        )
        def name_of(trial: Any) -> str:
            return search.tune_trial_name(spec, trial.config, trial.experiment_tag)

        sink_cb = make_sink_callback(exp, name_of, echo=verbose == 1)
        # MLflow's file store needs a local folder: the node-local mirror of a bucket.
        callbacks = [sink_cb, *_logger_callbacks(spec, mirror_dir(exp, cache_dir))]
        tuner = build_tuner(spec, trainable, exp, name_of, concurrency, callbacks, verbose,
                            resume=resume, retry_errored=retry_errored)
        _install_interrupt_handlers(result)
        tuner.fit()
        result.stopped_early = list(sink_cb.stopped_early)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            collect(spec, result)
        finally:
            if info.get("local") and ray.is_initialized():
                ray.shutdown()
    return result


def build_tuner(spec: SweepSpec, trainable: Any, exp: Location, name_of: Any,
                concurrency: int, callbacks: list[Any], verbose: int, *, resume: bool = True,
                retry_errored: bool = False) -> Any:
    """The sweep's Tuner: a new one over the search space (`sweeper.search`: Tune's
    param_space, search algorithm and number of samples), or, when the experiment has
    Tune's saved state and `resume`, `Tuner.restore`d from it (its trials, and the search
    algorithm's state: the draws made, the Optuna study) with this run's concurrency,
    scheduler and callbacks."""
    from ray import tune

    reporter = _progress_reporter(spec, verbose)
    tune_config = tune.TuneConfig(
        # The search algorithm limits the trials at once (sweeper.search.search_algorithm).
        search_alg=search.search_algorithm(spec, concurrency),
        num_samples=search.num_samples(spec),
        trial_name_creator=name_of,
        trial_dirname_creator=name_of,
        scheduler=search.scheduler(spec),
        reuse_actors=reuses_actors(spec),
    )
    if resume and tune.Tuner.can_restore(exp.fs_path, storage_filesystem=exp.fs):
        tuner = tune.Tuner.restore(exp.fs_path, trainable, resume_unfinished=True,
                                   restart_errored=retry_errored, storage_filesystem=exp.fs)
        # This run's concurrency, scheduler and callbacks, not the first run's (Ray 2.60
        # keeps them on the restored TunerInternal); Tune restores the search algorithm's
        # state into this run's.
        ray_compat.set_restored_tuner_config(tuner, tune_config, callbacks, verbose, reporter)
        return tuner
    return tune.Tuner(
        trainable,
        param_space=search.param_space(spec),
        tune_config=tune_config,
        run_config=tune.RunConfig(name=spec.name, storage_path=exp.parent.fs_path,
                                  storage_filesystem=exp.fs, callbacks=callbacks,
                                  verbose=verbose, progress_reporter=reporter),
    )


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


def reuses_actors(spec: SweepSpec) -> bool:
    """Whether the next trial runs in a finished one's Tune actor (its imports and report
    queue kept). Not with early stopping: a trial ASHA stops would go on training in the
    cached actor until the actor is reused."""
    return spec.tune.reuse_actors and spec.tune.scheduler == "fifo"


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
