"""Peak memory and time: SigLIP ring loss (sweeper.losses.sigmoid_loss) vs an all-gather one.

Both compute the same rank share of the sigmoid loss (forward + backward) for a local
batch of ``b`` float32 ``d``-dim embeddings per rank at world size 2 and 4, on CPU with
the gloo backend, one spawned process per rank and one thread per process (world size
4 oversubscribes a 2-core machine; the timings then include that contention for both
implementations alike).

* ``ring``: :func:`sweeper.losses.sigmoid_loss` -- texts travel around the ring in
  ``W - 1`` exchanges, only ``b x b`` logit blocks, recomputed in backward.
* ``allgather``: the texts are all-gathered with gradients (``B x d``) and the whole
  ``b x B`` logit matrix is built with plain autograd ops (the straightforward way).

A fresh set of processes runs each (implementation, world size), so nothing of one
configuration stays resident in the next. Per configuration and rank:

* time: after ``--warmup`` iterations and a barrier, the wall time of ``--iters``
  iterations of (zero grads, forward, backward) divided by ``--iters``. Reported: the
  slowest rank (which sets the step time).
* peak tensor memory (``*_peak_tensor_mib``, the number the ratio uses): one iteration
  runs under a ``TorchDispatchMode`` that adds the bytes of every new storage an op
  returns and subtracts them when the storage is freed (weakref finalizer); views and
  in-place results of existing storages are not counted, nor are the inputs and
  parameters that exist beforehand. It is the peak of live torch tensor bytes created
  by forward + backward, including gradients and communication buffers torch
  allocates, but not gloo's internal buffers or allocator overhead. Exact and
  deterministic; torch has no CPU allocator statistics to read instead.
* peak RSS (``*_peak_rss_mib``, cross-check): ``/proc/self/clear_refs`` resets the
  process's high-water mark after warm-up, then one iteration runs and ``VmHWM`` minus
  the RSS before it is reported. The children run with ``MALLOC_MMAP_THRESHOLD_=65536``
  so that glibc serves every block >= 64 KiB by ``mmap`` and returns it on free
  (otherwise memory freed during warm-up is reused and hides the peak). This includes
  gloo buffers and everything else, so it is noisier, and it is 0 where the kernel
  lacks ``clear_refs``.

Reported per rank (max over ranks). ``*_loss_abs_diff`` checks that the two
implementations return the same mean loss on identical inputs.

Reading the numbers: both implementations keep every rank's texts (``B x d`` in all)
for backward; the ring saves only the ``b x b`` logit blocks of the current step where
the all-gather keeps several ``b x B`` tensors. At ``b = 256 < d = 768`` the text
blocks and their gradients are a large part of the peak, so the ratio falls with the
world size rather than being ``1 / W``.

Run: ``python bench/loss_ring_vs_allgather.py [--quick]``; prints ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

try:
    import sweeper.losses  # noqa: F401
except ImportError:  # run as `python bench/...` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeper.losses import _AllGatherWithGrad, sigmoid_loss

IMPLEMENTATIONS = ("ring", "allgather")


def allgather_sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Rank share of the SigLIP loss with all-gathered texts and a ``b x B`` logit matrix."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_batch = image_embeds.shape[0]
    all_texts = _AllGatherWithGrad.apply(text_embeds, dist.group.WORLD, world_size)  # [B, d]
    global_batch = all_texts.shape[0]
    logits = image_embeds @ all_texts.T * logit_scale.exp() + logit_bias  # [b, B]
    signs = -torch.ones_like(logits)
    rows = torch.arange(local_batch)
    signs[rows, rows + rank * local_batch] = 1.0
    return -F.logsigmoid(signs * logits).sum() * (world_size / global_batch)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live storages created by ops run under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            # Views and in-place results alias an input: no new memory.
            if storage in self._seen or storage.data_ptr() in inputs:
                continue
            self._seen[storage] = True
            nbytes = storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, nbytes)
        return out


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(rank: int, world_size: int, impl: str, cfg: dict[str, Any], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world_size
    )
    try:
        gen = torch.Generator().manual_seed(1000 + rank)
        b, d = cfg["batch"], cfg["dim"]
        img = F.normalize(torch.randn(b, d, generator=gen), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(b, d, generator=gen), dim=-1).requires_grad_()
        scale = torch.tensor([math.log(10.0)], requires_grad=True)
        bias = torch.tensor([-10.0], requires_grad=True)

        def step() -> torch.Tensor:
            for t in (img, txt, scale, bias):
                t.grad = None
            if impl == "ring":
                loss = sigmoid_loss(img, txt, scale, bias)
            else:
                loss = allgather_sigmoid_loss(img, txt, scale, bias)
            loss.backward()
            return loss.detach()

        for _ in range(cfg["warmup"]):
            step()

        # Peak RSS of one iteration (see the module docstring).
        for t in (img, txt, scale, bias):
            t.grad = None
        gc.collect()
        dist.barrier()
        has_clear_refs = _reset_peak_rss()
        rss_before = _proc_status_kib("VmRSS")
        step()
        peak_rss_kib = _proc_status_kib("VmHWM") - rss_before if has_clear_refs else 0

        # Time.
        dist.barrier()
        start = time.perf_counter()
        for _ in range(cfg["iters"]):
            share = step()
        step_time = (time.perf_counter() - start) / cfg["iters"]

        # Peak live tensor bytes of one iteration.
        for t in (img, txt, scale, bias):
            t.grad = None
        dist.barrier()
        with LiveTensorBytes() as tracker:
            step()

        loss = share.clone()
        dist.all_reduce(loss)  # mean over ranks = the global loss
        result = dict(
            time_s=step_time,
            peak_tensor_bytes=tracker.peak,
            peak_rss_bytes=max(peak_rss_kib, 0) * 1024,
            loss=loss.item() / world_size,
        )
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
        # Nobody tears gloo down while a peer may still be talking to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_config(impl: str, world_size: int, cfg: dict[str, Any]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, impl, cfg, out_dir), nprocs=world_size, join=True)
        ranks = [
            json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world_size)
        ]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed iterations")
    parser.add_argument("--batch", type=int, default=256, help="local batch size b per rank")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension d")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cfg = dict(
        batch=args.batch,
        dim=args.dim,
        iters=3 if args.quick else args.iters,
        warmup=1 if args.quick else args.warmup,
    )
    # Inherited by the spawned workers: glibc returns every block >= 64 KiB to the OS
    # on free, so the RSS high-water mark follows the live memory (see docstring).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"

    mib = 2.0**20
    print(f"batch_per_rank: {cfg['batch']}")
    print(f"dim: {cfg['dim']}")
    print(f"iters: {cfg['iters']}")
    for world_size in args.world_sizes:
        res = {impl: run_config(impl, world_size, cfg) for impl in IMPLEMENTATIONS}
        for impl in IMPLEMENTATIONS:
            r = res[impl]
            print(f"{impl}_ws{world_size}_time_s: {r['time_s']:.6f}")
            print(f"{impl}_ws{world_size}_peak_tensor_mib: {r['peak_tensor_bytes'] / mib:.3f}")
            print(f"{impl}_ws{world_size}_peak_rss_mib: {r['peak_rss_bytes'] / mib:.3f}")
        ring, gather = res["ring"], res["allgather"]
        mem_ratio = ring["peak_tensor_bytes"] / gather["peak_tensor_bytes"]
        rss_ratio = (
            ring["peak_rss_bytes"] / gather["peak_rss_bytes"]
            if gather["peak_rss_bytes"]
            else float("nan")
        )
        print(f"ring_vs_allgather_mem_ratio_ws{world_size}: {mem_ratio:.3f}")
        print(f"ring_vs_allgather_rss_ratio_ws{world_size}: {rss_ratio:.3f}")
        print(
            f"ring_vs_allgather_time_ratio_ws{world_size}: {ring['time_s'] / gather['time_s']:.3f}"
        )
        print(
            f"ring_vs_allgather_loss_abs_diff_ws{world_size}: "
            f"{abs(ring['loss'] - gather['loss']):.3e}"
        )


if __name__ == "__main__":
    main()
