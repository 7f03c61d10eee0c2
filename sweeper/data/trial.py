"""The data of one trial: its training classes and texts, its val split, seen/unseen."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.data.base import DataError, DataSplit, Sample
from sweeper.data.layouts import (
    class_dirs,
    data_file,
    load_parquet_dataset,
    resolved_inputs,
    scan_folder_split,
)
from sweeper.data.loading import ImageTextDataset
from sweeper.data.manifests import read_captions, read_class_names
from sweeper.data.selection import choose_train_classes
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


def _trial_splits(data_spec: Any, n_train_classes: int, seed: int, root: Path,
                  class_names: Any, captions: Any) -> tuple[DataSplit, DataSplit, list[str]]:
    """(train restricted to the chosen classes, val, chosen wnids). Folder data scans only
    the chosen classes' training folders (a k-class trial never lists all of ImageNet)."""
    if data_spec.format == "parquet":
        train, val = load_parquet_dataset(root, class_names, captions)
        chosen = choose_train_classes(train.wnids, n_train_classes, seed,
                                      data_spec.class_order, data_spec.train_classes)
    else:
        names_path, caps_path = data_file(root, class_names), data_file(root, captions)
        names = read_class_names(names_path) if names_path else None
        caps = read_captions(caps_path) if caps_path else {}
        wnids = [w for w, _ in class_dirs(root, "train")]
        chosen = choose_train_classes(wnids, n_train_classes, seed, data_spec.class_order,
                                      data_spec.train_classes)
        train = scan_folder_split(root, "train", names, caps, only=set(chosen))
        val = scan_folder_split(root, "val", names, caps)
        if not val.samples:
            raise DataError(f"{root / 'val'}: no images")
    keep = {train.wnids.index(w) for w in chosen}
    train.samples = [s for s in train.samples if s.label in keep]
    return train, val, chosen


def build_trial_data(data_spec: Any, text_source: str, n_train_classes: int, seed: int,
                     transform: Transform, root: str | Path | None = None) -> TrialData:
    """Load and subset the data of one trial (the same on every rank)."""
    r, class_names, captions = resolved_inputs(data_spec, root)
    train, val, chosen = _trial_splits(data_spec, n_train_classes, seed, r, class_names,
                                       captions)
    samples = train.samples
    left_out = 0
    if text_source == "captions":
        with_caps = [s for s in samples if s.captions]
        left_out = len(samples) - len(with_caps)
        samples = with_caps
    if not samples:
        raise DataError(f"{r / 'train'}: no training samples for the chosen classes"
                        + (" with a caption" if text_source == "captions" else ""))
    val_wnids, val_names = val.wnids, val.names
    val_samples = val.samples
    if data_spec.eval_classes:
        unknown = [w for w in data_spec.eval_classes if w not in val.wnids]
        if unknown:
            raise DataError(f"data.eval_classes: unknown class {unknown[0]!r}")
        sel = [val.wnids.index(w) for w in data_spec.eval_classes]
        remap = {old: new for new, old in enumerate(sel)}
        val_samples = [Sample(s.path, remap[s.label], s.captions, s.row_group, s.row)
                       for s in val.samples if s.label in remap]
        val_wnids = [val.wnids[i] for i in sel]
        val_names = [val.names[i] for i in sel]
    # Train labels use the train split's indices; names come from the train split too.
    ds = ImageTextDataset(samples, train.names, transform, data_spec.templates, text_source,
                          seed, substitute_bad=True, root=r)
    chosen_set = set(chosen)
    return TrialData(
        train=ds,
        val_samples=val_samples,
        val_wnids=val_wnids,
        val_names=val_names,
        train_classes=chosen,
        train_class_names=[train.names[train.wnids.index(w)] for w in chosen],
        eval_templates=list(data_spec.eval_templates or data_spec.templates),
        transform=transform,
        seen=[w in chosen_set for w in val_wnids],
        left_out_no_caption=left_out,
    )
