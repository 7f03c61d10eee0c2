"""What the ranks of a trial agree on, on the host, before a collective could disagree.

NCCL does not check shapes: a rank that feeds a collective a tensor of another shape, or
skips one the others enter, hangs the trial or corrupts it. The ranks therefore agree, on
the host, on what could differ between them: how many readable images each step's slices
hold (a slice that lost unreadable images) and whether a rank had to fall back (a feature
cache it cannot read). They agree over a gloo group of CPU tensors beside the NCCL one, so
the agreement never waits on the GPU (no host sync) and costs one small exchange.

Never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Agreement:
    """Host-side agreement between the `world_size` ranks of `group` (a gloo group)."""

    world_size: int = 1
    group: Any = None

    @classmethod
    def create(cls, world_size: int, group: Any = None) -> Agreement:
        """The agreement of a trial's ranks: over `group` itself when it is a gloo group
        (CPU training), else over a new gloo group of the same ranks. Every rank must call
        this, in the same order as its other group creations (a collective)."""
        if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return cls(1, None)
        if dist.get_backend(group) == "gloo":
            return cls(world_size, group)
        ranks = None if group is None else dist.get_process_group_ranks(group)
        return cls(world_size, dist.new_group(ranks=ranks, backend="gloo"))

    def gather(self, *values: int) -> list[list[int]]:
        """Every rank's `values` (integers), in rank order: one all-gather of CPU tensors."""
        mine = torch.tensor(values, dtype=torch.int64)
        if self.world_size <= 1:
            return [mine.tolist()]
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        return [t.tolist() for t in out]

    def batch(self, size: int, skipped: int) -> tuple[int, int]:
        """(samples every rank steps on: the smallest readable slice, 0 when one rank has
        none; unreadable images met by all ranks together) for one step."""
        if self.world_size <= 1:
            return size, skipped
        rows = self.gather(size, skipped)
        return min(r[0] for r in rows), sum(r[1] for r in rows)

    def all(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (a fallback one rank takes, all take)."""
        if self.world_size <= 1:
            return ok
        return all(r[0] for r in self.gather(int(ok)))
