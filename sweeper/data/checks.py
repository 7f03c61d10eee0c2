"""Whole-dataset checks run before any trial launches: a bad layout is refused in one
line naming the path or key."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sweeper.data.base import DataError, DataSplit
from sweeper.data.selection import choose_train_classes
from sweeper.data.source import dataset_of

log = logging.getLogger(__name__)


def load_dataset(data_spec: Any, root: str | Path | None = None,
                 ) -> tuple[DataSplit, DataSplit]:
    """(train, val) of the spec's data, whatever its format and wherever it is, fully
    scanned and checked (`source.Dataset.load`)."""
    return dataset_of(data_spec, root).load()


def check_dataset(data_spec: Any, n_train_classes: Sequence[int] = (),
                  text_sources: Sequence[str] = (), root: str | Path | None = None,
                  ) -> tuple[DataSplit, DataSplit]:
    """Everything about the data that can be refused before a trial launches: the layout,
    class names, captions, `data.train_classes`/`eval_classes`, and captions for a
    `captions` text source. Returns (train, val)."""
    train, val = load_dataset(data_spec, root)
    if data_spec.train_classes:  # (a k above the class count is the caller's to word)
        for k in n_train_classes:
            choose_train_classes(train.wnids, k, 0, data_spec.class_order,
                                 data_spec.train_classes)
    for i, w in enumerate(data_spec.eval_classes or []):
        if w not in val.wnids:
            raise DataError(f"data.eval_classes[{i}]: class {w!r} is not in the val split")
    if "captions" in text_sources and not any(s.captions for s in train.samples):
        raise DataError(f"{data_spec.captions or data_spec.root}: text_source 'captions' but "
                        "no training image has a caption")
    return train, val
