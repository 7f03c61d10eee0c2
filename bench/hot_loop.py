"""The worker loop inside a Ray Train trial vs a bare PyTorch loop, same model and batches.

* Ray side: a one-trial sweep (`orchestration.run_sweep`, local Ray, 1 worker with 1 CPU)
  of SigLIP (both towers trained) on the bench model shaped like SigLIP-B/16 (hidden 128,
  2 layers, 196 + 64 tokens), global batch 32, the decode-once image cache on (so a step
  reads uint8 rows and normalises them: the loop's real data path, without JPEG decoding),
  evaluating every `--interval` steps. Its throughput is the `samples_per_s` the worker
  wrote to history.jsonl for each interval between evaluations (evaluation excluded); the
  first interval (warm-up) is dropped and the best of the others kept (noise from other
  processes only slows a chunk down).
* Bare side, in this process: the same checkpoint in a `DualEncoder`, AdamW over the
  trainable parameters, and a loop of forward / `sigmoid_loss` / backward / step over
  batches collated beforehand by the same dataset and collate; one intra-op thread, as the
  Ray worker gets (Ray sets OMP_NUM_THREADS to the worker's 1 CPU). Timed in chunks of
  as many steps as a worker interval, as many chunks as worker intervals, half before and
  half after the Ray trial; best kept.

Prints `hot_loop_ratio` (worker samples/s / bare samples/s, target >= 0.95) and both
throughputs.

Run: `python bench/hot_loop.py [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
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

BATCH = 32


def bare_loop(cfg: Any, n_steps: int, chunks: int, warmup: int = 2) -> list[float]:
    """Samples/s of forward / sigmoid loss / backward / AdamW over pre-collated batches,
    for each of `chunks` runs of `n_steps` steps (as many steps as one worker interval)."""
    import torch

    from sweeper import data as D
    from sweeper.losses import sigmoid_loss
    from sweeper.models import DualEncoder, load_pretrained, text_max_length

    model, processor = load_pretrained(cfg.model_path)
    transform = D.ImageTransform.from_processor(processor.image_processor)
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, D.data_root(cfg.data, common.cache_dir()))
    collate = D.Collate(processor.tokenizer, text_max_length(model, processor))
    sampler = D.GlobalBatchSampler(len(td.train), BATCH, seed=0)
    batches = [collate([td.train[k] for k in idx]) for idx, _ in zip(sampler, range(4),
                                                                     strict=False)]
    enc = DualEncoder(model, "sigmoid", freeze_vision=False).train()
    # The worker's optimizer: fused AdamW (same update cost on both sides).
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)

    def step(b: dict[str, Any]) -> None:
        img, txt, scale, bias = enc(b["pixel_values"], b["input_ids"])
        loss = sigmoid_loss(img, txt, scale, bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    out = []
    for _ in range(chunks):
        t = time.perf_counter()
        for i in range(n_steps):
            step(batches[i % len(batches)])
        out.append(n_steps * BATCH / (time.perf_counter() - t))
    return out


def ray_trial(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the one-trial sweep through Ray; its history rows."""
    from sweeper.experiment import prepare_experiment
    from sweeper.orchestration import run_sweep
    from sweeper.sink import TrialSink, trial_dir
    from sweeper.spec import trial_configs, validate

    spec = prepare_experiment(validate(doc), None, new=True)
    result = run_sweep(spec, verbose=0)
    if result.errors:
        raise RuntimeError(f"bench trial failed: {result.errors}")
    tid = trial_configs(spec)[0].trial_id
    return TrialSink(trial_dir(result.experiment_dir, tid)).history()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--interval", type=int, default=None, help="steps between evaluations")
    args = ap.parse_args(argv)
    interval = args.interval or 4
    n_int = 5 if args.quick else 10
    logging.getLogger("sweeper").setLevel(logging.WARNING)
    model_dir = common.bench_model_dir()
    synth = common.synthetic(10, 16, 1)
    work = Path(tempfile.mkdtemp(prefix="bench-hotloop-"))
    doc = common.spec_doc(
        model_dir, synth, work / "results", name="hotloop",
        data={"cache_images": True, "cache_dir": str(work / "cache")},
        train={"epochs": None, "budget": {"steps": interval * n_int}, "lr": 1e-4},
        eval={"every_steps": interval, "batch_size": 64},
        grid={"variant": ["siglip"], "text_source": ["templates"], "batch_size": [BATCH],
              "n_train_classes": [10], "seed": [0]})
    cfg = common.trial_config(doc)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # As many bare chunks as worker intervals, half before and half after the trial.
    bare = bare_loop(cfg, interval, (n_int - 1 + 1) // 2)
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress output
        history = ray_trial(doc)
    bare += bare_loop(cfg, interval, (n_int - 1) // 2 + 1)
    torch.set_num_threads(threads)
    sps = [r["samples_per_s"] for r in history if r.get("step", 0) > 0
           and r.get("samples_per_s")]
    worker = max(sps[1:] or sps)
    common.emit("hot_loop_worker_samples_per_s", worker)
    common.emit("hot_loop_bare_samples_per_s", max(bare))
    common.emit("hot_loop_ratio", worker / max(bare))
    common.emit("hot_loop_threads", 1)
    common.emit("hot_loop_batch", BATCH)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
