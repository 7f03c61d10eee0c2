"""Exact global batches from a streamed dataset (WebDataset shards: read front to back,
never by image).

`StreamPlan` decides, from the split's index alone (which sample sits where in which
shard), which samples every rank and every DataLoader worker reads and in which order, as
a deterministic function of `(seed, epoch)` for a given number of ranks and DataLoader
workers:

1. the shards are shuffled per epoch (`seed`, `epoch`), and their samples concatenated in
   that order: the epoch's stream;
2. the stream is cut into `G = N // batch_size` global batches' worth of samples (the
   folder layout's `steps_per_epoch`), rank r taking the r-th contiguous share of
   `G * batch_size / world_size` samples, so every rank runs exactly G steps and the last
   `N - G * batch_size` samples of the stream wait for another epoch;
3. a rank's batches go round-robin to its DataLoader workers (batch j to worker
   `j mod workers`, as the DataLoader collects them), each worker reading the contiguous
   stretch of the stream its batches need, through a shuffle buffer of `shuffle_buffer`
   samples (WebDataset's: the next sample out is drawn at random from the buffer);
4. the buffer is simulated on sample indices, so the plan knows every batch before any byte
   is read: a trial resumed after `k` batches of an epoch skips exactly those batches'
   samples (it reads its stretch again, keeping only what later batches need), and sees no
   sample twice in that epoch.

A worker holds at most `shuffle_buffer + batch` samples' bytes (about 110 KB each for
ImageNet JPEGs), against the folder layout's full shuffle of the split: a sample's
neighbours in a batch come from the shards read at the same time (one per worker), which
the per-epoch shard shuffle changes every epoch.

Never imports Ray.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

DEFAULT_SHUFFLE_BUFFER = 1000


def buffer_shuffle(items: Sequence[int], size: int, rng: random.Random) -> list[int]:
    """`items` through a shuffle buffer of `size` (WebDataset's `shuffle`): each new item
    replaces a random one of the full buffer, which comes out; the rest drained at random.
    `size` <= 1 keeps the order."""
    if size <= 1:
        return list(items)
    buf: list[int] = []
    out: list[int] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        out.append(buf[i])
        buf[i] = x
    rng.shuffle(buf)
    return out + buf


class StreamPlan:
    """The batches of one rank of a streamed dataset, per epoch (see the module
    docstring). `samples` in stream order (shard by shard, as the scan lists them);
    `batch_size`: the global batch when training (`train=True`: shuffled, whole global
    batches only), the per-rank batch when evaluating (the rank's contiguous share of the
    split, in order, the last batch short).

    `epoch` and `skip_batches` (batches of this epoch already done) are set before each
    epoch's pass, as on `GlobalBatchSampler`; they live in shared memory so that
    persistent DataLoader workers see them. `workers`: DataLoader worker processes
    (`make_loader` sets it)."""

    def __init__(self, samples: Sequence[Any], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, train: bool = True,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> None:
        self.shards: list[list[int]] = []
        last = object()
        for i, s in enumerate(samples):
            if s.path != last:
                self.shards.append([])
                last = s.path
            self.shards[-1].append(i)
        self.n = len(samples)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.train, self.shuffle_buffer = seed, train, shuffle_buffer
        self.workers = 0
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._state[0] = value

    @property
    def skip_batches(self) -> int:
        return int(self._state[1])

    @skip_batches.setter
    def skip_batches(self, value: int) -> None:
        self._state[1] = value

    @property
    def slots(self) -> int:
        """Readers that split the rank's batches: one per DataLoader worker (at least 1)."""
        return max(1, self.workers)

    @property
    def per_rank_batch(self) -> int:
        return self.batch_size // self.world_size if self.train else self.batch_size

    def stream(self) -> list[int]:
        """The epoch's sample order before the shuffle buffer: shards shuffled (training)."""
        order = list(range(len(self.shards)))
        if self.train:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)
        return [i for k in order for i in self.shards[k]]

    def _rank(self) -> tuple[list[int], list[int]]:
        """(this rank's share of the stream, the sizes of its batches in order)."""
        stream, world = self.stream(), self.world_size
        if not self.train:
            lo, hi = self.n * self.rank // world, self.n * (self.rank + 1) // world
            b = self.batch_size
            return stream[lo:hi], [min(b, hi - lo - j) for j in range(0, hi - lo, b)]
        g, b = self.n // self.batch_size, self.batch_size // world
        if g == 0:  # fewer samples than one batch: one batch of a multiple of the ranks
            keep = (self.n // world) * world
            g, b = (1, keep // world) if keep else (0, 0)
        return stream[self.rank * g * b:(self.rank + 1) * g * b], [b] * g

    def slot_batches(self, slot: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """([(batch number j, its sample indices)] of the batches `j mod slots == slot`,
        the slot's stretch of the stream in read order)."""
        share, sizes = self._rank()
        mine = [j for j in range(len(sizes)) if j % self.slots == slot]
        start = sum(sum(sizes[j] for j in range(len(sizes)) if j % self.slots == k)
                    for k in range(slot))
        stretch = share[start:start + sum(sizes[j] for j in mine)]
        order = stretch
        if self.train:
            rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{slot}")
            order = buffer_shuffle(stretch, self.shuffle_buffer, rng)
        out, at = [], 0
        for j in mine:
            out.append((j, order[at:at + sizes[j]]))
            at += sizes[j]
        return out, stretch

    def n_batches(self) -> int:
        return len(self._rank()[1])

    def __len__(self) -> int:
        return max(0, self.n_batches() - self.skip_batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """This rank's remaining batches of the epoch, in order, as `(index, epoch)` keys
        (what a DataLoader worker builds its batch from)."""
        per_slot = [dict(self.slot_batches(k)[0]) for k in range(self.slots)]
        for j in range(self.skip_batches, self.n_batches()):
            yield [(i, self.epoch) for i in per_slot[j % self.slots][j]]


def read_batches(reader: Any, samples: Sequence[Any], batches: list[tuple[int, list[int]]],
                 stretch: Sequence[int]) -> Iterator[tuple[int, list[int], dict[int, Any]]]:
    """(batch number, sample indices, {index: image bytes or None}) of each of `batches`,
    in order, reading only the samples they hold from `reader.stream`, in `stretch` order
    (the stream's order). A batch comes out as soon as its last sample is read; a sample
    the stream could not give is None."""
    if not batches:
        return
    batch_of = {i: k for k, (_, idx) in enumerate(batches) for i in idx}
    missing = [len(idx) for _, idx in batches]
    order = [i for i in stretch if i in batch_of]
    got: dict[int, Any] = {}
    k = 0
    for pos, data in reader.stream([samples[i] for i in order]):
        i = order[pos]
        got[i] = data
        missing[batch_of[i]] -= 1
        while k < len(batches) and missing[k] == 0:
            j, idx = batches[k]
            yield j, idx, {i: got.pop(i) for i in idx}
            k += 1
    for j, idx in batches[k:]:  # what the stream never gave (it ended early)
        yield j, idx, {i: got.pop(i, None) for i in idx}


class StreamedBatches(torch.utils.data.IterableDataset):
    """The batches a `StreamPlan` gives this rank, built by `dataset` (an
    `ImageTextDataset` whose reader streams) from the bytes `read_batches` reads: in a
    DataLoader worker, the batches of its slot (worker w takes slot
    `(w + skip_batches) mod slots`, so that the DataLoader's round-robin collects batch
    `skip_batches` first). `len` is the dataset's sample count."""

    def __init__(self, dataset: Any, plan: StreamPlan) -> None:
        self.dataset, self.plan = dataset, plan

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        plan, ds = self.plan, self.dataset
        info = torch.utils.data.get_worker_info()
        skip, epoch = plan.skip_batches, plan.epoch
        slots = [(info.id + skip) % plan.slots] if info is not None else \
            list(range(plan.slots))
        readers = []
        for slot in slots:
            batches, stretch = plan.slot_batches(slot)
            batches = [(j, idx) for j, idx in batches if j >= skip]
            readers.append(read_batches(ds.reader, ds.samples, batches, stretch))
        for k in range(plan.n_batches() - skip):  # in order, one slot after the other
            got = next(readers[k % len(readers)], None)
            if got is None:
                return
            _, idx, images = got
            yield ds.batch_from_bytes([(i, epoch) for i in idx], images)
