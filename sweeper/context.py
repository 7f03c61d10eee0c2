"""What the orchestration hands one worker process: the small, Ray-free `WorkerContext`.

Any engine that runs the worker loop (Ray Train's workers, a test in-process) builds one;
the loop reads nothing else of its surroundings. Imports nothing of sweeper but `storage`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sweeper.storage import Location

ReportFn = Callable[[dict[str, Any], Path | None], None]


@dataclass
class WorkerContext:
    """What the orchestration gives one worker process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trial_dir: Path = Path(".")
    # The trial's folder in the bucket when `storage` is remote; `trial_dir` is then its
    # node-local copy, and the sink uploads every file whole after each change.
    remote: Location | None = None
    report: ReportFn = lambda metrics, ckpt: None
    resume_from: Path | None = None  # a checkpoint directory to continue from
    cache_dir: Path | None = None
    group: Any = None  # torch.distributed group (None: the world when initialised)
    local_world_size: int = 1  # trial workers on this node (they share its /dev/shm)
    # Whether `report` takes the checkpoint folder it is handed (an asynchronous upload
    # deletes it when done) rather than the loop deleting it once `report` returns.
    report_takes_checkpoint: bool = False
