"""Loading: the image-text dataset, the collate, the global-batch sampler and the loader
that hands batches to the step on the device."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sweeper.data.base import Sample
from sweeper.data.formats.base import Reader
from sweeper.data.formats.folder import FolderReader
from sweeper.data.selection import pick_text
from sweeper.data.streaming import StreamedBatches, StreamPlan
from sweeper.data.transform import ImageTransform, Transform
from sweeper.families import IMAGE_KEYS

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- datasets


_WARNED: set[str] = set()


def _warn_bad(where: str, err: BaseException) -> None:
    """Log an unreadable image once per process."""
    if where not in _WARNED:
        _WARNED.add(where)
        log.warning("skipping unreadable image %s: %s: %s", where, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")


class _Items(list):
    """The items of one batch (a list of item dicts, as `__getitem__` makes them) whose
    images already sit in one uint8 tensor `uint8` [n, H, W, 3] (item `pixel_values` are
    views of its rows); `transform` normalises it. Built in shared memory inside a
    DataLoader worker, so the batch crosses to the main process without another copy."""

    uint8: torch.Tensor | None = None
    transform: ImageTransform | None = None


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, allocated in shared memory so that
    sending the batch to the main process copies nothing (as torch's default_collate
    does)."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=dtype)
            storage = proto._typed_storage()._new_shared(math.prod(shape), device="cpu")
            return proto.new(storage).view(*shape)
        except (AttributeError, RuntimeError):  # private API moved: plain memory
            pass
    return torch.empty(*shape, dtype=dtype)


def _batch_buffer(n: int, h: int, w: int) -> torch.Tensor:
    """An uninitialised [n, h, w, 3] uint8 tensor (in shared memory in a worker)."""
    return _shared_empty((n, h, w, 3))


class ImageTextDataset(torch.utils.data.Dataset):
    """Indexable by `(index, epoch)` so the text drawn per sample changes with the epoch
    even inside persistent DataLoader workers (they never see a `set_epoch` call).

    `reader` reads the images in the dataset's format (`Format.reader`; default: samples
    are local image files). A streamed format's images come in whole batches, read with
    their shard (`streaming.StreamedBatches` calls `batch_from_bytes`).

    An unreadable, truncated or decompression-bomb image is logged once, counted
    (`skipped` on the item) and never raises. With `substitute_bad` (training, formats
    read by image), the next readable sample takes its place so every rank keeps the same
    batch size (the global-batch losses need equal shards); otherwise the item is only the
    count (the ranks then agree on the smallest batch, `Agreement.batch`).
    """

    def __init__(self, samples: Sequence[Sample], names: Sequence[str], transform: Transform,
                 templates: Sequence[str], text_source: str, seed: int,
                 substitute_bad: bool = False, reader: Reader | None = None) -> None:
        self.samples = list(samples)
        self.names = list(names)
        self.transform = transform
        self.templates = list(templates)
        self.text_source = text_source
        self.seed = seed
        self.substitute_bad = substitute_bad
        self.reader = reader if reader is not None else FolderReader()
        self._bytes: dict[int, bytes | None] | None = None

    @property
    def streamed(self) -> bool:
        """Its images are read shard by shard (a `StreamPlan` orders them), not by index."""
        return self.reader.streamed

    def __len__(self) -> int:
        return len(self.samples)

    # -- reading

    def _open(self, index: int) -> Image.Image:
        if self._bytes is not None:  # a streamed batch: read with its shard
            data = self._bytes.get(index)
            if not data:
                raise OSError("unreadable in its shard (corrupt, truncated or too large)")
            return Image.open(io.BytesIO(data))
        return Image.open(self.reader.open(self.samples[index]))

    def load_uint8(self, index: int) -> np.ndarray | None:
        """The sample's image resized for the model (HWC uint8), or None (logged) when it
        cannot be read. Decompression-bomb warnings count as errors."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with self._open(index) as im:
                    return self.transform.resize_uint8(im)
        except Exception as e:  # any decoder failure: one bad file never ends a trial
            _warn_bad(self.reader.where(self.samples[index]), e)
            return None

    @contextlib.contextmanager
    def prefetched(self, images: dict[int, bytes | None]) -> Iterator[None]:
        """Within: samples are read from `images` ({index: bytes, None when unreadable}),
        the bytes a streamed format read with their shard."""
        self._bytes = images
        try:
            yield
        finally:
            self._bytes = None

    def batch_from_bytes(self, keys: Sequence[tuple[int, int]],
                         images: dict[int, bytes | None]) -> _Items:
        """The batch of `keys` (as `__getitems__` builds it) from image bytes already read
        (None: unreadable)."""
        with self.prefetched(images):
            return self.__getitems__(keys)

    def _readable(self, index: int) -> tuple[int, np.ndarray | None, int]:
        """(index actually used, its pixels, bad images met)."""
        arr = self.load_uint8(index)
        if arr is not None or not self.substitute_bad or self._bytes is not None:
            return index, arr, int(arr is None)
        bad, n = 1, len(self.samples)
        for j in range(1, min(n, 16)):
            alt = (index + j) % n  # a neighbour: usually the same class
            arr = self.load_uint8(alt)
            if arr is not None:
                return alt, arr, bad
            bad += 1
        return index, None, bad

    def _item(self, index: int, epoch: int, used: int,
              image: dict[str, torch.Tensor] | None, bad: int) -> dict[str, Any]:
        """One sample's item: its image inputs (`image`, keys of `IMAGE_KEYS`), label,
        text and index; only the count of unreadable images when `image` is None."""
        if image is None:
            return {"skipped": bad}
        s = self.samples[used]
        text = pick_text(s, self.names[s.label], self.templates, self.text_source, self.seed,
                         epoch, used)
        return {**image, "label": s.label, "text": text, "index": used, "skipped": bad}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        used, arr, bad = self._readable(index)
        return self._item(index, epoch, used, None if arr is None else
                          self.transform.inputs(arr), bad)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> _Items:
        """A whole batch (what `Collate` takes): images read grouped by file (Parquet rows
        by row group),
        each image resized straight into one uint8 batch tensor (normalised later, once
        per batch, by `Collate` or by the loader `make_loader` builds)."""
        keys = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        size = self.transform.output_size
        if size is None or not keys:  # sizes differ per image: one float tensor each
            return _Items(self[k] for k in keys)
        order = sorted(range(len(keys)), key=lambda i: (*self.samples[keys[i][0]].id, i))
        items = _Items([None] * len(keys))
        items.uint8, items.transform = _batch_buffer(len(keys), *size), self.transform
        rows = items.uint8.numpy()
        for i in order:
            index, epoch = keys[i]
            used, arr, bad = self._readable(index)
            if arr is not None:
                rows[i] = arr
            items[i] = self._item(index, epoch, used, None if arr is None else
                                  {"pixel_values": items.uint8[i]}, bad)
        return items


@dataclass
class Collate:
    """Tokenise the batch's texts and stack its images; drop unreadable samples.

    `pixel_values`: [b, 3, H, W] float, normalised; or, with `uint8` (set by `make_loader`,
    whose loader then normalises in the consuming process or on the GPU), the batch's
    [b, H, W, 3] uint8 pixels, a quarter of the bytes to move between processes. NaFlex
    items (`PatchTransform`) stack into `pixel_values` [b, P, p*p*3] float with
    `pixel_attention_mask` [b, P] and `spatial_shapes` [b, 2]."""

    tokenizer: Any
    max_length: int
    uint8: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good_idx = [i for i, it in enumerate(items) if it and "pixel_values" in it]
        skipped = sum(int(it.get("skipped", 0)) for it in items if it)
        if not good_idx:
            return {"skipped": skipped, "size": 0}
        good = [items[i] for i in good_idx]
        pixels = getattr(items, "uint8", None)
        if pixels is not None:
            if len(good_idx) < len(items):
                pixels = pixels[torch.tensor(good_idx)]
            if not self.uint8:  # normalised here, in the worker process when there is one
                n, h, w, _ = pixels.shape
                pixels = items.transform.normalize(
                    pixels, out=_shared_empty((n, 3, h, w), torch.float32))
        else:
            pixels = torch.stack([it["pixel_values"] for it in good])
        extra = {k: torch.stack([it[k] for it in good]) for k in IMAGE_KEYS[1:] if k in good[0]}
        tok = self.tokenize([it["text"] for it in good])
        return {
            "pixel_values": pixels,
            **extra,
            "input_ids": tok["input_ids"],
            "attention_mask": tok.get("attention_mask"),
            "labels": torch.tensor([it["label"] for it in good], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "skipped": skipped,
            "size": len(good),
        }

    def tokenize(self, texts: list[str]) -> Any:
        return tokenize(self.tokenizer, texts, self.max_length)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> Any:
    """`texts` as the text tower takes them (`input_ids`, and `attention_mask` when the
    tokenizer makes one, [n, max_length] tensors): padded to `max_length` (the released
    SigLIP and SigLIP 2 towers were trained on max-length padding), truncated."""
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")


def trim_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first `n` samples of a collated batch (views: on a GPU, no copy and no sync), so
    that every rank steps on slices of one shape when one of them lost unreadable images."""
    if n >= batch["size"]:
        return batch
    out = {k: v[:n] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch["size"]
           else v for k, v in batch.items()}
    out["size"] = n
    return out


@dataclass
class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of every *global* batch of one epoch.

    The epoch's permutation (seeded by seed + epoch) is cut into global batches of
    `batch_size`; rank r takes items [r*b, (r+1)*b) of each, b = batch_size / world_size.
    The last incomplete batch is dropped, unless it is the only one (fewer samples than one
    batch), in which case it is trimmed to a multiple of the world size. Every rank therefore
    runs the same number of steps, and the union over ranks is exactly the global batch.
    """

    n: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0
    skip_batches: int = 0

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        full = self.n // self.batch_size
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(full)]
        if not batches:
            keep = (self.n // self.world_size) * self.world_size
            batches = [order[:keep]] if keep else []
        return batches

    def __len__(self) -> int:
        return max(0, len(self.global_batches()) - self.skip_batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for gb in self.global_batches()[self.skip_batches:]:
            b = len(gb) // self.world_size
            mine = gb[self.rank * b:(self.rank + 1) * b]
            yield [(i, self.epoch) for i in mine]


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps in one epoch of `n` samples at global `batch_size`."""
    return n // batch_size if n >= batch_size else int(n >= world_size)


def flip_mask(seed: int, epoch: int, n: int) -> torch.Tensor:
    """[n] bool: which samples `data.augment: flip` mirrors this epoch. A function of
    (seed, epoch, sample index) only, so any world size, worker count or resume point
    flips the same images."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    return torch.rand(n, generator=g) < 0.5


class DeviceBatches:
    """The batches of a DataLoader on `device`, ready for the step: the one place a batch
    moves to the device.

    Tensors are copied with `non_blocking=True` (the loader pins them on CUDA, so the copy
    overlaps the step still running); uint8 pixels (`Collate.uint8`: a quarter of the bytes
    of float ones cross processes and PCIe) are normalised there; `augment == "flip"`
    mirrors the images `flip_mask` picks, on the device. Nothing here reads a device value
    back, and the only host-to-device copies of a batch are its own tensors: the
    normalisation constants are copied once per loader and the flip mask once per epoch
    (a copy from pageable memory blocks the host). Other attributes are the DataLoader's."""

    def __init__(self, loader: Any, device: torch.device | None = None,
                 transform: ImageTransform | None = None, augment: str = "none",
                 seed: int = 0, sampler: Any = None) -> None:
        self.loader = loader
        self.device = device or torch.device("cpu")
        self.transform, self.augment, self.seed, self.sampler = transform, augment, seed, sampler
        self._flips: tuple[int, torch.Tensor] | None = None
        self._affine = (transform.affine_on(self.device)
                        if transform is not None and self.device.type != "cpu" else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.finish(batch)

    def finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One batch of the loader, moved, normalised and augmented."""
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor)
                     else v for k, v in batch.items()}
        px = batch.get("pixel_values")
        if isinstance(px, torch.Tensor) and px.dtype == torch.uint8 and self.transform:
            px = batch["pixel_values"] = self.transform.normalize(px, affine=self._affine)
        index = batch.get("index")
        if self.augment == "flip" and isinstance(px, torch.Tensor) and index is not None:
            if px.dim() != 4:  # a NaFlex patch sequence is not an image to mirror
                raise ValueError("data.augment: flip needs fixed-size images")
            epoch = getattr(self.sampler, "epoch", 0)
            if self._flips is None or self._flips[0] != epoch:
                mask = flip_mask(self.seed, epoch, len(self.loader.dataset))
                self._flips = (epoch, mask.to(self.device))
            mask = self._flips[1][index]  # a gather on the device
            batch["pixel_values"] = torch.where(mask.view(-1, 1, 1, 1), px.flip(-1), px)
        return batch


# The share of /dev/shm's free space that the DataLoaders of one node's trial workers may
# hold in batches in flight: a worker process hands each batch over in shared memory, and a
# full /dev/shm kills the loader with a bus error (containers often give it 64 MiB).
SHM_SHARE = 0.5
PREFETCH = 2  # batches in flight per DataLoader worker at most (torch's default)
MAX_LOADER_WORKERS = 32


def loader_workers(num_workers: int | str, cpus: float) -> int:
    """`data.num_workers` as a count: as written, or for `auto` the CPUs the trial worker
    reserves (`scaling.resources_per_worker.CPU`) less the one its training loop uses,
    and at least 1, so that decoding always overlaps the step (a GPU worker that names no
    CPU reserves none: name them, see docs/gpu.md)."""
    if num_workers != "auto":
        return int(num_workers)
    return max(1, min(MAX_LOADER_WORKERS, math.floor(cpus + 1e-9) - 1))


def batch_nbytes(n: int, transform: ImageTransform | None, max_length: int,
                 pixel_bytes: int = 1) -> int:
    """Bytes of one collated batch of `n` samples as a DataLoader worker hands it over:
    pixels [n, H, W, 3] at the model's input size (uint8: `pixel_bytes` 1; float32,
    normalised in the worker: 4), int64 token ids and attention mask [n, L], and int64
    labels and indices."""
    h, w = (transform.output_size or (transform.height, transform.width)) if transform \
        else (0, 0)
    return n * (h * w * 3 * pixel_bytes + 2 * 8 * max_length + 2 * 8)


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory filesystem (None where there is none)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def plan_loader(num_workers: int, nbytes: int, local_ranks: int = 1,
                shm_free: int | None = None, prefetch: int = PREFETCH
                ) -> tuple[int, int, str | None]:
    """(DataLoader workers, prefetch_factor, a note when they were lowered) such that the
    batches in flight (workers x prefetch, each `nbytes`) of the `local_ranks` trial
    workers on this node fit `SHM_SHARE` of `shm_free`. With too little shared memory for
    one batch per worker, fewer workers; for none, decoding in the training process."""
    if num_workers <= 0 or shm_free is None or nbytes <= 0:
        return num_workers, prefetch, None
    budget = int(shm_free * SHM_SHARE) // max(1, local_ranks)
    fits = budget // nbytes  # batches in flight this rank may hold
    if fits >= num_workers * prefetch:
        return num_workers, prefetch, None
    workers = min(num_workers, fits)
    pf = max(1, fits // workers) if workers else prefetch
    mib = shm_free / 2**20
    note = (f"/dev/shm has {mib:.0f} MiB free for {local_ranks} trial worker(s) and a batch "
            f"takes {nbytes / 2**20:.1f} MiB: {workers} DataLoader workers (of "
            f"{num_workers}) x {pf} batches in flight; enlarge /dev/shm (docker "
            "--shm-size, a Kubernetes emptyDir of medium Memory) to feed the GPU")
    return workers, pf, note


def make_loader(ds: torch.utils.data.Dataset, sampler: Any, collate: Any, num_workers: int,
                pin_memory: bool = False, device: torch.device | None = None,
                augment: str = "none", seed: int = 0, local_ranks: int = 1) -> DeviceBatches:
    """A DataLoader over a batch sampler (workers persist across epochs when there are any),
    its batches delivered on `device` by `DeviceBatches`. A `StreamPlan` as the sampler
    (a streamed dataset: `batch_plan`) makes the workers read the plan's shards front to
    back, each building its own batches (`streaming.StreamedBatches`).

    With an `ImageTextDataset` and a `Collate`, decoded images bound for an accelerator
    cross from the workers as uint8 (a quarter of the bytes through shared memory and
    PCIe) and are normalised once per batch, on the device; bound for the CPU, they are
    normalised in the worker processes, off the training process. The workers and their
    prefetching are bounded by the shared memory of this node (`plan_loader`), shared by
    its `local_ranks` trial workers."""
    transform = getattr(ds, "transform", None)
    images = isinstance(collate, Collate) and isinstance(transform, ImageTransform)
    wrap = images and device is not None and device.type != "cpu"
    if wrap:
        collate = dataclasses.replace(collate, uint8=True)
    prefetch = PREFETCH
    streamed = isinstance(sampler, StreamPlan)
    if num_workers > 0:
        n = sampler.per_rank_batch if streamed else len(next(iter(sampler), []))
        nbytes = batch_nbytes(n, transform if images else None,
                              getattr(collate, "max_length", 0), 1 if wrap else 4)
        num_workers, prefetch, note = plan_loader(num_workers, nbytes, local_ranks,
                                                  shm_free_bytes())
        if note and note not in _WARNED:
            _WARNED.add(note)
            log.warning("loader: %s", note)
    # The batch sampler runs in this process, so a persistent worker still sees each
    # epoch's new order; a stream plan keeps its epoch in shared memory for the same
    # reason. Keeping workers alive saves their start-up every epoch.
    common = {"collate_fn": collate, "num_workers": num_workers, "pin_memory": pin_memory,
              "persistent_workers": num_workers > 0,
              "prefetch_factor": prefetch if num_workers > 0 else None}
    if streamed:
        sampler.workers = num_workers
        loader = torch.utils.data.DataLoader(StreamedBatches(ds, sampler), batch_size=None,
                                             **common)
    else:
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, **common)
    return DeviceBatches(loader, device, transform if wrap else None, augment, seed, sampler)


def batch_plan(ds: Any, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
               shuffle_buffer: int = 1000) -> GlobalBatchSampler | StreamPlan:
    """The training batches of `ds` on this rank: its slice of each global batch of
    `batch_size`, over a full permutation of the split (`GlobalBatchSampler`), or for a
    streamed dataset over its shards (`StreamPlan`, with a shuffle buffer)."""
    if getattr(ds, "streamed", False):
        return StreamPlan(ds.samples, batch_size, rank, world_size, seed, True, shuffle_buffer)
    return GlobalBatchSampler(len(ds), batch_size, rank, world_size, seed)


def eval_batches(ds: Any, rank: int, world_size: int, batch_size: int) -> Any:
    """This rank's share of an evaluation set in batches of `batch_size`: every
    `world_size`-th sample from `rank`, or for a streamed dataset a contiguous share of
    its shards (`StreamPlan`); the ranks' shares cover every sample once."""
    if getattr(ds, "streamed", False):
        return StreamPlan(ds.samples, batch_size, rank, world_size, train=False)
    mine = list(range(rank, len(ds), world_size))
    return [[(i, 0) for i in mine[j:j + batch_size]] for j in range(0, len(mine), batch_size)]
