"""Images per second of the training data pipeline against a bare PIL loop, and the time
a training loop waits for it, for each data format, local and in a bucket.

The pipeline is the project's own path: a dataset opened by `sweeper.data`,
`ImageTextDataset` (decode, the SigLIP image processor's resize and normalisation, a
template per image), `Collate` (tokenise, batch) and `make_loader` over the trial's
batch plan, with 1 and 2 DataLoader workers. The baseline is a bare loop over the same
files in one process: `Image.open`, RGB, bicubic resize to 224x224, numpy array.

The workers send each batch's pixels as uint8 and the consuming process normalises them
(on the GPU when training on one), so normalisation is not a worker's cost;
`data_pipeline_cpu_ms_per_image_wN` counts the CPU time of the workers *and* the consumer.

Formats (`--format-images` JPEGs, written as an ImageNet-style folder, a Parquet export
and WebDataset shards of 100, read from disk and from a local S3 server, moto's, with 1
and `auto` DataLoader workers, `auto` being this machine's cores less one as for a trial
worker that reserves them all): `data_pipeline_<format>_<local|s3>_...`:
`images_per_cpu_s_<w>` (images per CPU-second of the workers and the consumer) and
`cpu_ratio_<w>` (that over the bare PIL loop's images per CPU-second: 1 is the bare
decode's cost), and `data_wait_frac_<w>`: the share of a training loop's time blocked on
the next batch (the worker's `data_wait_frac`) when each step takes as long as one core
decodes the batch with bare PIL (a sleep: a GPU step that leaves the CPU free);
`requests_per_image` on S3 (GET requests in the server's log, per image read).

    python bench/data_pipeline.py            # ~2000 JPEGs at 256 px, 224 px output
    python bench/data_pipeline.py --quick    # 300 JPEGs, 240 per format

Prints `name: value` lines; `data_pipeline_ratio_per_core_wN` is the pipeline's rate with
N workers over N times the bare loop's rate (target: >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.conftest's S3 server
    sys.path.insert(0, str(ROOT))


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


def _processor_transform(out: int) -> object:
    from sweeper import data as D

    try:
        from transformers import SiglipImageProcessorPil as proc_cls
    except ImportError:  # older transformers: the PIL processor is the default one
        from transformers import SiglipImageProcessor as proc_cls
    return D.ImageTransform.from_processor(proc_cls(size={"height": out, "width": out}))


def pipeline(dataset: object, workers: int, batch: int, out: int, epochs: int,
             step_s: float = 0.0) -> tuple[float, float, float]:
    """(images per second, CPU ms per image over the workers and this process, the share
    of the loop's time blocked on the next batch) through the project's DataLoader path,
    after one warm-up epoch (worker start-up excluded: the workers persist across epochs
    in a trial); each batch is followed by a `step_s` sleep (a step that leaves the CPU
    free)."""
    from sweeper import data as D

    train = dataset.split("train")
    ds = D.ImageTextDataset(train.samples, train.names, _processor_transform(out),
                            ["a photo of the {} ."], "templates", 0, substitute_bad=True,
                            reader=dataset.reader())
    sampler = D.batch_plan(ds, batch, seed=0, shuffle_buffer=100)
    loader = D.make_loader(ds, sampler, D.Collate(tokenizer(), 16), workers)
    n, t0, c0, pids, waited = 0, 0.0, 0.0, [], 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            inner = getattr(loader, "loader", loader)
            it = getattr(inner, "_iterator", None)
            pids = [w.pid for w in getattr(it, "_workers", [])]
            t0, n, waited = time.perf_counter(), 0, 0.0
            c0 = time.process_time() + _cpu_s(pids)
        sampler.epoch = epoch
        batches = iter(loader)
        while True:
            t = time.perf_counter()
            b = next(batches, None)
            waited += time.perf_counter() - t
            if b is None:
                break
            assert b["pixel_values"].shape[1:] == (3, out, out)
            assert b["pixel_values"].dtype == torch.float32
            n += b["size"]
            if step_s:
                time.sleep(step_s)
    wall = time.perf_counter() - t0
    cpu_ms = (time.process_time() + _cpu_s(pids) - c0) / n * 1e3
    del loader
    return n / wall, cpu_ms, waited / wall


def write_formats(root: Path) -> None:
    """The folder dataset at `root` also as `train.parquet` and as shards of 100 under
    `train/` (the other layouts ignore them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sweeper import data as D
    from sweeper.data.shard import write_shards

    train = D.open_dataset(root).split("train")
    (root / "val" / "n00000000" / "v.JPEG").write_bytes(Path(train.samples[0].path)
                                                        .read_bytes())
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": Path(s.path).read_bytes(), "path": s.path}
                           for s in train.samples], image_t),
        "label": [train.wnids[s.label] for s in train.samples]}),
        root / "train.parquet", row_group_size=64)
    write_shards(root, root, maxcount=100, splits=("train",))


def format_figures(root: Path, bare_cpu_ms: float, bare: float, batch: int, out: int,
                   workers: list[int]) -> None:
    """The three formats, local and on a local S3 server: see the module docstring."""
    import pyarrow.fs as pafs

    from sweeper import data as D
    from tests.conftest import S3Server

    step_s = batch / bare
    print(f"data_pipeline_step_s: {step_s:.3f}")
    server = S3Server(root.parent / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        bucket = server.bucket()
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
        pafs.copy_files(str(root), f"{bucket}/data", destination_filesystem=fs,
                        use_threads=False)
        for where, base in (("local", str(root)), ("s3", f"s3://{bucket}/data")):
            for fmt in ("folder", "parquet", "webdataset"):
                dataset = D.open_dataset(base, fmt, "classes.json")
                dataset.split("train")  # a shard index is built once per node
                gets0 = _gets(server, bucket)
                for w in workers:
                    rate, cpu_ms, wait = pipeline(dataset, w, batch, out, 1, step_s)
                    name = f"data_pipeline_{fmt}_{where}"
                    print(f"{name}_images_per_cpu_s_w{w}: {1e3 / cpu_ms:.1f}")
                    print(f"{name}_cpu_ratio_w{w}: {bare_cpu_ms / cpu_ms:.2f}")
                    print(f"{name}_data_wait_frac_w{w}: {wait:.3f}")
                    print(f"{name}_images_per_s_w{w}: {rate:.1f}")
                if where == "s3":
                    per_epoch = len(dataset.split("train").samples) // batch * batch
                    n = 2 * len(workers) * per_epoch  # a warm-up and a timed epoch each
                    print(f"{name}_requests_per_image: {(_gets(server, bucket) - gets0) / n:.4f}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _gets(server: object, bucket: str) -> int:
    server._log.flush()
    text = Path(server._log.name).read_text(errors="replace")
    return len(re.findall(rf"GET /{bucket}/", text))


def main() -> None:
    from sweeper import data as D

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 images, one timed epoch")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--format-images", type=int, default=None,
                    help="images of the formats' figures (default 600, 240 with --quick)")
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--out", type=int, default=224, help="model input resolution")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    n = args.images or (300 if args.quick else 2000)
    epochs = 1 if args.quick else 2
    torch.set_num_threads(1)  # as in a DataLoader worker: one core per process
    with tempfile.TemporaryDirectory(prefix="sweeper-bench-") as tmp:
        root = Path(tmp) / "data"
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
        print(f"bare_pil_images_per_cpu_s: {1e3 / bare_cpu:.1f}")
        for w in args.workers:
            rate, cpu_ms, _ = pipeline(D.open_dataset(root), w, args.batch, args.out, epochs)
            print(f"data_pipeline_images_per_s_w{w}: {rate:.1f}")
            print(f"data_pipeline_ratio_per_core_w{w}: {rate / (w * bare):.2f}")
            # Everything counted: the workers and the consuming process (tokenising is in
            # the workers, normalising in the consumer on a CPU-only machine).
            print(f"data_pipeline_cpu_ms_per_image_w{w}: {cpu_ms:.3f}")
            print(f"data_pipeline_cpu_ratio_w{w}: {bare_cpu / cpu_ms:.2f}")
        k = args.format_images or (240 if args.quick else 600)
        fmt_root = Path(tmp) / "formats"
        make_images(fmt_root, k, args.size)
        write_formats(fmt_root)
        auto = D.loader_workers("auto", len(os.sched_getaffinity(0)))
        print(f"data_pipeline_auto_workers: {auto}")
        format_figures(fmt_root, bare_cpu, bare, args.batch, args.out, sorted({1, auto}))


if __name__ == "__main__":
    main()
