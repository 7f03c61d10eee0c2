"""The worker loop against a bare Hugging Face loop, same checkpoint, batch and device.

* Bare side, in this process: `SiglipModel(pixel_values, input_ids, return_loss=True)`
  (Hugging Face's own forward and its own local sigmoid loss), `loss.backward()`, fused
  AdamW and `zero_grad`, over batches collated beforehand by the trials' dataset and
  collate (decoded, resized, normalised, tokenised: already on the device). It leaves
  out everything a real loop needs: reading and decoding images, tokenising, the learning
  -rate schedule, the loss bookkeeping, evaluation, and the Ray Train process around it.
  Timed in chunks of as many steps as a worker interval, half of the chunks before and
  half after the worker runs; the best chunk is kept (noise from other processes only
  slows a chunk down). One intra-op thread on the CPU, as a Ray worker reserving 1 CPU
  gets (OMP_NUM_THREADS=1).
* Worker side: a one-trial sweep per data path through `orchestration.run_sweep` (local
  Ray, 1 worker), SigLIP with both towers trained, global batch 32, evaluating every
  `--interval` steps; with the defaults (every step decodes its images, in
  `data.num_workers: auto` DataLoader processes) and with `data.cache_images` (uint8 rows
  of a decode-once store). Its throughput is the `samples_per_s` the worker wrote to
  history.jsonl for each interval between evaluations (evaluation excluded); the first
  interval (warm-up) is dropped and the best of the others kept.
* `--in-process` runs the worker loop through `worker.run_trial` in this process instead
  of a Ray trial (no Ray needed: the GPU check), on `--device` (`cuda`: bf16 autocast on
  both sides, `train.precision: auto`), optionally with SigLIP-B/16's shapes
  (`--shape b16`: 768 wide, 12 layers; the default is the bench model, 128 wide, 2 layers).

Prints `hot_loop_ratio` (worker samples/s with the defaults / bare samples/s; target
>= 0.95), `hot_loop_ratio_cached` (with the image cache) and the throughputs. On a
machine that others share, wall-clock ratios follow their load (a process with more
threads or helper processes gets more of the cores); `--in-process` on the CPU also
prints `hot_loop_cpu_ratio` (and `_cached`): samples per CPU-second of the training
thread, worker / bare (evaluation excluded), which is what the loop adds to the step
wherever its DataLoader processes have cores of their own.

Run: `python bench/hot_loop.py [--quick] [--in-process] [--device cuda] [--shape b16]`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

B16 = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "patch_size": 16,
       "image_size": 224, "max_length": 64}


def bare_loop(cfg: Any, n_steps: int, chunks: int, device: Any, warmup: int = 2
              ) -> list[tuple[float, float]]:
    """(samples/s, samples per CPU-second of this thread) of HF's SiglipModel(return_loss=
    True) / backward / fused AdamW over pre-collated batches on `device`, for each of
    `chunks` runs of `n_steps` steps."""
    import torch

    from sweeper import data as D
    from sweeper.models import load_pretrained, text_max_length

    model, processor = load_pretrained(cfg.model_path)
    transform = D.ImageTransform.from_processor(processor.image_processor)
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, D.data_root(cfg.data, common.cache_dir()))
    collate = D.Collate(processor.tokenizer, text_max_length(model, processor))
    sampler = D.GlobalBatchSampler(len(td.train), cfg.batch_size, seed=0)
    batches = [{k: v.to(device) for k, v in collate([td.train[k] for k in idx]).items()
                if k in ("pixel_values", "input_ids")}
               for idx, _ in zip(sampler, range(4), strict=False)]
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
        if device.type == "cuda" else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(b: dict[str, Any]) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(**b, return_loss=True).loss
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    out = []
    for _ in range(chunks):
        sync()
        t, cpu = time.perf_counter(), time.thread_time()
        for i in range(n_steps):
            step(batches[i % len(batches)])
        sync()
        n = n_steps * cfg.batch_size
        out.append((n / (time.perf_counter() - t), n / (time.thread_time() - cpu)))
    return out


def ray_trials(doc: dict[str, Any]) -> dict[bool, list[dict[str, Any]]]:
    """Run the sweep (one trial per data path) through Ray; {cache_images: history}."""
    from sweeper.experiment import prepare_experiment
    from sweeper.orchestration import run_sweep
    from sweeper.sink import TrialSink, trial_dir
    from sweeper.spec import validate
    from sweeper.trials import trial_configs

    spec = prepare_experiment(validate(doc), None, new=True)
    result = run_sweep(spec, verbose=0)
    if result.errors:
        raise RuntimeError(f"bench trial failed: {result.errors}")
    return {t.data.cache_images: TrialSink(trial_dir(result.experiment_dir,
                                                     t.trial_id)).history()
            for t in trial_configs(spec)}


def in_process_trials(doc: dict[str, Any], device: Any, work: Path
                      ) -> tuple[dict[bool, list[dict[str, Any]]], dict[bool, list[float]]]:
    """The same trials through `worker.run_trial` in this process, on `device`; also the
    CPU-seconds of this (the training) thread in each interval between evaluations,
    evaluation excluded (the DataLoader processes' work is not on it)."""
    from sweeper import worker
    from sweeper.sink import TrialSink

    hist, cpu = {}, {}
    report = worker._Sequencer.report
    marks: list[tuple[float, float]] = []

    def timed_report(self: Any, *a: Any, **k: Any) -> Any:
        before = time.thread_time()
        try:
            return report(self, *a, **k)
        finally:
            marks.append((before, time.thread_time()))

    worker._Sequencer.report = timed_report  # the bench's own probe
    try:
        for t in common_trials(doc):
            d, marks[:] = work / t.trial_id, []
            worker.run_trial(t, worker.WorkerContext(device=device, trial_dir=d,
                                                     cache_dir=common.cache_dir()))
            hist[t.data.cache_images] = TrialSink(d).history()
            cpu[t.data.cache_images] = [b[0] - a[1] for a, b in itertools.pairwise(marks)]
    finally:
        worker._Sequencer.report = report
    return hist, cpu


def common_trials(doc: dict[str, Any]) -> list[Any]:
    from sweeper.spec import validate

    return common.resolved_trials(validate(doc), common.cache_dir())


def worker_rate(history: list[dict[str, Any]]) -> float:
    sps = [r["samples_per_s"] for r in history if r.get("step", 0) > 0
           and r.get("samples_per_s")]
    return max(sps[1:] or sps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--interval", type=int, default=None, help="steps between evaluations")
    ap.add_argument("--in-process", action="store_true", help="no Ray: worker.run_trial here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=["bench", "b16"], default="bench")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loader-workers", default="auto",
                    help="data.num_workers of the worker side (default auto)")
    args = ap.parse_args(argv)
    import torch

    from sweeper.training import configure_matmul

    device = torch.device(args.device)
    interval = args.interval or 4
    n_int = 5 if args.quick else 10
    logging.getLogger("sweeper").setLevel(logging.WARNING)
    model_dir = common.bench_model_dir(B16 if args.shape == "b16" else None)
    per_class = max(16, 8 * args.batch // 10)  # 8 steps per epoch at least
    synth = common.synthetic(10, per_class, 1)
    work = Path(tempfile.mkdtemp(prefix="bench-hotloop-"))
    nw = args.loader_workers if args.loader_workers == "auto" else int(args.loader_workers)
    gpu = device.type == "cuda"
    doc = common.spec_doc(
        model_dir, synth, work / "results", name="hotloop",
        data={"cache_dir": str(work / "cache"), "num_workers": nw},
        train={"epochs": None, "budget": {"steps": interval * n_int}, "lr": 1e-4},
        eval={"every_steps": interval, "batch_size": 64},
        grid={"variant": ["siglip"], "text_source": ["templates"],
              "batch_size": [args.batch], "n_train_classes": [10], "seed": [0],
              "data.cache_images": [False, True]},
        scaling={"num_workers": 1, "max_concurrent_trials": 1, "use_gpu": gpu,
                 **({"resources_per_worker": {"GPU": 1, "CPU": 9}} if gpu else {})})
    cfg = common_trials(doc)[0]
    configure_matmul(device)  # TF32 as the worker sets it, on both sides
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(1)
    # As many bare chunks as worker intervals, half before and half after the worker.
    bare = bare_loop(cfg, interval, n_int // 2, device)
    cpu: dict[bool, list[float]] = {}
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress output
        if args.in_process:
            hist, cpu = in_process_trials(doc, device, work)
        else:
            hist = ray_trials(doc)
    bare += bare_loop(cfg, interval, n_int - n_int // 2, device)
    torch.set_num_threads(threads)
    worker, cached = worker_rate(hist[False]), worker_rate(hist[True])
    best = max(b[0] for b in bare)
    common.emit("hot_loop_worker_samples_per_s", worker)
    common.emit("hot_loop_worker_cached_samples_per_s", cached)
    common.emit("hot_loop_bare_samples_per_s", best)
    common.emit("hot_loop_ratio", worker / best)
    common.emit("hot_loop_ratio_cached", cached / best)
    if cpu and not gpu:
        # Per CPU-second of the training thread: what the loop adds to the step's own
        # work, whatever else shares the machine (its DataLoader processes included).
        bare_cpu = max(b[1] for b in bare)
        for tag, cached_ in (("", False), ("_cached", True)):
            per = [interval * args.batch / c for c in cpu[cached_][1:] if c > 0]
            common.emit(f"hot_loop_cpu_ratio{tag}", max(per) / bare_cpu)
    common.emit("hot_loop_device", str(device))
    common.emit("hot_loop_shape", args.shape)
    common.emit("hot_loop_batch", args.batch)
    common.emit("hot_loop_threads", threads if gpu else 1)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
