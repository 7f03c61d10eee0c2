"""Zero-shot evaluation: class text embeddings rebuilt from the current text tower, the
val image embeddings of this rank's shard, and top-1/top-5 summed over every rank.

Never imports Ray; the worker loop calls an `Evaluator` at each evaluation point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sweeper import data as D
from sweeper.models import DualEncoder


@torch.no_grad()
def class_text_embeddings(enc: DualEncoder, names: list[str], templates: list[str],
                          tokenizer: Any, max_length: int, device: torch.device,
                          autocast: Any, batch_size: int = 256) -> torch.Tensor:
    """[C, d] class embeddings from the *current* text tower: the normalised embeddings of
    every template filled with the class name, averaged (prompt ensembling), renormalised.
    The C x T prompts are encoded in batches of `batch_size`."""
    prompts = [t.format(name) for name in names for t in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        mask = tok.get("attention_mask")
        with autocast():
            e = enc.encode_text(tok["input_ids"].to(device),
                                mask.to(device) if mask is not None else None)
        embs.append(e.float())
    per_prompt = torch.cat(embs).view(len(names), len(templates), -1)
    return nn.functional.normalize(per_prompt.mean(1), dim=-1)


@torch.no_grad()
def image_embeddings(enc: DualEncoder, loader: Any, device: torch.device,
                     autocast: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(embeddings [n, d], labels [n], skipped) of this rank's shard of the val set."""
    embs, labels, skipped = [], [], 0
    for batch in loader:
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        with autocast():
            e = enc.encode_image(batch["pixel_values"].to(device))  # a no-op from D.make_loader
        embs.append(e.float())
        labels.append(batch["labels"].to(device))
    if not embs:
        return (torch.zeros(0, 1, device=device),
                torch.zeros(0, dtype=torch.long, device=device), skipped)
    return torch.cat(embs), torch.cat(labels), skipped


def zero_shot_metrics(img: torch.Tensor, labels: torch.Tensor, cls: torch.Tensor,
                      seen: list[bool], world_size: int, group: Any = None) -> dict[str, Any]:
    """Top-1/top-5 and per-class top-1 over every rank's shard (counts summed).

    `img` [n, d] and `cls` [C, d] are normalised embeddings, `labels` [n] index the classes,
    `seen[c]` says whether class c was trained on. `val_top1_seen` / `val_top1_unseen` are
    the top-1 over the images of seen / unseen classes (None when there are none); top-5
    is top-min(5, C). `per_class[c]` is None for a class without val images."""
    n_cls = cls.shape[0]
    correct1 = torch.zeros(n_cls, dtype=torch.float64, device=cls.device)
    correct5 = torch.zeros_like(correct1)
    count = torch.zeros_like(correct1)
    if img.shape[0]:
        logits = img @ cls.T
        k = min(5, n_cls)
        top = logits.topk(k, dim=-1).indices
        hit1 = (top[:, 0] == labels).double()
        hit5 = (top == labels[:, None]).any(-1).double()
        correct1.index_add_(0, labels, hit1)
        correct5.index_add_(0, labels, hit5)
        count.index_add_(0, labels, torch.ones_like(hit1))
    if world_size > 1:
        stacked = torch.stack([correct1, correct5, count])
        dist.all_reduce(stacked, group=group)
        correct1, correct5, count = stacked
    seen_t = torch.tensor(seen, device=cls.device)

    def acc(c: torch.Tensor, mask: torch.Tensor) -> float | None:
        n = count[mask].sum().item()
        return c[mask].sum().item() / n if n else None

    every = torch.ones_like(seen_t)
    per_class = [c / n if n else None for c, n in zip(correct1.tolist(), count.tolist(),
                                                      strict=True)]
    return {
        "val_top1": acc(correct1, every),
        "val_top5": acc(correct5, every),
        "val_top1_seen": acc(correct1, seen_t),
        "val_top1_unseen": acc(correct1, ~seen_t),
        "per_class": per_class,
    }


def val_loader(samples: list[D.Sample], names: list[str], transform: D.ImageTransform,
               tokenizer: Any, max_length: int, rank: int, world_size: int, batch_size: int,
               num_workers: int, wrap: Callable[[Any], Any] = lambda ds: ds,
               device: torch.device | None = None, local_ranks: int = 1) -> Any:
    """This rank's shard of the val set (every `world_size`-th sample from `rank`), in
    batches of `batch_size` delivered on `device`; `wrap` turns the dataset into its cached
    form; `local_ranks` share this node's shared memory (`data.plan_loader`)."""
    ds = wrap(D.ImageTextDataset(samples, names, transform, ["{}"], "templates", 0))
    mine = list(range(rank, len(samples), world_size))
    batches = [[(i, 0) for i in mine[j:j + batch_size]] for j in range(0, len(mine), batch_size)]
    pin = device is not None and device.type == "cuda"
    return D.make_loader(ds, batches, D.Collate(tokenizer, max_length), num_workers,
                         pin_memory=pin, device=device, local_ranks=local_ranks)


@dataclass
class Evaluator:
    """Zero-shot evaluation of the current model on this rank's shard of the val set.

    Every call rebuilds the class embeddings from the current text tower (prompt ensembling
    over the eval templates). With a frozen vision tower the val image embeddings cannot
    change, so they are computed at the first call only and kept for the trial."""

    enc: DualEncoder
    loader: Any
    names: list[str]
    templates: list[str]
    seen: list[bool]
    tokenizer: Any
    max_length: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Any = contextlib.nullcontext
    batch_size: int = 256
    world_size: int = 1
    group: Any = None
    images: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __call__(self) -> dict[str, Any]:
        """`zero_shot_metrics`' fields plus `skipped_val` (unreadable val images)."""
        was_training = self.enc.training
        self.enc.eval()
        try:
            if self.images is None or not self.enc.freeze_vision:
                self.images = image_embeddings(self.enc, self.loader, self.device,
                                               self.autocast)
            img, labels, skipped = self.images
            cls = class_text_embeddings(self.enc, self.names, self.templates, self.tokenizer,
                                        self.max_length, self.device, self.autocast,
                                        self.batch_size)
            m = zero_shot_metrics(img, labels, cls, self.seen, self.world_size, self.group)
        finally:
            self.enc.train(was_training)
        return {**m, "skipped_val": skipped}
