"""Global batches larger than memory: peak memory and time of one training step, one pass
(`sweeper.training.train_step`) against micro-batched (`micro_batch_step`).

The model is a randomly initialised SigLIP trained by the worker's own steps (DualEncoder,
the sigmoid loss over the batch, AdamW): on the CPU the bench shape of `common.py`
(SigLIP-B/16's token counts, 224 px / 16 px patches and 64 text tokens, 128 wide, 2
layers); with `--gpu`, SigLIP-B/16 itself (`gpu_throughput.build`) under bf16 autocast.

* Peak memory of one step (after a warm-up step, so that AdamW's state exists) at each
  global batch `B`, one pass and micro-batched with a fixed `m` (`--micro`). On the CPU,
  the peak of live tensor bytes the step creates (`LiveTensorBytes` of
  `loss_ring_vs_allgather.py`: torch keeps no CPU allocator statistics, and
  `tracemalloc` does not see torch's allocations); on a GPU, `torch.cuda.max_memory_allocated`
  over the step minus what was allocated before it. Both count the gradients (one copy of
  the weights) and the step's temporaries. `large_batch_peak_ratio`: micro-batched / one
  pass at the largest `B` measured one pass; `*_growth`: peak at the largest `B` over the
  peak at the smallest (activations grow with `B` in one pass, stay flat micro-batched:
  only the `[B, d]` embeddings and the loss's `b x b` blocks grow).
* Time per sample at `--time-batch` (both fit), one pass and micro-batched, interleaved,
  best of `--repeats`: `large_batch_time_ratio` (target <= 1.4: the extra forward costs
  about a third), and with gradient checkpointing (`*_ckpt_*`); on the CPU also the ratios
  of the process's CPU time (`*_cpu`), which other processes on a shared machine disturb
  less than the wall time.
* `--find-max` (GPU): the largest global batch, doubling from `--micro`, whose step
  trains on this device without micro-batches, with them, and with them and gradient
  checkpointing (`large_batch_max_*`), each search bounded by `--max-seconds`.

Run: `python bench/large_batch.py [--quick]` (CPU) or `python bench/large_batch.py --gpu
--find-max` (one GPU); `--cpu-dry-run` runs the GPU path's code on the CPU with a shrunken
model and small batches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MIB = 2.0**20


class Bench:
    """A model, its optimizer and a pool of random batches on one device."""

    def __init__(self, shape: dict[str, int], model: Any, device: Any, bf16: bool) -> None:
        import torch

        from sweeper.models import DualEncoder

        self.torch, self.shape, self.device = torch, shape, device
        self.model = model
        self.enc = DualEncoder(model, "sigmoid", freeze_vision=False).to(device).train()
        self.opt = torch.optim.AdamW([p for p in self.enc.parameters() if p.requires_grad],
                                     lr=1e-6, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16
                         else contextlib.nullcontext)
        self._pool: dict[int, dict[str, Any]] = {}

    def batch(self, n: int) -> dict[str, Any]:
        """`n` random samples (made once per size, on the device)."""
        if n not in self._pool:
            torch, s = self.torch, self.shape
            self._pool.clear()  # one size at a time: the pool must not hold memory
            g = torch.Generator().manual_seed(n)
            self._pool[n] = {
                "pixel_values": torch.randn(n, 3, s["image"], s["image"], generator=g),
                "input_ids": torch.randint(3, s["vocab"], (n, s["text"]), generator=g),
                "labels": torch.arange(n)}
            self._pool[n] = {k: v.to(self.device) for k, v in self._pool[n].items()}
        return self._pool[n]

    def gradient_checkpointing(self, on: bool) -> None:
        from sweeper.training import enable_gradient_checkpointing

        if on:
            enable_gradient_checkpointing(self.model)
        else:
            off = getattr(self.model, "activation_checkpointing_disable", None)
            (off or self.model.gradient_checkpointing_disable)()

    def step(self, n: int, micro: int | None) -> Any:
        from sweeper.training import loss_fn_for, micro_batch_step, train_step

        args = (self.enc, self.batch(n), self.opt, self.sched, loss_fn_for("sigmoid"), None,
                self.autocast)
        return micro_batch_step(*args, micro) if micro else train_step(*args)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def peak_bytes(self, n: int, micro: int | None) -> int:
        """Peak memory one step adds (see the module docstring)."""
        torch = self.torch
        self.step(n, micro)  # warm-up: optimizer state, this size's batch
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.step(n, micro)
            self.sync()
            return torch.cuda.max_memory_allocated() - before
        from loss_ring_vs_allgather import LiveTensorBytes

        with LiveTensorBytes() as tracker:
            self.step(n, micro)
        return tracker.peak

    def seconds_per_sample(self, n: int, micro: int | None, steps: int) -> tuple[float, float]:
        """(wall, CPU) seconds per sample of `steps` steps after a warm-up step."""
        self.step(n, micro)
        self.sync()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(n, micro)
        self.sync()
        return ((time.perf_counter() - t) / (steps * n),
                (time.process_time() - c) / (steps * n))

    def trains(self, n: int, micro: int | None) -> bool:
        """Whether one step of `n` samples fits on the GPU."""
        torch = self.torch
        try:
            self.step(n, micro)
            self.sync()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            self.opt.zero_grad(set_to_none=True)
            self._pool.clear()
            gc.collect()
            torch.cuda.empty_cache()


def build(args: argparse.Namespace) -> Bench:
    import torch

    if args.gpu or args.cpu_dry_run:
        import gpu_throughput

        model, shape = gpu_throughput.build(dry=args.cpu_dry_run)
        device = torch.device("cpu" if args.cpu_dry_run else "cuda")
        return Bench(shape, model, device, bf16=True)
    from sweeper.models import build_tiny
    from sweeper.spec import TinyModelSpec
    from sweeper.synthetic import vocabulary

    common.one_thread()
    tiny = TinyModelSpec(**common.BENCH_TINY)
    model, _ = build_tiny(tiny, vocabulary())
    shape = {"image": tiny.image_size, "text": tiny.max_length, "vocab": model.config
             .text_config.vocab_size}
    return Bench(shape, model, torch.device("cpu"), bf16=False)


def largest(bench: Bench, micro: int | None, start: int, cap: int, budget_s: float) -> int:
    """The largest of start, 2 start, 4 start, ... <= cap whose step fits (0: none)."""
    best, n, t0 = 0, start, time.monotonic()
    while n <= cap and time.monotonic() - t0 < budget_s:
        if bench.device.type == "cuda" and not bench.trains(n, micro):
            break
        if bench.device.type != "cuda":
            bench.step(n, micro)  # dry run: no memory limit to find, the code path runs
        best, n = n, 2 * n
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    ap.add_argument("--gpu", action="store_true", help="SigLIP-B/16 in bf16 on one GPU")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="the --gpu code path on the CPU, shrunken (checks the script)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch size m")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="global batches measured one pass (micro-batched also at 4x the "
                         "largest)")
    ap.add_argument("--time-batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    ap.add_argument("--find-max", action="store_true",
                    help="the largest global batch that trains on the GPU, each way")
    ap.add_argument("--max-batch", type=int, default=131072)
    ap.add_argument("--max-seconds", type=float, default=150.0,
                    help="time bound of each --find-max search")
    args = ap.parse_args(argv)
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu-dry-run to check the GPU path)",
              file=sys.stderr)
        return 2
    gpu_like = args.gpu or args.cpu_dry_run
    if args.cpu_dry_run:
        m, sizes, tb, args.repeats, args.steps = 2, [4, 8], 8, 1, 1
        args.max_batch = 16
    elif args.gpu:
        m, sizes, tb = 256, [256, 512, 1024], 512
    else:
        m, sizes, tb = 16, ([32, 64] if args.quick else [32, 64, 128]), 64
        if args.quick:
            args.repeats = 2
    m, sizes, tb = args.micro or m, args.batches or sizes, args.time_batch or tb
    bench = build(args)
    common.emit("large_batch_device", torch.cuda.get_device_name(0) if args.gpu
                else "cpu (dry run)" if args.cpu_dry_run else common.machine())
    common.emit("large_batch_params_m",
                sum(p.numel() for p in bench.enc.parameters()) / 1e6)
    common.emit("large_batch_micro", m)

    one = {n: bench.peak_bytes(n, None) for n in sizes}
    micro_sizes = [*sizes, 4 * sizes[-1]]
    micro = {n: bench.peak_bytes(n, m) for n in micro_sizes}
    for n in sizes:
        common.emit(f"large_batch_peak_mib_one_pass_b{n}", one[n] / MIB)
    for n in micro_sizes:
        common.emit(f"large_batch_peak_mib_micro_b{n}", micro[n] / MIB)
    top = sizes[-1]
    common.emit("large_batch_peak_ratio", micro[top] / one[top])
    common.emit("large_batch_one_pass_growth", one[top] / one[sizes[0]])
    common.emit("large_batch_micro_growth", micro[top] / micro[sizes[0]])
    common.emit("large_batch_micro_growth_4x", micro[4 * top] / micro[sizes[0]])
    bench.gradient_checkpointing(True)
    common.emit(f"large_batch_peak_mib_ckpt_one_pass_b{top}", bench.peak_bytes(top, None) / MIB)
    common.emit(f"large_batch_peak_mib_ckpt_micro_b{top}", bench.peak_bytes(top, m) / MIB)
    bench.gradient_checkpointing(False)

    # Interleaved repeats, best of each: the noise of a shared machine hits both sides.
    configs = {"one_pass": (None, False), "micro": (m, False), "ckpt_one_pass": (None, True),
               "ckpt_micro": (m, True)}
    best = {k: (float("inf"), float("inf")) for k in configs}
    for _ in range(args.repeats):
        for name, (mb, ckpt) in configs.items():
            bench.gradient_checkpointing(ckpt)
            wall, cpu = bench.seconds_per_sample(tb, mb, args.steps)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    bench.gradient_checkpointing(False)
    common.emit("large_batch_time_batch", tb)
    for name, (wall, _) in best.items():
        common.emit(f"large_batch_ms_per_sample_{name}", 1e3 * wall)
    # On a shared CPU the process's own CPU time is the steadier measure (one thread).
    kinds = [("", 0)] + ([("_cpu", 1)] if bench.device.type == "cpu" else [])
    for suffix, i in kinds:
        base = best["one_pass"][i]
        common.emit(f"large_batch_time_ratio{suffix}", best["micro"][i] / base)
        common.emit(f"large_batch_ckpt_time_ratio{suffix}", best["ckpt_one_pass"][i] / base)
        common.emit(f"large_batch_ckpt_micro_time_ratio{suffix}", best["ckpt_micro"][i] / base)

    if args.find_max and gpu_like:
        for name, mb, ckpt in (("one_pass", None, False), ("micro", m, False),
                               ("ckpt_micro", m, True)):
            bench.gradient_checkpointing(ckpt)
            n = largest(bench, mb, sizes[0], args.max_batch, args.max_seconds)
            common.emit(f"large_batch_max_{name}", n)
        bench.gradient_checkpointing(False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
