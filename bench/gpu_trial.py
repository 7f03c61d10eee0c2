"""Quickstart-shaped trials on one GPU, without Ray: the worker loop in this process.

The trials of `search_spaces/quickstart.yaml` (the offline tiny SigLIP, synthetic data;
SigLIP and SigLiT x templates and captions x 5 and 20 classes) run one after the other
through `worker.run_trial` with a CUDA `WorkerContext`, exactly as the tests run it on the
CPU and as a Ray Train worker runs it on a GPU, with the defaults (`train.precision: auto`
is bf16 on a GPU with native bf16, TF32 on). Checks that every trial terminated on the
GPU, in bf16, and prints its throughput and accuracy.

`--cpu-dry-run` runs two trimmed trials on the CPU (checks the script).

Run: `python bench/gpu_trial.py [--cpu-dry-run] [--trials N]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args(argv)
    import torch

    from sweeper.sink import TrialSink
    from sweeper.spec import load_spec
    from sweeper.training import resolve_precision
    from sweeper.worker import WorkerContext, run_trial

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu-dry-run to check the script)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    sets = ["scaling.use_gpu=false" if dry else "scaling.use_gpu=true"]
    if dry:
        sets += ["grid.text_source=[templates]", "grid.n_train_classes=[5]", "train.epochs=1"]
    spec = load_spec(common.ROOT / "search_spaces" / "quickstart.yaml", sets)
    t = time.perf_counter()
    trials = common.resolved_trials(spec, common.cache_dir())[:args.trials]
    common.emit("gpu_trial_prepare_s", time.perf_counter() - t)
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-trial-") as work:
        for cfg in trials:
            d = Path(work) / cfg.trial_id
            t = time.perf_counter()
            final = run_trial(cfg, WorkerContext(device=device, trial_dir=d,
                                                 cache_dir=common.cache_dir()))
            status = TrialSink(d).status()
            sps = [r["samples_per_s"] for r in TrialSink(d).history() if r.get("samples_per_s")]
            tag = f"gpu_trial_{cfg.trial_id}"
            common.emit(f"{tag}_status", final["status"])
            common.emit(f"{tag}_device", status.get("device"))
            common.emit(f"{tag}_precision", status.get("precision"))
            common.emit(f"{tag}_tf32", status.get("tf32"))
            common.emit(f"{tag}_best_val_top1", final["best_val_top1"])
            common.emit(f"{tag}_samples_per_s_max", max(sps) if sps else None)
            common.emit(f"{tag}_s", time.perf_counter() - t)
            want = (str(device), resolve_precision("auto", device))
            if final["status"] != "terminated" or (status.get("device"),
                                                   status.get("precision")) != want:
                ok = False
    common.emit("gpu_trials", len(trials))
    common.emit("gpu_trials_ok", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
