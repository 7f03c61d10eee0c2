"""Images per second of the training data pipeline against a bare PIL loop.

The pipeline is the project's own path: an ImageNet-style folder scanned by
`sweeper.data`, `ImageTextDataset` (decode, the SigLIP image processor's resize and
normalisation, a template per image), `Collate` (tokenise, batch) and `make_loader` over a
`GlobalBatchSampler`, with 1 and 2 DataLoader workers. The baseline is a bare loop over the
same files in one process: `Image.open`, RGB, bicubic resize to 224x224, numpy array.

The workers send each batch's pixels as uint8 and the consuming process normalises them
(on the GPU when training on one), so normalisation is not a worker's cost;
`data_pipeline_cpu_ms_per_image_wN` counts the CPU time of the workers *and* the consumer.

    python bench/data_pipeline.py            # ~2000 JPEGs at 256 px, 224 px output
    python bench/data_pipeline.py --quick    # 300 JPEGs

Prints `name: value` lines; `data_pipeline_ratio_per_core_wN` is the pipeline's rate with
N workers over N times the bare loop's rate (target: >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, n: int, size: int, n_classes: int = 10) -> None:
    """`n` JPEGs of `size` px in root/train/<wnid>/ (smooth gradients plus noise, so they
    compress like photos rather than like noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        d = root / "train" / f"n{i % n_classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], -1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"img_{i:05d}.JPEG",
                                                                 quality=90)
    (root / "val").mkdir(exist_ok=True)
    (root / "val" / "n00000000").mkdir(exist_ok=True)


def tokenizer() -> object:
    """A small word-level fast tokenizer: tokenisation costs about what a real one does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "photo", "of", "the", "class", "n", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def bare_loop(paths: list[str], out: int) -> float:
    """Images per second of decode + resize in this process."""
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            np.asarray(rgb.resize((out, out), Image.BICUBIC))
    return len(paths) / (time.perf_counter() - t0)


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of processes, from /proc (0 where unavailable)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def pipeline(root: Path, workers: int, batch: int, out: int, epochs: int
             ) -> tuple[float, float]:
    """(images per second, CPU ms per image over the workers and this process) through
    the project's DataLoader path, after one warm-up epoch (worker start-up excluded: the
    workers persist across epochs in a trial)."""
    from sweeper import data as D

    try:
        from transformers import SiglipImageProcessorPil as proc_cls
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import SiglipImageProcessor as proc_cls
    tf = D.ImageTransform.from_processor(proc_cls(size={"height": out, "width": out}))
    train = D.open_dataset(root).split("train")
    ds = D.ImageTextDataset(train.samples, train.names, tf, ["a photo of the {} ."],
                            "templates", 0, substitute_bad=True)
    sampler = D.GlobalBatchSampler(len(ds), batch, seed=0)
    loader = D.make_loader(ds, sampler, D.Collate(tokenizer(), 16), workers)
    n, t0, c0, pids = 0, 0.0, 0.0, []
    for epoch in range(epochs + 1):
        if epoch == 1:
            inner = getattr(loader, "loader", loader)
            it = getattr(inner, "_iterator", None)
            pids = [w.pid for w in getattr(it, "_workers", [])]
            t0, n = time.perf_counter(), 0
            c0 = time.process_time() + _cpu_s(pids)
        sampler.epoch = epoch
        for b in loader:
            assert b["pixel_values"].shape[1:] == (3, out, out)
            assert b["pixel_values"].dtype == torch.float32
            n += b["size"]
    rate = n / (time.perf_counter() - t0)
    cpu_ms = (time.process_time() + _cpu_s(pids) - c0) / n * 1e3
    del loader
    return rate, cpu_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 images, one timed epoch")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--out", type=int, default=224, help="model input resolution")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    n = args.images or (300 if args.quick else 2000)
    epochs = 1 if args.quick else 2
    torch.set_num_threads(1)  # as in a DataLoader worker: one core per process
    with tempfile.TemporaryDirectory(prefix="sweeper-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_images(root, n, args.size)
        paths = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))
        print(f"images: {len(paths)}")
        print(f"image_px: {args.size}")
        print(f"output_px: {args.out}")
        print(f"cores: {len(os.sched_getaffinity(0))}")
        print(f"generate_s: {time.perf_counter() - t0:.1f}")
        bare_loop(paths[:50], args.out)  # warm the page cache and the decoder
        c0 = time.process_time()
        rounds = 1 if args.quick else 2
        bare = max(bare_loop(paths, args.out) for _ in range(rounds))
        bare_cpu = (time.process_time() - c0) / (rounds * len(paths)) * 1e3
        print(f"bare_pil_images_per_s: {bare:.1f}")
        print(f"bare_pil_cpu_ms_per_image: {bare_cpu:.3f}")
        for w in args.workers:
            rate, cpu_ms = pipeline(root, w, args.batch, args.out, epochs)
            print(f"data_pipeline_images_per_s_w{w}: {rate:.1f}")
            print(f"data_pipeline_ratio_per_core_w{w}: {rate / (w * bare):.2f}")
            # Everything counted: the workers and the consuming process (tokenising is in
            # the workers, normalising in the consumer on a CPU-only machine).
            print(f"data_pipeline_cpu_ms_per_image_w{w}: {cpu_ms:.3f}")
            print(f"data_pipeline_cpu_ratio_w{w}: {bare_cpu / cpu_ms:.2f}")


if __name__ == "__main__":
    main()
