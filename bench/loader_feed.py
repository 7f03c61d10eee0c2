"""Images per second the trials' loader delivers per DataLoader worker, against what one
bf16 SigLIP-B/16 step consumes.

The loader is the trials' own, bound for a GPU: `data.ImageTextDataset` decoding JPEGs
of ImageNet's typical size (500 x 375, quality 90, a smooth random field plus noise:
about 100 KiB, near ImageNet's average) and resizing them to 224 px as SigLIP-B/16's
processor does, `data.Collate` (tokenisation to 64 tokens, uint8 pixels), DataLoader
worker processes handing batches over in shared memory, pinned memory and the copy to
the GPU (without a GPU, the meta device stands in for it). Timed over one epoch after
the workers started, for each worker count of `--workers`
(`loader_decode_images_per_s_<w>w`: wall clock, which on a shared machine depends on
what else runs), and counted per CPU-second the worker processes
used (`..._per_cpu_s_<w>w`: what a worker delivers on a core of its own).
`loader_images_per_s_per_worker` is the best of the latter. The decode-once image cache
(`data.cache_images`, rows of a memory-mapped `.npy`) is measured the same way
(`loader_cached_images_per_s_per_worker`).

What a step consumes: `--step-samples-per-s` (what `gpu_throughput.py` measured on this
GPU), else the samples/s of one bf16 SigLIP-B/16 step at 40 % MFU of an H100 (989 dense
bf16 TFLOP/s; model FLOPs counted by `FlopCounterMode` on the meta device).
`loader_workers_needed` is the ratio: DataLoader workers (= `resources_per_worker.CPU`
- 1 with `data.num_workers: auto`) one GPU needs.

Run: `python bench/loader_feed.py [--workers 1,2] [--images 256] [--step-samples-per-s X]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MFU_TARGET, H100_BF16 = 0.4, 989e12


def jpegs(folder: Path, n: int) -> list[Path]:
    """`n` JPEGs of 500 x 375: a smooth random field (upsampled noise) plus fine noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC),
                         dtype=np.int16)
        img = (img + rng.integers(-36, 37, img.shape)).clip(0, 255).astype(np.uint8)
        p = folder / f"img{i}.jpg"
        Image.fromarray(img).save(p, "JPEG", quality=90)
        out.append(p)
    return out


def rate(ds: Any, collate: Any, workers: int, batch: int) -> tuple[float, float]:
    """(images/s over one epoch of `ds` through `make_loader` with `workers` processes,
    the workers' start-up excluded; images per CPU-second of those workers, start-up
    included: what one core of its own delivers, whatever else shares this machine)."""
    import gc
    import resource

    from sweeper import data as D

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cpu0 = children_cpu()
    import torch

    # Bound for a GPU: uint8 crosses, pinned, and is normalised there (the meta device
    # stands in for one where there is none: the copy and the normalisation cost nothing).
    gpu = torch.cuda.is_available()
    sampler = D.GlobalBatchSampler(len(ds), batch)
    loader = D.make_loader(ds, sampler, collate, workers, pin_memory=gpu,
                           device=torch.device("cuda" if gpu else "meta"))
    it = iter(loader)
    first = next(it)["size"]
    t, n = time.perf_counter(), 0
    for b in it:
        n += b["size"]
    dt = time.perf_counter() - t
    del it, loader
    gc.collect()  # the workers exit and are waited for: their CPU time is counted
    return n / dt, (n + first) / max(1e-9, children_cpu() - cpu0)


def step_consumption() -> float:
    """Samples/s of one bf16 SigLIP-B/16 training step at MFU_TARGET of an H100."""
    import torch
    from checkpoint_size import SHAPES, meta_model
    from torch.utils.flop_counter import FlopCounterMode

    from sweeper.losses import sigmoid_loss
    from sweeper.models import DualEncoder

    enc = DualEncoder(meta_model(SHAPES["b16"]))
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        img, txt, scale, bias = enc(torch.empty(8, 3, 224, 224),
                                    torch.zeros(8, 64, dtype=torch.long))
        sigmoid_loss(img, txt, scale, bias).backward()
    return MFU_TARGET * H100_BF16 / (fc.get_total_flops() / 8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 images")
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts to time")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--step-samples-per-s", type=float, default=None)
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from sweeper import cache as C
    from sweeper import data as D
    from sweeper.models import build_tiny
    from sweeper.spec import TinyModelSpec
    from sweeper.synthetic import vocabulary

    torch.set_num_threads(1)
    n = 128 if args.quick else args.images
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        files = jpegs(tmp / "jpeg", n)
        jpeg_kib = sum(f.stat().st_size for f in files) / n / 1024
        _, processor = build_tiny(TinyModelSpec(hidden_size=8, num_heads=1, num_layers=1,
                                                image_size=224, patch_size=16, max_length=64),
                                  vocabulary())
        tf = D.ImageTransform.from_processor(processor.image_processor)
        names = [f"class {i}" for i in range(16)]
        ds = D.ImageTextDataset([D.Sample(str(f), i % 16) for i, f in enumerate(files)],
                                names, tf, ["a photo of a {}."], "templates", 0)
        collate = D.Collate(processor.tokenizer, 64)
        store = tmp / "store"
        store.mkdir()
        rows = np.stack([ds.load_uint8(i) for i in range(n)])
        np.save(store / "data.npy", rows)
        np.save(store / "ok.npy", np.ones(n, dtype=bool))
        (store / "meta.json").write_text(json.dumps({"n": n}))
        cached = C.CachedDataset(ds, C.ArrayStore(store), np.arange(n))
        best = {"decode": 0.0, "cached": 0.0}
        for w in (int(x) for x in args.workers.split(",")):
            for kind, d in (("decode", ds), ("cached", cached)):
                r, per_cpu = rate(d, collate, w, args.batch)
                common.emit(f"loader_{kind}_images_per_s_{w}w", r)
                common.emit(f"loader_{kind}_images_per_cpu_s_{w}w", per_cpu)
                best[kind] = max(best[kind], per_cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    need = args.step_samples_per_s or step_consumption()
    common.emit("loader_jpeg_kib", jpeg_kib)
    common.emit("loader_images_per_s_per_worker", best["decode"])
    common.emit("loader_cached_images_per_s_per_worker", best["cached"])
    common.emit("loader_b16_step_images_per_s", need)
    common.emit("loader_b16_step_source", "measured" if args.step_samples_per_s
                else f"{MFU_TARGET:.0%} MFU of an H100")
    common.emit("loader_workers_needed", need / best["decode"])
    common.emit("loader_cached_workers_needed", need / best["cached"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
