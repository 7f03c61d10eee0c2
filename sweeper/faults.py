"""Fault injection for the fault-tolerance tests, driven by one environment variable.

`SWEEPER_FAULTS="dataloader@<trial_id>:<step>,oom@<trial_id>:<step>"` makes the named
trial's DataLoader raise while producing the batch of that step, or raises
`torch.OutOfMemoryError` (what a real out-of-memory step raises) before that step. Unset,
it costs one environment lookup per trial. Never set it outside tests.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ENV = "SWEEPER_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by an injected DataLoader fault."""


def for_trial(trial_id: str) -> dict[str, int]:
    """{kind: step} of the faults injected into `trial_id` (usually empty)."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        kind, _, rest = item.partition("@")
        tid, _, step = rest.rpartition(":")
        if tid == trial_id and step.isdigit():
            out[kind] = int(step)
    return out


def maybe_oom(faults: dict[str, int], step: int) -> None:
    """Raise the error an out-of-memory step raises, at the injected step."""
    if faults.get("oom") == step:
        raise torch.OutOfMemoryError(f"injected out-of-memory at step {step}")


class FaultyCollate:
    """A collate function that raises in the DataLoader at the n-th batch it builds."""

    def __init__(self, collate: Any, at_batch: int) -> None:
        self.collate = collate
        self.at_batch = at_batch
        self.calls = 0

    def __call__(self, items: Any) -> Any:
        self.calls += 1
        if self.calls == self.at_batch:
            raise InjectedFault(f"injected DataLoader fault at batch {self.calls}")
        return self.collate(items)
