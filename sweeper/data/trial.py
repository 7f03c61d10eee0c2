"""The data of one trial: its training classes and texts, its val split, seen/unseen."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.data.base import DataError, DataSplit, Sample
from sweeper.data.formats.base import Reader
from sweeper.data.loading import ImageTextDataset
from sweeper.data.selection import choose_train_classes
from sweeper.data.source import Dataset, dataset_of
from sweeper.data.transform import Transform

log = logging.getLogger(__name__)


@dataclass
class TrialData:
    """Everything a trial's worker needs from the data side."""

    train: ImageTextDataset
    val_samples: list[Sample]
    val_wnids: list[str]
    val_names: list[str]
    train_classes: list[str]  # wnids
    train_class_names: list[str]
    eval_templates: list[str]
    transform: Transform
    seen: list[bool] = field(default_factory=list)  # per val class: trained on?
    left_out_no_caption: int = 0
    reader: Reader | None = None  # reads the images in the dataset's format
    skipped: int = 0  # samples the scans found but could not use (no label, ...)


def _trial_splits(data_spec: Any, ds: Dataset, n_train_classes: int, seed: int,
                  ) -> tuple[DataSplit, DataSplit, list[str]]:
    """(train restricted to the chosen classes, val, chosen wnids). A layout that names its
    classes without a scan (folders) scans only the chosen classes' training images (a
    k-class trial never lists all of ImageNet)."""
    wnids = ds.class_keys("train")
    train = ds.split("train") if wnids is None else None
    chosen = choose_train_classes(wnids if wnids is not None else train.wnids,
                                  n_train_classes, seed, data_spec.class_order,
                                  data_spec.train_classes)
    if train is None:
        train = ds.split("train", only=set(chosen))
    val = ds.split("val")
    if not val.samples:
        raise DataError(f"{ds.files.uri(ds.files.path('val'))}: no images")
    keep = {train.wnids.index(w) for w in chosen}
    train.samples = [s for s in train.samples if s.label in keep]
    return train, val, chosen


def build_trial_data(data_spec: Any, text_source: str, n_train_classes: int, seed: int,
                     transform: Transform, root: str | Path | None = None) -> TrialData:
    """Load and subset the data of one trial (the same on every rank); `root`: where the
    data is when not `data.root` (the generated synthetic dataset)."""
    ds = dataset_of(data_spec, root)
    train, val, chosen = _trial_splits(data_spec, ds, n_train_classes, seed)
    samples = train.samples
    left_out = 0
    if text_source == "captions":
        with_caps = [s for s in samples if s.captions]
        left_out = len(samples) - len(with_caps)
        samples = with_caps
    if not samples:
        raise DataError(f"{ds.files.uri(ds.files.path('train'))}: no training samples for "
                        "the chosen classes"
                        + (" with a caption" if text_source == "captions" else ""))
    val_wnids, val_names = val.wnids, val.names
    val_samples = val.samples
    if data_spec.eval_classes:
        unknown = [w for w in data_spec.eval_classes if w not in val.wnids]
        if unknown:
            raise DataError(f"data.eval_classes: unknown class {unknown[0]!r}")
        sel = [val.wnids.index(w) for w in data_spec.eval_classes]
        remap = {old: new for new, old in enumerate(sel)}
        val_samples = [Sample(s.path, remap[s.label], s.captions, s.at)
                       for s in val.samples if s.label in remap]
        val_wnids = [val.wnids[i] for i in sel]
        val_names = [val.names[i] for i in sel]
    # Train labels use the train split's indices; names come from the train split too.
    reader = ds.reader()
    train_ds = ImageTextDataset(samples, train.names, transform, data_spec.templates,
                                text_source, seed, substitute_bad=True, reader=reader)
    chosen_set = set(chosen)
    return TrialData(
        train=train_ds,
        val_samples=val_samples,
        val_wnids=val_wnids,
        val_names=val_names,
        train_classes=chosen,
        train_class_names=[train.names[train.wnids.index(w)] for w in chosen],
        eval_templates=list(data_spec.eval_templates or data_spec.templates),
        transform=transform,
        seen=[w in chosen_set for w in val_wnids],
        left_out_no_caption=left_out,
        reader=reader,
        skipped=train.skipped + val.skipped,
    )
