"""The resource arithmetic of a sweep: what one trial's workers and driver reserve, how
many trials a cluster holds at once, and the refusal of a trial that can never fit.

Pure functions over the spec and a list of nodes' resources, so `--dry-run` and the tests
use them without Ray; the orchestration passes the live cluster's nodes.
"""

from __future__ import annotations

import math
import os

from sweeper.spec import ScalingSpec, SpecError, SweepSpec

# The Tune trial (the driver of its TorchTrainer) holds this share of a CPU and no GPU.
DRIVER_CPU = 0.01


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


def fmt_res(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def trial_demand(sc: ScalingSpec) -> str:
    """What one trial asks for, in words (for messages)."""
    return (f"{sc.num_workers} x {fmt_res(worker_resources(sc))} ({sc.placement_strategy})"
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
        where += f", largest {fmt_res({k: largest.get(k, 0.0) for k in keys})}"
    return f"{fmt_res(total)} ({where})"


def check_fits(spec: SweepSpec, nodes: list[dict[str, float]]) -> int:
    """Refuse up front a trial that can never fit the cluster (workers + driver); return
    how many trials fit at once. `nodes`: total resources of each node."""
    sc = spec.scaling
    fit = trials_at_once(sc, nodes)
    if fit < 1:
        keys = sorted(set(worker_resources(sc)) | {"CPU"})
        raise SpecError(f"scaling: one trial needs {trial_demand(sc)} but the cluster has "
                        f"{_describe_nodes(nodes, keys)}; lower scaling.num_workers or "
                        "scaling.resources_per_worker, or add nodes")
    return fit


def local_nodes() -> list[dict[str, float]]:
    """The one node a local `ray.init()` would start, without starting it: the CPUs this
    process may run on and the GPUs torch sees (both honour the affinity mask and
    CUDA_VISIBLE_DEVICES, as Ray's own detection does)."""
    import psutil

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    res: dict[str, float] = {"CPU": float(cpus or 1),
                             "memory": float(psutil.virtual_memory().total)}
    try:
        import torch

        if torch.cuda.is_available():
            res["GPU"] = float(torch.cuda.device_count())
    except Exception:  # no usable CUDA: a CPU node (the check after ray.init() still runs)
        pass
    return [res]
