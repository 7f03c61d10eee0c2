"""Pretraining of the offline `tiny` preset, once per config, cached on disk.

The studies fine-tune a *pretrained* model that already classifies unseen classes
zero-shot; a randomly initialised one cannot. So the `tiny` preset is a small SigLIP
trained here on a separate synthetic split covering every synthetic class, paired half with
captions and half with templates, through the same `train_step` and loss the trials use.
The result is saved with `save_pretrained` and loaded by trials with `from_pretrained`,
exactly like a hub checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from sweeper import data as D
from sweeper import synthetic
from sweeper.families import FAMILIES
from sweeper.models import DualEncoder
from sweeper.sink import atomic_write_json
from sweeper.training import loss_fn_for, lr_lambda, train_step

log = logging.getLogger(__name__)

PRETRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "this is a {}.",
    "a rendering of the {}.",
    "a close up photo of a {}.",
)
PRETRAIN_BATCH = 128
PRETRAIN_LR = 1e-3
# Offset so the pretraining images are never the fine-tuning datasets' images.
PRETRAIN_SEED_OFFSET = 1_000


def tiny_key(tiny: Any, arch: str = "siglip") -> str:
    """Content key of a tiny preset: its config and the code version of this recipe."""
    doc = {"tiny": tiny.model_dump(mode="json"), "recipe": 1, "batch": PRETRAIN_BATCH,
           "lr": PRETRAIN_LR, "templates": PRETRAIN_TEMPLATES}
    if arch != "siglip":  # the SigLIP preset keeps the keys of caches built before CLIP's
        doc["arch"] = arch
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def ensure_tiny(tiny: Any, cache_dir: str | Path | None = None, arch: str = "siglip") -> Path:
    """The directory of the pretrained tiny model of family `arch` (a model type of
    `families.FAMILIES` with a preset: "siglip", "clip", "siglip2"), built on first use
    (under a file lock so concurrent trials build it once)."""
    base = Path(cache_dir) if cache_dir else synthetic.default_cache_dir()
    prefix = "tiny" if arch == "siglip" else f"{arch}-tiny"
    out = base / "models" / f"{prefix}-{tiny_key(tiny, arch)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():
            return out
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
        try:
            pretrain_tiny(tiny, tmp, base, arch)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def pretrain_tiny(tiny: Any, out_dir: Path, cache_dir: Path,
                  arch: str = "siglip") -> dict[str, float]:
    """Build the tiny model of family `arch` (`Family.build`) and pretrain it with the
    family's default loss (SigLIP and SigLIP 2: sigmoid, CLIP: softmax) on every synthetic
    class; save it to `out_dir`."""
    t0 = time.time()
    n_classes = len(synthetic.COLOURS) * len(synthetic.SHAPES)
    root = synthetic.generate(
        cache_dir / "data"
        / f"pretrain-px{tiny.image_size}-n{tiny.pretrain_per_class}-s{tiny.seed}",
        n_classes=n_classes, train_per_class=tiny.pretrain_per_class, val_per_class=1,
        image_size=tiny.image_size, seed=PRETRAIN_SEED_OFFSET + tiny.seed, splits=("train",))
    split = D.open_dataset(root, "folder", "classes.json", "captions.jsonl").split("train")
    # Each image twice: once with its captions, once with a template of its class name.
    samples = split.samples + [D.Sample(s.path, s.label, ()) for s in split.samples]
    family = FAMILIES[arch]
    model, processor = family.build(tiny, synthetic.vocabulary())
    transform = D.image_transform(processor.image_processor)
    ds = D.ImageTextDataset(samples, split.names, transform, PRETRAIN_TEMPLATES, "mixed",
                            tiny.seed)
    sampler = D.GlobalBatchSampler(len(ds), PRETRAIN_BATCH, seed=tiny.seed)
    loader = D.make_loader(ds, sampler, D.Collate(processor.tokenizer, tiny.max_length), 0)
    loss = family.default_loss
    enc = DualEncoder(model, loss, freeze_vision=False)
    enc.train()
    opt = torch.optim.AdamW(enc.parameters(), lr=PRETRAIN_LR, weight_decay=1e-4)
    n_steps = tiny.pretrain_epochs * len(sampler)
    warm = type("W", (), {"warmup_steps": min(50, n_steps // 10), "schedule": "cosine"})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warm, n_steps))
    # Same-class texts are frequent here (templates); treat them as positives.
    loss_fn = loss_fn_for(loss, pair_targets="positive")

    last = float("nan")
    for epoch in range(tiny.pretrain_epochs):
        sampler.epoch = epoch
        for batch in loader:
            last = train_step(enc, batch, opt, sched, loss_fn, 1.0, contextlib.nullcontext).item()
    # A tiny model is one shard: its "Writing model shards" bar would only add console noise.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    stats = {"final_loss": last, "steps": n_steps, "seconds": time.time() - t0}
    atomic_write_json(out_dir / "pretraining.json", {**stats, "config": tiny.model_dump()})
    log.info("pretrained tiny %s model in %.0fs (%d steps, loss %.4f)", arch,
             stats["seconds"], n_steps, last)
    return stats
