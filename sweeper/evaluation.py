"""Evaluation of the current model on the val set: zero-shot classification (class text
embeddings rebuilt from the current text tower; top-1/top-5, per-class and mean per-class
recall, summed over every rank) and image-text retrieval on the val images that have
captions (recall@1/5/10 both ways, over the images and captions of every rank).

Pure functions over embeddings, each with its one-process path as the reference and the
process group as an argument. Never imports Ray; the worker loop calls an `Evaluator` at
each evaluation point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from sweeper import data as D
from sweeper.models import DualEncoder, image_inputs

RECALL_KS = (1, 5, 10)
# Similarity rows scored at once by the retrieval metrics: rows x candidates floats.
RETRIEVAL_CHUNK = 1 << 24


class ValImages(NamedTuple):
    """This rank's val image embeddings `embeds` [n, d] (normalised), their class `labels`
    [n] and val-sample `index` [n] (position in the val split, unique over ranks), and how
    many val images were `skipped` (unreadable)."""

    embeds: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    skipped: int


@torch.no_grad()
def text_embeddings(enc: DualEncoder, texts: Sequence[str], tokenizer: Any, max_length: int,
                    device: torch.device, autocast: Any, batch_size: int = 256) -> torch.Tensor:
    """[n, d] normalised embeddings of `texts` from the *current* text tower, encoded in
    batches of `batch_size`, tokenised as training tokenises them (`data.tokenize`)."""
    embs = []
    for i in range(0, len(texts), batch_size):
        tok = D.tokenize(tokenizer, list(texts[i:i + batch_size]), max_length)
        mask = tok.get("attention_mask")
        with autocast():
            e = enc.encode_text(tok["input_ids"].to(device),
                                mask.to(device) if mask is not None else None)
        embs.append(e.float())
    if not embs:
        return torch.zeros(0, 0, device=device)
    return torch.cat(embs)


def class_text_embeddings(enc: DualEncoder, names: list[str], templates: list[str],
                          tokenizer: Any, max_length: int, device: torch.device,
                          autocast: Any, batch_size: int = 256) -> torch.Tensor:
    """[C, d] class embeddings from the *current* text tower: the normalised embeddings of
    every template filled with the class name, averaged (prompt ensembling), renormalised.
    The C x T prompts are encoded in batches of `batch_size`."""
    prompts = [t.format(name) for name in names for t in templates]
    per_prompt = text_embeddings(enc, prompts, tokenizer, max_length, device, autocast,
                                 batch_size).view(len(names), len(templates), -1)
    return nn.functional.normalize(per_prompt.mean(1), dim=-1)


@torch.no_grad()
def image_embeddings(enc: DualEncoder, loader: Any, device: torch.device,
                     autocast: Any) -> ValImages:
    """The embeddings, labels and val indices of this rank's shard of the val set, through
    the same preprocessing and image inputs as training (`models.image_inputs`)."""
    embs, labels, index, skipped = [], [], [], 0
    for batch in loader:
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        with autocast():  # on the device already (D.make_loader)
            e = enc.encode_image(**image_inputs(batch))
        embs.append(e.float())
        labels.append(batch["labels"].to(device))
        index.append(batch["index"].to(device))
    if not embs:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return ValImages(torch.zeros(0, 1, device=device), empty, empty.clone(), skipped)
    return ValImages(torch.cat(embs), torch.cat(labels), torch.cat(index), skipped)


def zero_shot_metrics(img: torch.Tensor, labels: torch.Tensor, cls: torch.Tensor,
                      seen: list[bool], world_size: int, group: Any = None) -> dict[str, Any]:
    """Top-1/top-5, per-class top-1 and mean per-class recall over every rank's shard
    (counts summed).

    `img` [n, d] and `cls` [C, d] are normalised embeddings, `labels` [n] index the classes,
    `seen[c]` says whether class c was trained on. `val_top1_seen` / `val_top1_unseen` are
    the top-1 over the images of seen / unseen classes (None when there are none); top-5
    is top-min(5, C). `per_class[c]` is None for a class without val images.
    `val_mean_per_class_recall` (CLIP_benchmark's `mean_per_class_recall`) is the mean of
    the per-class top-1 over the classes with val images, each class weighing the same
    whatever its image count; `_seen` / `_unseen` over those classes only."""
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

    def mean_recall(mask: torch.Tensor) -> float | None:
        has = mask & (count > 0)
        return (correct1[has] / count[has]).mean().item() if has.any() else None

    every = torch.ones_like(seen_t)
    per_class = [c / n if n else None for c, n in zip(correct1.tolist(), count.tolist(),
                                                      strict=True)]
    return {
        "val_top1": acc(correct1, every),
        "val_top5": acc(correct5, every),
        "val_top1_seen": acc(correct1, seen_t),
        "val_top1_unseen": acc(correct1, ~seen_t),
        "val_mean_per_class_recall": mean_recall(every),
        "val_mean_per_class_recall_seen": mean_recall(seen_t),
        "val_mean_per_class_recall_unseen": mean_recall(~seen_t),
        "per_class": per_class,
    }


# --------------------------------------------------------------------------- retrieval


def gather_rows(x: torch.Tensor, world_size: int, group: Any = None) -> torch.Tensor:
    """The rows of `x` of every rank, in rank order (ranks may hold different numbers of
    rows: each pads to the largest for `all_gather`, then the padding is dropped)."""
    if world_size == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n, group=group)
    most = max(int(s) for s in sizes)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[:x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:int(s)] for o, s in zip(out, sizes, strict=True)])


def _hits(queries: torch.Tensor, query_ids: torch.Tensor, candidates: torch.Tensor,
          candidate_ids: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """[len(ks)] float64: how many queries have a candidate of their own id among their k
    most similar candidates, for each k (k above the candidate count: all of them). Scored
    in chunks of queries, so memory stays at RETRIEVAL_CHUNK similarities."""
    hits = torch.zeros(len(ks), dtype=torch.float64, device=queries.device)
    if not queries.shape[0] or not candidates.shape[0]:
        return hits
    top_k = min(max(ks), candidates.shape[0])
    step = max(1, RETRIEVAL_CHUNK // candidates.shape[0])
    for i in range(0, queries.shape[0], step):
        sims = queries[i:i + step] @ candidates.T
        mine = candidate_ids[sims.topk(top_k, dim=-1).indices] == query_ids[i:i + step, None]
        for j, k in enumerate(ks):
            hits[j] += mine[:, :k].any(-1).sum()
    return hits


def retrieval_metrics(img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor,
                      txt_img: torch.Tensor, world_size: int = 1, group: Any = None,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, float | None]:
    """Image-text retrieval recall over the images and captions of every rank.

    `img` [n, d]: this rank's normalised embeddings of val images that have captions, with
    their ids `img_ids` [n] (unique over ranks); `txt` [m, d]: the normalised embeddings of
    those images' captions, `txt_img` [m] the id of each caption's image. `val_i2t_r{k}`:
    the share of images with one of their captions among the k captions most similar to
    them; `val_t2i_r{k}`: the share of captions whose image is among the k images most
    similar to them; both over every rank's images and captions (each rank scores its own
    queries against everyone's candidates; the hits are summed). None without captions."""
    all_img, all_img_ids = gather_rows(img, world_size, group), gather_rows(img_ids, world_size,
                                                                           group)
    all_txt, all_txt_img = gather_rows(txt, world_size, group), gather_rows(txt_img, world_size,
                                                                           group)
    counts = torch.tensor([img.shape[0], txt.shape[0]], dtype=torch.float64, device=img.device)
    hits = torch.cat([_hits(img, img_ids, all_txt, all_txt_img, ks),
                      _hits(txt, txt_img, all_img, all_img_ids, ks), counts])
    if world_size > 1:
        dist.all_reduce(hits, group=group)
    i2t, t2i, (n_img, n_txt) = hits[:len(ks)], hits[len(ks):2 * len(ks)], hits[-2:].tolist()
    out: dict[str, float | None] = {}
    for name, h, n in (("i2t", i2t, n_img), ("t2i", t2i, n_txt)):
        for k, v in zip(ks, h.tolist(), strict=True):
            out[f"val_{name}_r{k}"] = v / n if n else None
    return out


def retrieval_captions(setting: bool | str, samples: Sequence[D.Sample]
                       ) -> list[tuple[str, ...]] | None:
    """The captions of each val sample when retrieval is on, else None: `eval.retrieval`
    `true`, or `auto` when some val image has a caption. `true` without any refuses."""
    has = any(s.captions for s in samples)
    if setting is True and not has:
        raise D.DataError("eval.retrieval: true, but no val image has a caption")
    if setting is False or not has:
        return None
    return [s.captions for s in samples]


def caption_pairs(index: torch.Tensor, captions: Sequence[Sequence[str]]
                  ) -> tuple[list[int], list[str], list[int]]:
    """(rows of `index` whose image has captions, those captions flattened, the val index
    of each caption's image), for the val indices `index` of this rank's images."""
    rows, texts, owners = [], [], []
    for row, i in enumerate(index.tolist()):
        if captions[i]:
            rows.append(row)
            texts.extend(captions[i])
            owners.extend([i] * len(captions[i]))
    return rows, texts, owners


def val_loader(samples: list[D.Sample], names: list[str], transform: D.Transform,
               tokenizer: Any, max_length: int, rank: int, world_size: int, batch_size: int,
               num_workers: int, wrap: Callable[[Any], Any] = lambda ds: ds,
               device: torch.device | None = None, local_ranks: int = 1,
               reader: Any = None) -> Any:
    """This rank's share of the val set (`data.eval_batches`: every `world_size`-th sample
    from `rank`, or a contiguous share of a streamed dataset's shards), in batches of
    `batch_size` delivered on `device`; `reader` reads the images in the dataset's format;
    `wrap` turns the dataset into its cached form; `local_ranks` share this node's shared
    memory (`data.plan_loader`)."""
    ds = wrap(D.ImageTextDataset(samples, names, transform, ["{}"], "templates", 0,
                                 reader=reader))
    batches = D.eval_batches(ds, rank, world_size, batch_size)
    pin = device is not None and device.type == "cuda"
    return D.make_loader(ds, batches, D.Collate(tokenizer, max_length), num_workers,
                         pin_memory=pin, device=device, local_ranks=local_ranks)


@dataclass
class Evaluator:
    """Zero-shot evaluation, and retrieval when `captions` is given, of the current model
    on this rank's shard of the val set.

    Every call rebuilds the class embeddings (prompt ensembling over the eval templates) and
    the caption embeddings from the current text tower. With a frozen vision tower the val
    image embeddings cannot change, so they are computed at the first call only and kept
    for the trial. `captions[i]`: the captions of val sample i (empty: none)."""

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
    images: ValImages | None = None
    captions: Sequence[Sequence[str]] | None = None

    def __call__(self) -> dict[str, Any]:
        """`zero_shot_metrics`' fields, `retrieval_metrics`' when there are captions, and
        `skipped_val` (unreadable val images)."""
        was_training = self.enc.training
        self.enc.eval()
        try:
            if self.images is None or not self.enc.freeze_vision:
                self.images = image_embeddings(self.enc, self.loader, self.device,
                                               self.autocast)
            img, labels, index, skipped = self.images
            cls = class_text_embeddings(self.enc, self.names, self.templates, self.tokenizer,
                                        self.max_length, self.device, self.autocast,
                                        self.batch_size)
            m = zero_shot_metrics(img, labels, cls, self.seen, self.world_size, self.group)
            if self.captions is not None:
                m.update(self._retrieval(img, index, cls.shape[1]))
        finally:
            self.enc.train(was_training)
        return {**m, "skipped_val": skipped}

    def _retrieval(self, img: torch.Tensor, index: torch.Tensor, dim: int) -> dict[str, Any]:
        rows, texts, owners = caption_pairs(index, self.captions)
        txt = text_embeddings(self.enc, texts, self.tokenizer, self.max_length, self.device,
                              self.autocast, self.batch_size)
        # A rank without captioned images still joins the gathers, with [0, d] rows.
        mine = img[rows] if rows else img.new_zeros(0, dim)
        txt = txt if texts else img.new_zeros(0, dim)
        return retrieval_metrics(mine, index[rows] if rows else index[:0], txt,
                                 torch.tensor(owners, dtype=torch.long, device=self.device),
                                 self.world_size, self.group)
