"""Everything Ray: the Tuner over the grid, the per-trial driver that runs a `TorchTrainer`,
the resource math, resume, and the Ray-side context given to the worker loop.

Ray Train V2 does not take a `TorchTrainer` inside a `Tuner`; the documented pattern is a
Tune function trainable (the *driver*) that builds a `TorchTrainer` and calls `fit()` with
`TuneReportCallback`, which forwards rank 0's metrics to Tune. The driver holds a
negligible CPU share and no GPU, so trials never hold the CPUs their workers need.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.sink import TrialSink, atomic_write_bytes, atomic_write_json, read_json, trial_dir
from sweeper.spec import (
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


# --------------------------------------------------------------------------- worker side


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on every worker: build the Ray-free context, run the loop."""
    import ray.train
    import ray.train.torch

    from sweeper.worker import WorkerContext, run_trial

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sweeper").setLevel(logging.INFO)
    cfg = TrialConfig.model_validate(config["trial"])
    tctx = ray.train.get_context()
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    ctx = WorkerContext(
        rank=tctx.get_world_rank(),
        world_size=tctx.get_world_size(),
        device=ray.train.torch.get_device(),
        trial_dir=Path(config["trial_dir"]),
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


def _last_metrics(sink: TrialSink) -> dict[str, Any]:
    hist = [r for r in sink.history() if r.get("val_top1") is not None]
    return {k: v for k, v in (hist[-1] if hist else {}).items() if not isinstance(v, dict)}


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
    previous = sink.status().get("status")
    if previous in FINISHED:
        # Finished in an earlier run of this experiment: keep its results, train nothing.
        tune.report({**_last_metrics(sink), "resumed_finished": True})
        return
    sink.write_config(cfg.model_dump(mode="json"))
    sc = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": cfg.model_dump(mode="json"), "trial_dir": str(tdir),
                           "cache_dir": cache_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=sc.resources_per_worker,
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
                controller_failure_limit=max(1, sc.max_failures),
            ),
        ),
    )
    try:
        trainer.fit()
    except BaseException as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        sink.update_status(status="errored", error=f"{type(e).__name__}: {msg}"[:2000],
                           ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        raise


# --------------------------------------------------------------------------- experiment


@dataclass
class SweepResult:
    """How a sweep ended, for the CLI's exit status and summary."""

    experiment_dir: Path
    statuses: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    report_paths: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.errors else 0


def experiment_dir(spec: SweepSpec) -> Path:
    """`<storage>/<name>`, absolute (Tune needs absolute storage paths)."""
    return Path(spec.storage).expanduser().resolve() / spec.name


def prepare_experiment(spec: SweepSpec, spec_text: str | None, new: bool) -> SweepSpec:
    """Create or reopen the experiment folder, refusing a changed spec unless `new`.

    With `new`, an existing experiment of another spec keeps its folder and the new one
    gets a suffixed name (`name-2`, `name-3`, ...)."""
    fp = spec_fingerprint(spec)
    base = spec.name
    k = 1
    while True:
        exp = experiment_dir(spec)
        old = read_json(exp / "sweep.json")
        if old is None or old.get("fingerprint") == fp:
            break
        if not new:
            raise SpecError(
                f"name: experiment {exp} exists with a different spec (fingerprint "
                f"{old.get('fingerprint')} != {fp}); pass --new to start another beside it")
        k += 1
        spec = spec.model_copy(update={"name": f"{base}-{k}"})
    trials = trial_configs(spec)
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        raise SpecError("grid: two grid points map to the same trial name")
    exp.mkdir(parents=True, exist_ok=True)
    if old is None:
        atomic_write_json(exp / "sweep.json", {
            "name": spec.name,
            "fingerprint": fp,
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


def init_ray(address: str | None, dashboard_host: str = "127.0.0.1") -> dict[str, Any]:
    """Join a cluster (`address`, or RAY_ADDRESS) or start a local one with its dashboard
    bound to `dashboard_host` (loopback unless told otherwise)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    env = {"env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}}
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return {"dashboard_url": None, "local": False}
    if address:
        ctx = ray.init(address=address, runtime_env=env, log_to_driver=True)
        local = False
    else:
        ctx = ray.init(include_dashboard=True, dashboard_host=dashboard_host,
                       dashboard_port=_free_port(), runtime_env=env, log_to_driver=True)
        local = True
    url = getattr(ctx, "dashboard_url", None)
    return {"dashboard_url": f"http://{url}" if url and "://" not in url else url,
            "local": local}


def check_fits(spec: SweepSpec) -> None:
    """Refuse up front a trial that can never fit the cluster (workers + driver)."""
    import ray

    sc = spec.scaling
    per = dict(sc.resources_per_worker or {})
    per.setdefault("CPU", 1.0)
    if sc.use_gpu:
        per.setdefault("GPU", 1.0)
    need = {k: v * sc.num_workers for k, v in per.items()}
    need["CPU"] = need.get("CPU", 0) + DRIVER_CPU
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if have.get(k, 0) + 1e-9 < v}
    if short:
        asked = ", ".join(f"{k}={v:g}" for k, v in sorted(need.items()))
        got = ", ".join(f"{k}={have.get(k, 0):g}" for k in sorted(need))
        raise SpecError(f"scaling: one trial needs {asked} but the cluster has {got}")


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
                    " ".join(str(e).split())[:300])


def run_sweep(spec: SweepSpec, *, address: str | None = None, resume: bool = True,
              retry_errored: bool = False, cache_dir: str | None = None,
              dashboard_host: str = "127.0.0.1", verbose: int = 1) -> SweepResult:
    """Run (or continue) every trial of the spec with Ray Tune; write the report."""
    import ray
    from ray import tune

    exp = experiment_dir(spec)
    info = init_ray(address, dashboard_host)
    if info["dashboard_url"]:
        print(f"Ray dashboard: {info['dashboard_url']}  (token: `ray get-auth-token`)",
              flush=True)
    check_fits(spec)
    if retry_errored:
        for t in trial_configs(spec):
            s = TrialSink(trial_dir(exp, t.trial_id))
            if s.status().get("status") == "errored":
                s.update_status(status="pending", error=None)
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

    scheduler = None
    if spec.tune.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(metric="val_top1", mode="max", time_attr="training_iteration",
                                  grace_period=spec.tune.grace_period,
                                  reduction_factor=spec.tune.reduction_factor)
    result = SweepResult(exp)
    try:
        if resume and tune.Tuner.can_restore(str(exp)):
            tuner = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True,
                                       restart_errored=retry_errored)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={k: tune.grid_search(v) for k, v in axes.items()},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=spec.scaling.max_concurrent_trials,
                    trial_name_creator=name_of,
                    trial_dirname_creator=name_of,
                    scheduler=scheduler,
                ),
                run_config=tune.RunConfig(
                    name=spec.name,
                    storage_path=str(exp.parent),
                    callbacks=_logger_callbacks(spec, exp),
                    verbose=verbose,
                ),
            )
        tuner.fit()
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        _collect(spec, result)
        try:
            from analysis.report import write_report

            result.report_paths = write_report(exp)
        except Exception as e:  # the sweep's results stay on disk; say why no report
            log.error("report failed: %s", e)
        if info.get("local") and ray.is_initialized():
            ray.shutdown()
    return result


def _collect(spec: SweepSpec, result: SweepResult) -> None:
    for t in trial_configs(spec):
        st = TrialSink(trial_dir(result.experiment_dir, t.trial_id)).status()
        status = st.get("status", "pending")
        result.statuses[t.trial_id] = status
        if status == "errored":
            result.errors[t.trial_id] = str(st.get("error") or "").splitlines()[0][:300]


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

            out.append(MLflowLoggerCallback(tracking_uri=f"file://{exp / 'mlruns'}",
                                            experiment_name=spec.name))
        elif name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            out.append(WandbLoggerCallback(project=spec.name))
    return out


def remove_experiment(exp: Path) -> None:
    """Delete an experiment folder (used by tests and `--new` clean-ups)."""
    shutil.rmtree(exp, ignore_errors=True)
