"""SigLiT (frozen vision tower) with and without the frozen-tower feature cache.

The same trial (bench model shaped like SigLIP-B/16: 196 image tokens, 64 text tokens,
hidden 128, 2 layers; synthetic 256 px PNGs resized to 224; global batch 32) runs in-process
through `worker.run_trial` with `data.cache_features` off and on, alternately. Per run, the
time of a training epoch is the worker's own measurement (samples / reported samples_per_s,
evaluation excluded); a configuration's figure is its fastest epoch over every run (noise
from other processes only adds time).

* `siglit_cache_speedup`: epoch time without the cache / with it.
* `siglit_cache_bound`: what the FLOPs allow: (vision forward + text forward/backward) /
  (text forward/backward), counted with `torch.utils.flop_counter.FlopCounterMode` on one
  batch. Without the cache every step also decodes and resizes its images, which the bound
  does not count, so the speedup may exceed it.
* `siglit_cache_vs_bound`: speedup / bound (target >= 0.9).
* `siglit_cache_time_bound`: the same ratio from measured times instead of FLOPs: one
  batch's (decode + vision forward + text step) / (cached read + text step), each timed
  alone in this process (`siglit_batch_*_s`); the text step being forward, loss, backward
  and fused AdamW. The FLOP bound assumes the text step runs at the vision forward's
  FLOP/s; on a CPU the small matmuls of a backward and the optimizer do not.
* `siglit_cache_build_s`: building the cache of both splits (the first cached run).
* `siglit_cache_max_metric_diff`: largest difference of train_loss / val_top1 / logit
  scale and bias between the two runs' reports (the cache must not change results).

Run: `python bench/siglit_cache.py [--quick]`.
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


def flop_bound(model_dir: Path, batch: int) -> tuple[float, float, float]:
    """(bound, vision forward FLOPs, text forward+backward FLOPs) of one batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    from sweeper.losses import sigmoid_loss
    from sweeper.models import DualEncoder

    model = AutoModel.from_pretrained(str(model_dir))
    enc = DualEncoder(model, "sigmoid", freeze_vision=True).train()
    cfg = model.config
    px = torch.randn(batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    ids = torch.randint(3, cfg.text_config.vocab_size,
                        (batch, cfg.text_config.max_position_embeddings))
    with FlopCounterMode(display=False) as fc:
        img = enc.encode_image(px)
    vision = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        i, t, s, b = enc(None, ids, None, img)
        sigmoid_loss(i, t, s, b).backward()
    text = fc.get_total_flops()
    return (vision + text) / text, float(vision), float(text)


def time_bound(cfg, store_root: Path, reps: int = 3) -> dict[str, float]:
    """Seconds per batch of each part of a step, measured here (fastest of `reps`), and
    the speedup they allow: (load decoded + vision forward + text step) / (load cached +
    text step), the text step being forward, loss, backward and fused AdamW."""
    import time

    import torch

    from sweeper import cache as C
    from sweeper import data as D
    from sweeper.losses import sigmoid_loss
    from sweeper.models import DualEncoder, load_pretrained, text_max_length

    model, processor = load_pretrained(cfg.model_path)
    transform = D.ImageTransform.from_processor(processor.image_processor)
    root = D.data_root(cfg.data, common.cache_dir())
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, root)
    enc = DualEncoder(model, "sigmoid", freeze_vision=True).train()
    listing = C.SplitListing.scan(root, "train")
    store = C.ensure_feature_cache(store_root, listing, transform, enc,
                                   C.checkpoint_fingerprint(cfg.model.pretrained), "fp32",
                                   torch.device("cpu"))
    cached = C.FeatureDataset(td.train, store, listing.rows(td.train.samples))
    collate = D.Collate(processor.tokenizer, text_max_length(model, processor))
    keys = [(i, 0) for i in range(cfg.batch_size)]
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)

    def best(fn) -> float:
        out = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    batch = collate(td.train.__getitems__(keys))
    cbatch = C.EmbedsCollate(collate)(cached.__getitems__(keys))

    def text_step() -> None:
        i, t, s, b = enc(None, cbatch["input_ids"], None, cbatch["image_embeds"])
        loss = sigmoid_loss(i, t, s, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    parts = {
        "load_decoded_s": best(lambda: collate(td.train.__getitems__(keys))),
        "load_cached_s": best(lambda: C.EmbedsCollate(collate)(cached.__getitems__(keys))),
        "vision_fwd_s": best(lambda: enc.encode_image(batch["pixel_values"])),
        "text_step_s": best(text_step),
    }
    parts["bound"] = ((parts["load_decoded_s"] + parts["vision_fwd_s"] + parts["text_step_s"])
                      / (parts["load_cached_s"] + parts["text_step_s"]))
    return parts


def metrics_diff(a: list[dict], b: list[dict]) -> float:
    keys = ("train_loss", "val_top1", "val_top5", "logit_scale", "logit_bias")
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            if ra.get(k) is not None and rb.get(k) is not None:
                worst = max(worst, abs(ra[k] - rb[k]))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, epochs and repeats")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    common.one_thread()
    per_class, epochs, reps = (16, 2, 1) if args.quick else (32, 3, 2)
    batch = 32
    model_dir = common.bench_model_dir()
    synth = common.synthetic(10, per_class, 2)
    work = Path(tempfile.mkdtemp(prefix="bench-siglit-"))
    best: dict[bool, float] = {}
    hist: dict[bool, list[dict]] = {}
    build_s = None
    for rep in range(reps):
        for cached in (False, True):
            doc = common.spec_doc(model_dir, synth, work / "results",
                                  data={"cache_features": cached,
                                        "cache_dir": str(work / "cache")},
                                  train={"epochs": epochs, "lr": 1e-4},
                                  grid={"variant": ["siglit"], "text_source": ["templates"],
                                        "batch_size": [batch], "n_train_classes": [10],
                                        "seed": [0]})
            cfg = common.trial_config(doc)
            _, history = common.run_in_process(cfg, work / f"trial-{rep}-{cached}")
            epoch_s = min(common.interval_seconds(history))
            best[cached] = min(best.get(cached, float("inf")), epoch_s)
            hist.setdefault(cached, history)
            if cached and build_s is None:
                metas = sorted((work / "cache" / "features").glob("*/meta.json"))
                build_s = sum(json.loads(m.read_text())["build_s"] for m in metas)
    bound, fv, ft = flop_bound(model_dir, batch)
    parts = time_bound(cfg, work / "cache")
    speedup = best[False] / best[True]
    common.emit("siglit_epoch_s_uncached", best[False])
    common.emit("siglit_epoch_s_cached", best[True])
    common.emit("siglit_cache_speedup", speedup)
    common.emit("siglit_cache_bound", bound)
    common.emit("siglit_cache_vs_bound", speedup / bound)
    common.emit("siglit_vision_fwd_gflop_per_batch", fv / 1e9)
    common.emit("siglit_text_fwd_bwd_gflop_per_batch", ft / 1e9)
    common.emit("siglit_cache_time_bound", parts["bound"])
    common.emit("siglit_cache_vs_time_bound", speedup / parts["bound"])
    for k in ("load_decoded_s", "load_cached_s", "vision_fwd_s", "text_step_s"):
        common.emit(f"siglit_batch_{k}", parts[k])
    common.emit("siglit_cache_build_s", build_s or 0.0)
    common.emit("siglit_cache_max_metric_diff", metrics_diff(hist[False], hist[True]))
    common.emit("siglit_train_images", 10 * per_class)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
