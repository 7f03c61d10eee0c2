"""Orchestration without a Ray cluster: resource math, up-front refusals (exit 2, one line),
experiment reuse and `--new`, failure messages. The Ray sweeps are in test_cluster.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sweeper.experiment import prepare_experiment
from sweeper.orchestration import describe_failure, reuses_actors
from sweeper.preflight import preflight
from sweeper.resources import DRIVER_CPU, check_fits, local_nodes, trials_at_once, worker_resources
from sweeper.spec import ScalingSpec, SpecError, SweepSpec, validate
from sweeper.storage import resolve
from sweeper.trials import trial_configs
from tests.conftest import base_doc

ROOT = Path(__file__).resolve().parents[1]


def scaling(**kw: object) -> ScalingSpec:
    return ScalingSpec.model_validate(kw)


def cli(spec: Path, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "sweeper.run", str(spec), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def write(tmp_path: Path, doc: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


# --------------------------------------------------------------------------- resources


def test_default_worker_leaves_room_for_its_driver() -> None:
    assert worker_resources(scaling()) == {"CPU": 1 - DRIVER_CPU}
    # Two one-worker trials and their drivers fill two CPUs exactly.
    assert trials_at_once(scaling(), [{"CPU": 2.0}]) == 2
    # A 2-worker trial fits a 2-CPU machine, driver included.
    assert trials_at_once(scaling(num_workers=2), [{"CPU": 2.0}]) == 1
    # Spread over two 1-CPU nodes: one worker on each, the driver beside one of them.
    assert trials_at_once(scaling(num_workers=2, placement_strategy="SPREAD"),
                          [{"CPU": 1.0}, {"CPU": 1.0}]) == 1
    assert trials_at_once(scaling(num_workers=16), [{"CPU": 16.0}]) == 1


def test_gpu_workers_fractional_and_strategies() -> None:
    gpu = scaling(use_gpu=True)
    assert worker_resources(gpu) == {"GPU": 1.0}  # Ray Train's default: no CPU
    quarter = scaling(use_gpu=True, resources_per_worker={"GPU": 0.25, "CPU": 1})
    assert worker_resources(quarter) == {"GPU": 0.25, "CPU": 1.0}
    node = {"CPU": 8.0, "GPU": 1.0}
    assert trials_at_once(quarter, [node]) == 4  # four small trials share one GPU
    assert trials_at_once(gpu, [node]) == 1
    # STRICT_PACK needs the whole trial on one node; STRICT_SPREAD one worker per node.
    two_small = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert trials_at_once(scaling(num_workers=2, placement_strategy="STRICT_PACK"),
                          two_small) == 0
    assert trials_at_once(scaling(num_workers=2, placement_strategy="STRICT_SPREAD"),
                          [{"CPU": 4.0}, {"CPU": 4.0}]) == 4
    assert trials_at_once(scaling(num_workers=3, placement_strategy="STRICT_SPREAD"),
                          [{"CPU": 4.0}, {"CPU": 4.0}]) == 0
    # A custom resource no node has.
    assert trials_at_once(scaling(resources_per_worker={"CPU": 1, "tpu_v9": 1}),
                          [{"CPU": 8.0}]) == 0


def test_tune_actors_are_reused_by_default_but_not_under_asha(tmp_path: Path) -> None:
    def spec(**tune: object) -> SweepSpec:
        return validate({**base_doc(tmp_path), "tune": tune})

    assert reuses_actors(spec())
    assert not reuses_actors(spec(reuse_actors=False))
    # A trial ASHA stops would go on training in a cached actor.
    assert not reuses_actors(spec(scheduler="asha"))
    assert not reuses_actors(spec(scheduler="asha", reuse_actors=True))


def test_check_fits_message_names_demand_and_cluster(tmp_path: Path) -> None:
    spec = validate(base_doc(tmp_path, scaling={"num_workers": 4}))
    with pytest.raises(SpecError) as e:
        check_fits(spec, [{"CPU": 2.0}, {"CPU": 1.0}])
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("scaling: one trial needs 4 x {CPU: 0.99} (PACK)")
    assert "cluster has {CPU: 3} (2 nodes, largest {CPU: 2})" in msg
    assert check_fits(spec, [{"CPU": 8.0}]) == 2


def test_local_nodes_counts_this_machine() -> None:
    (node,) = local_nodes()
    assert node["CPU"] >= 1 and node["memory"] > 0


def test_preflight_refusals(tmp_path: Path) -> None:
    def refused(**over: object) -> str:
        doc = base_doc(tmp_path)
        for k, v in over.items():
            doc[k] = v
        with pytest.raises(SpecError) as e:
            preflight(validate(doc))
        assert "\n" not in str(e.value)
        return str(e.value)

    # Buckets are storage too (their refusals are in test_storage.py); unknown schemes not.
    assert refused(storage="nosuch://b/r").startswith("storage: 'nosuch://b/r': no pyarrow")
    assert refused(scaling={"resources_per_worker": {"CPU": -1}}).startswith(
        "scaling.resources_per_worker.CPU: must be >= 0")
    assert refused(scaling={"resources_per_worker": {"GPU": 1}}).startswith(
        "scaling.resources_per_worker.GPU: reserves GPUs")
    assert refused(scaling={"use_gpu": True, "num_workers": 2,
                            "resources_per_worker": {"GPU": 0.5}}).startswith(
        "scaling.resources_per_worker.GPU: 0.5 of a GPU per worker")
    assert refused(tune={"scheduler": "asha", "grace_period": 5, "max_t": 2}).startswith(
        "tune.grace_period")
    # A local run: this machine has no `tpu_v9`.
    assert "tpu_v9" in refused(scaling={"resources_per_worker": {"CPU": 1, "tpu_v9": 1}})
    # A cluster run is checked against the cluster after joining, not this machine.
    doc = base_doc(tmp_path, scaling={"resources_per_worker": {"CPU": 1, "tpu_v9": 1}})
    preflight(validate(doc), address="10.0.0.1:6379")
    assert resolve("file:///tmp/x").local == Path("/tmp/x")


@pytest.mark.parametrize("logger,package", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_logger_package_is_refused(tmp_path: Path, logger: str, package: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))
    doc = base_doc(tmp_path, loggers=["tensorboard", logger])
    with pytest.raises(SpecError, match=rf"^loggers\[1\]: {logger} needs the '{package}'"):
        preflight(validate(doc))


def test_cli_refuses_what_cannot_fit_in_one_line(tmp_path: Path) -> None:
    """Exit 2, one line, before any model or data work and without starting Ray."""
    doc = base_doc(tmp_path, scaling={"num_workers": 1, "resources_per_worker": {"CPU": 64}})
    r = cli(write(tmp_path, doc))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: scaling: one trial needs 1 x {CPU: 64} (PACK)")
    assert "but the cluster has {CPU: " in lines[0]
    assert "Preparing" not in r.stdout and "Ray" not in r.stdout
    assert not (tmp_path / "results").exists()


def test_cli_refuses_unknown_storage_scheme(tmp_path: Path) -> None:
    r = cli(write(tmp_path, base_doc(tmp_path)), "--storage", "nosuch://bucket/sweeps")
    assert r.returncode == 2
    assert r.stderr.startswith("error: storage: 'nosuch://bucket/sweeps': no pyarrow or "
                               "fsspec filesystem for nosuch://")
    assert len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- experiments


def test_changed_spec_is_refused_unless_new(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    spec = validate(doc)
    assert prepare_experiment(spec, "text", new=False).name == "t"
    exp = tmp_path / "results" / "t"
    assert (exp / "sweep.json").exists() and (exp / "spec.yaml").read_text() == "text"
    # Same spec: reopened as it is.
    assert prepare_experiment(spec, None, new=False).name == "t"
    # A changed learning rate computes other trials: refused, naming the key.
    changed = validate({**doc, "train": {"epochs": 1, "lr": 3e-4}})
    with pytest.raises(SpecError) as e:
        prepare_experiment(changed, None, new=False)
    assert str(e.value).startswith(f"name: experiment {exp} exists with a different spec "
                                   "(train.lr: 0.001 -> 0.0003)")
    # --new: a suffixed experiment beside it, then reopened by the same --new.
    assert prepare_experiment(changed, None, new=True).name == "t-2"
    assert prepare_experiment(changed, None, new=True).name == "t-2"
    assert (tmp_path / "results" / "t-2" / "sweep.json").exists()
    third = validate({**doc, "train": {"epochs": 2, "lr": 1e-3}})
    assert prepare_experiment(third, None, new=True).name == "t-3"
    # Where and how fast trials run may change: the experiment resumes as it is.
    moved = validate({**doc, "scaling": {"num_workers": 1, "max_concurrent_trials": 4,
                                         "max_failures": 3, "resources_per_worker": {"CPU": 2},
                                         "placement_strategy": "SPREAD",
                                         "worker_start_timeout_s": 30},
                      "loggers": ["tensorboard"]})
    assert prepare_experiment(moved, None, new=False).name == "t"
    # The number of workers changes the per-worker batch: refused.
    with pytest.raises(SpecError, match=r"scaling.num_workers: 1 -> 2"):
        prepare_experiment(validate({**doc, "scaling": {"num_workers": 2}}), None, new=False)


def test_resume_needs_an_experiment(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^name: no experiment .* to resume"):
        prepare_experiment(validate(base_doc(tmp_path)), None, new=False, resume=True)


def test_cli_changed_spec_exit_2(tmp_path: Path, cache_dir: Path) -> None:
    doc = base_doc(tmp_path)
    prepare_experiment(validate(doc), None, new=False)
    doc["train"]["lr"] = 5e-4
    spec = write(tmp_path, doc)
    # A dry run refuses what the run refuses, with the same line (issue 13: one validator).
    dry = cli(spec, "--dry-run")
    r = cli(spec, "--cache-dir", str(cache_dir), timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.splitlines()[-1].startswith(
        "error: name: experiment ") and "(train.lr: 0.001 -> 0.0005)" in r.stderr
    assert dry.returncode == 2 and dry.stderr.splitlines() == r.stderr.splitlines()[-1:]
    assert not (tmp_path / "results" / "t" / "trials").exists()
    assert cli(spec, "--dry-run", "--new").returncode == 0


# --------------------------------------------------------------------------- messages


def test_describe_failure_digs_out_the_worker_error() -> None:
    sc = scaling()
    inner = IsADirectoryError(21, "Is a directory")
    # Stands in for a RayTaskError: the remote traceback as text, the exception as `.cause`.
    wrapped = RuntimeError("Traceback (most recent call last):\n  ...\nIsADirectoryError: x")
    wrapped.cause = inner  # type: ignore[attr-defined]
    group = RuntimeError("Training failed due to worker errors")
    group.worker_failures = {1: RuntimeError("other"), 0: wrapped}  # type: ignore[attr-defined]
    assert describe_failure(group, sc) == "IsADirectoryError: [Errno 21] Is a directory"

    class WorkerGroupStartupTimeoutError(Exception):
        pass

    ctrl = RuntimeError("Training failed due to controller error")
    ctrl.controller_failure = WorkerGroupStartupTimeoutError("timed out")  # type: ignore
    msg = describe_failure(ctrl, scaling(worker_start_timeout_s=5, num_workers=2,
                                         placement_strategy="SPREAD"))
    assert msg.startswith("workers did not start: 2 attempts of 5 s each could not reserve "
                          "2 x {CPU: 0.99} (SPREAD)")
    assert "\n" not in msg


def test_driver_does_not_retrain_an_errored_trial(tmp_path: Path) -> None:
    from sweeper.orchestration import TrialFailed, trial_driver
    from sweeper.sink import TrialSink

    spec = validate(base_doc(tmp_path))
    (t,) = trial_configs(spec)
    exp = tmp_path / "results" / "t"
    TrialSink(exp / "trials" / t.trial_id).update_status(status="errored", error="OSError: x")
    with pytest.raises(TrialFailed, match=r"errored in an earlier run \(OSError: x\); rerun "
                                          "with --retry-errored"):
        trial_driver(dict(t.axes), spec_json=spec.model_dump_json(), experiment_dir=str(exp),
                     cache_dir=None, model_paths={})
    assert not (exp / "trials" / t.trial_id / "config.json").exists()  # nothing started


def test_sink_callback_records_what_only_tune_knows(tmp_path: Path) -> None:
    from sweeper.orchestration import make_sink_callback
    from sweeper.sink import TrialSink

    exp = tmp_path / "exp"
    cb = make_sink_callback(exp, lambda trial: trial.name)
    stopped = SimpleNamespace(name="a", last_result={})
    TrialSink(exp / "trials" / "a").update_status(status="running")
    done = SimpleNamespace(name="b", last_result={})
    TrialSink(exp / "trials" / "b").update_status(status="terminated")
    cb.on_trial_complete(0, [], stopped)
    cb.on_trial_complete(0, [], done)
    assert TrialSink(exp / "trials" / "a").status()["stopped_early"] is True
    assert "stopped_early" not in TrialSink(exp / "trials" / "b").status()
    assert cb.stopped_early == ["a"]
    err = tmp_path / "error.txt"
    err.write_text("Failure # 1\nTraceback (most recent call last):\n  File x\n"
                   "ray.exceptions.ActorDiedError: The actor died unexpectedly\n")
    dead = SimpleNamespace(name="c", error_file=str(err))
    TrialSink(exp / "trials" / "c").update_status(status="running")
    cb.on_trial_error(0, [], dead)
    st = TrialSink(exp / "trials" / "c").status()
    assert st["status"] == "errored"
    assert st["error"] == "ray.exceptions.ActorDiedError: The actor died unexpectedly"


_LOGGED_SWEEP = """
import sys
from pathlib import Path
import ray
from ray import tune
from sweeper.orchestration import _logger_callbacks
from sweeper.spec import validate
from tests.conftest import base_doc
tmp = Path(sys.argv[1])
spec = validate(base_doc(tmp, loggers=["mlflow", "tensorboard"]))
exp = tmp / "results" / spec.name
def trainable(config):
    for i in range(3):
        tune.report({"val_top1": 0.1 * i + config["x"], "train_loss": 1.0 / (i + 1)})
ray.init(num_cpus=1, include_dashboard=False)
tune.Tuner(tune.with_resources(trainable, {"cpu": 0.01}),
           param_space={"x": tune.grid_search([0.0, 0.5])},
           run_config=tune.RunConfig(name=spec.name, storage_path=str(exp.parent),
                                     callbacks=_logger_callbacks(spec, exp), verbose=0)).fit()
"""


def test_mlflow_and_tensorboard_loggers_work_offline(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`loggers: [mlflow, tensorboard]` through Ray's callbacks, offline: MLflow runs in a
    file store inside the experiment (params and final metrics readable by mlflow's own
    API), TensorBoard event files in each trial's folder. A bare Tune function stands in
    for the trial driver (the full sweep with TensorBoard is in test_cluster.py)."""
    mlflow = pytest.importorskip("mlflow")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    r = subprocess.run([sys.executable, "-c", _LOGGED_SWEEP, str(tmp_path)], cwd=ROOT,
                       env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = tmp_path / "results" / "t"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((exp / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["t"]).sort_values("params.x")
    assert list(runs["params.x"]) == ["0.0", "0.5"]
    assert list(runs["metrics.val_top1"].round(6)) == [0.2, 0.7]
    assert len(list(exp.glob("*/events.out.tfevents.*"))) == 2
