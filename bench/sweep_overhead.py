"""Per-trial overhead and sweep efficiency of a (trimmed) quickstart through the real CLI.

Each configuration runs `python -m sweeper.run search_spaces/quickstart.yaml` in a fresh
process (its own local Ray), with a warm cache (the tiny model pretrained and the dataset
generated beforehand), into a fresh storage folder, trimmed with `--set` (`--quick`: the
`templates` text source only, 4 trials; otherwise all 8). From the files the trials wrote,
per trial:

* trial start: the mtime of `trials/<id>/config.json` (the Tune driver writes it first);
* worker start (`run_trial` entered): mtime(history.jsonl) - time_s of its last row;
* first step: worker start + time_s of the first row after step 0 - that interval's
  training time (samples / samples_per_s), i.e. when the first training step began;
* training time: the sum over the reports of samples / samples_per_s (evaluation,
  checkpoints and reports excluded).

Per sweep: `sweep_start_s` (command start -> first trial start: the CLI, Ray's start,
preflight, Tune's set-up) and `sweep_end_s` (last trial end -> command exit: Tune's end,
the results collected, the report and plots, Ray's shutdown).

Figures (medians over trials):

* `trial_overhead_s`: trial start -> first step; split into `trial_ray_start_s` (trial
  start -> `run_trial`: TorchTrainer, controller and worker actors, process group, worker
  imports) and `trial_worker_setup_s` (`run_trial` -> first step: model and data loading,
  caches, the step-0 zero-shot evaluation, its checkpoint and report). The Ray part is
  split again with the timestamps of Train's controller log: `trial_controller_up_s`
  (trial start -> the controller's first line: the Tune actor's function, the
  TorchTrainer, the controller's process and imports), `trial_workers_up_s` (-> worker
  actors created: placement group, worker processes and their imports),
  `trial_train_context_s` (-> train function launched: train context, process group) and
  `trial_fn_start_s` (-> `run_trial`: the function unpickled, the worker's imports).
* `trial_end_wait_s`: the trial's last report -> its status written final (the worker's
  end, Train's poll, the trial driver's end).
* `slot_overhead_s`: `(wall x concurrency - training) / trials`, what each trial slot
  spends on anything but training, Ray's start and the report included;
  `slot_overhead_tuner_s` the same over the trials' span.
* `sweep_efficiency`: sum of the trials' training time / (command wall time x
  concurrency); `sweep_efficiency_tuner` uses the span from the first trial start to the
  last trial end instead of the command's wall time (no Ray start-up, no report).

Configurations (each prefixes its figures): `sweeper` (what a sweep gets unless told
otherwise: Train's controller polls its workers every 0.5 s, and a finished trial's Tune
actor runs the next trial, `tune.reuse_actors`), `fresh_actors` (the same with a new Tune
actor for every trial, `tune.reuse_actors=false`), `default` (Ray Train's own 2 s poll:
results, and a finished worker group, are seen up to 2 s late) and `fastpoll` (0.1 s), the
polls through `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`. `*_wall_ratio` is a sweep's wall time
over `default`'s (`reuse_actors_wall_ratio`: `sweeper`'s over `fresh_actors`'), in the same
command. The stores
the trials read (`<storage>/.cache`) are built once beforehand (`stores_build_s`) and shared
by every configuration's experiment, as a second run of the quickstart finds them.
`worker_import_s` is what a fresh worker process spends importing torch, transformers and
Ray Train (paid by every trial: Ray Train starts new worker processes per run).

Run: `python bench/sweep_overhead.py [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# (environment, --set overrides) of each configuration. `sweeper` is what a sweep gets
# unless told otherwise (0.5 s polls, sweeper.orchestration.WORKER_ENV; Tune actors
# reused); `fresh_actors` a new Tune actor per trial; `default` Ray Train's own 2 s poll;
# `fastpoll` 0.1 s.
CONFIGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "sweeper": ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}, []),
    "fresh_actors": ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
                     ["tune.reuse_actors=false"]),
    "default": ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}, []),
    "fastpoll": ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}, []),
}


def trial_times(tdir: Path) -> dict[str, Any] | None:
    from sweeper.sink import read_json, read_jsonl

    hist = read_jsonl(tdir / "history.jsonl")
    status = read_json(tdir / "status.json") or {}
    if not hist or status.get("status") != "terminated":
        return None
    t0 = (tdir / "history.jsonl").stat().st_mtime - hist[-1]["time_s"]
    start = (tdir / "config.json").stat().st_mtime
    train, prev, first = 0.0, 0, None
    for row in hist:
        sps = row.get("samples_per_s")
        if row.get("step", 0) > 0 and sps:
            dt = (row["samples_seen"] - prev) / sps
            train += dt
            if first is None:
                first = t0 + row["time_s"] - dt
        prev = row.get("samples_seen", prev)
    end = (tdir / "status.json").stat().st_mtime
    return {"id": tdir.name, "start": start, "t0": t0, "first_step": first or t0, "end": end,
            "last_report": (tdir / "history.jsonl").stat().st_mtime, "train_s": train}


def run_config(name: str, overrides: list[str], storage: Path) -> dict[str, float]:
    env_extra, extra = CONFIGS[name]
    overrides = overrides + extra
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sweeper.run", str(common.ROOT / "search_spaces" /
                                                    "quickstart.yaml"),
           "--storage", str(storage), "--name", f"qs-{name}"]
    for o in overrides:
        cmd += ["--set", o]
    t, launched = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, env=env, cwd=common.ROOT, capture_output=True, text=True)
    wall, exited = time.perf_counter() - t, time.time()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"{name}: sweep exited {proc.returncode}")
    trials = [trial_times(d) for d in sorted((storage / f"qs-{name}" / "trials").iterdir())
              if d.is_dir()]
    trials = [t for t in trials if t]
    ray_split = controller_split(trials)
    conc = 2
    train = sum(t["train_s"] for t in trials)
    span = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    med = statistics.median
    return {
        "trials": len(trials),
        "wall_s": wall,
        "train_s_total": train,
        "trial_overhead_s": med([t["first_step"] - t["start"] for t in trials]),
        "trial_ray_start_s": med([t["t0"] - t["start"] for t in trials]),
        **ray_split,
        "trial_worker_setup_s": med([t["first_step"] - t["t0"] for t in trials]),
        "trial_train_s": med([t["train_s"] for t in trials]),
        "trial_end_wait_s": med([t["end"] - t["last_report"] for t in trials]),
        "sweep_start_s": min(t["start"] for t in trials) - launched,
        "sweep_end_s": exited - max(t["end"] for t in trials),
        # The figure: what each of the `conc` slots spends on anything but training.
        "slot_overhead_s": (wall * conc - train) / len(trials),
        "slot_overhead_tuner_s": (span * conc - train) / len(trials),
        "sweep_efficiency": train / (wall * conc),
        "sweep_efficiency_tuner": train / (span * conc),
    }


def controller_split(trials: list[dict[str, Any]]) -> dict[str, float]:
    """Split `trial_ray_start_s` with the timestamps of Train's controller log of each trial
    (in the latest Ray session's logs, the sweep's own): trial start -> the controller's
    first line (the Tune actor's function, the TorchTrainer, the controller's process and
    imports), -> its worker actors created (placement group, worker processes and
    imports), -> the train function launched on them (train context, process group), ->
    `run_trial` entered (the train function unpickled, the worker's imports). Medians;
    empty when the logs are not found."""
    import glob
    import json

    logs = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "session_latest" / "logs"
    marks: dict[str, dict[str, float]] = {}
    for f in glob.glob(str(logs / "train" / "ray-train-sys-controller-*.log")):
        rows = [json.loads(line) for line in Path(f).read_text().splitlines()
                if line.startswith("{")]
        if not rows or "run_name" not in rows[0]:
            continue
        m = {"controller": rows[0]["timestamp_ns"] / 1e9}
        for r in rows:
            for key, text in (("workers", "worker actors created in"),
                              ("launched", "Train function launched on workers in")):
                if text in r.get("message", "") and key not in m:
                    m[key] = r["timestamp_ns"] / 1e9
        marks[rows[0]["run_name"]] = m
    parts: dict[str, list[float]] = {k: [] for k in (
        "trial_controller_up_s", "trial_workers_up_s", "trial_train_context_s",
        "trial_fn_start_s")}
    for t in trials:
        m = marks.get(t["id"], {})
        if len(m) < 3:
            continue
        parts["trial_controller_up_s"].append(m["controller"] - t["start"])
        parts["trial_workers_up_s"].append(m["workers"] - m["controller"])
        parts["trial_train_context_s"].append(m["launched"] - m["workers"])
        parts["trial_fn_start_s"].append(t["t0"] - m["launched"])
    return {k: statistics.median(v) for k, v in parts.items() if v}


def import_seconds() -> float:
    code = ("import time; t = time.perf_counter(); import torch, transformers; "
            "from transformers import AutoModel, AutoProcessor; import ray.train.torch; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def warm_caches(overrides: list[str], storage: Path) -> float:
    """Warm what a second run of the quickstart finds built, in this process: the tiny model,
    the synthetic dataset, and the stores the trials read (`<storage>/.cache`, shared by the
    experiments of every configuration). Returns the seconds the stores took to build."""
    from sweeper import cache as C
    from sweeper.prepare import prepare_inputs
    from sweeper.spec import load_spec

    spec = load_spec(common.ROOT / "search_spaces" / "quickstart.yaml",
                     [*overrides, f"storage={storage}"])
    model_paths = prepare_inputs(spec, None)
    t = time.perf_counter()
    for job in C.cache_jobs(spec, storage, model_paths):
        C.run_job(job)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 trials instead of 8")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args(argv)
    overrides = ["grid.text_source=[templates]"] if args.quick else []
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    common.emit("stores_build_s", warm_caches(overrides, work))
    results: dict[str, dict[str, Any]] = {}
    for name in args.configs.split(","):
        results[name] = run_config(name, overrides, work)
        for k, v in results[name].items():
            common.emit(f"{name}_{k}", v)
    first = results.get("sweeper") or results[next(iter(results))]
    common.emit("trial_overhead_s", first["trial_overhead_s"])
    common.emit("sweep_efficiency", first["sweep_efficiency"])
    common.emit("slot_overhead_s", first["slot_overhead_s"])
    if "fresh_actors" in results and "sweeper" in results:
        common.emit("reuse_actors_wall_ratio",
                    results["sweeper"]["wall_s"] / results["fresh_actors"]["wall_s"])
    for faster in ("sweeper", "fastpoll"):
        if faster in results and "default" in results:
            common.emit(f"{faster}_saves_s_per_trial",
                        (results["default"]["wall_s"] - results[faster]["wall_s"])
                        / results["default"]["trials"] * 2)
            common.emit(f"{faster}_wall_ratio",
                        results[faster]["wall_s"] / results["default"]["wall_s"])
    common.emit("worker_import_s", import_seconds())
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
