"""SigLIP (vision tower trained) with and without the decode-once image cache.

The same trial (the bench model shaped like SigLIP-B/16, synthetic 256 px PNGs resized to
224, global batch 32, `data.num_workers: 0`) runs in-process through `worker.run_trial`
with `data.cache_images` off and on, alternately. Without the cache every step decodes and
resizes its images; with it, it copies uint8 rows out of a memory-mapped
`[N, 224, 224, 3]` array and normalises them. Epoch time: samples / the worker's reported
samples_per_s (evaluation excluded), the fastest epoch over the runs of a configuration.

* `image_cache_speedup`: epoch time without the cache / with it.
* `image_loader_speedup`: the data side alone: batches/s of the training DataLoader
  (read, resize, normalise, tokenise, collate; no model) with the cache / without.
* `image_cache_build_s`: decoding both splits into the cache (the first cached run).
* `image_cache_max_metric_diff`: largest difference of the reported metrics between the
  two runs (the cache holds exactly the decoded pixels: 0 expected).

Run: `python bench/image_cache.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from siglit_cache import metrics_diff


def loader_seconds(cfg, cached: bool, store_root: Path, reps: int = 3) -> float:
    """Fastest pass over the training DataLoader of `cfg` (no model), in seconds."""
    import time

    from sweeper import cache as C
    from sweeper import data as D
    from sweeper.models import load_pretrained, text_max_length

    model, processor = load_pretrained(cfg.model_path)
    transform = D.ImageTransform.from_processor(processor.image_processor)
    root = D.data_root(cfg.data, common.cache_dir())
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, root)
    ds = td.train
    if cached:
        listing = C.SplitListing.scan(root, "train")
        store = C.ensure_image_cache(store_root, listing, transform)
        ds = C.CachedDataset(td.train, store, listing.rows(td.train.samples))
    sampler = D.GlobalBatchSampler(len(ds), cfg.batch_size, seed=0)
    loader = D.make_loader(ds, sampler, D.Collate(processor.tokenizer,
                                                  text_max_length(model, processor)), 0)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _batch in loader:
            pass
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, epochs and repeats")
    args = ap.parse_args(argv)
    common.one_thread()
    per_class, epochs, reps = (10, 2, 1) if args.quick else (24, 3, 2)
    model_dir = common.bench_model_dir()
    synth = common.synthetic(10, per_class, 2)
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    best: dict[bool, float] = {}
    hist: dict[bool, list[dict]] = {}
    build_s = None
    for rep in range(reps):
        for cached in (False, True):
            doc = common.spec_doc(model_dir, synth, work / "results",
                                  data={"cache_images": cached,
                                        "cache_dir": str(work / "cache")},
                                  train={"epochs": epochs, "lr": 1e-4},
                                  grid={"variant": ["siglip"], "text_source": ["templates"],
                                        "batch_size": [32], "n_train_classes": [10],
                                        "seed": [0]})
            cfg = common.trial_config(doc)
            _, history = common.run_in_process(cfg, work / f"trial-{rep}-{cached}")
            best[cached] = min(best.get(cached, float("inf")),
                               min(common.interval_seconds(history)))
            hist.setdefault(cached, history)
            if cached and build_s is None:
                metas = sorted((work / "cache" / "images").glob("*/meta.json"))
                build_s = sum(json.loads(m.read_text())["build_s"] for m in metas)
    loader_s = {c: loader_seconds(cfg, c, work / "cache") for c in (False, True)}
    common.emit("image_loader_s_per_epoch_uncached", loader_s[False])
    common.emit("image_loader_s_per_epoch_cached", loader_s[True])
    common.emit("image_loader_speedup", loader_s[False] / loader_s[True])
    common.emit("image_epoch_s_uncached", best[False])
    common.emit("image_epoch_s_cached", best[True])
    common.emit("image_cache_speedup", best[False] / best[True])
    common.emit("image_cache_build_s", build_s or 0.0)
    common.emit("image_cache_max_metric_diff", metrics_diff(hist[False], hist[True]))
    common.emit("image_train_images", 10 * per_class)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
