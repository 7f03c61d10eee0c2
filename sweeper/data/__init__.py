"""Image-text data: ImageNet-style folders and Parquet exports, class names, captions, text
sources, class subsets, the model's own preprocessing, and the global-batch sampler.

One job per module: `base` (the shared types), `manifests` (class names, captions),
`layouts` (folder and Parquet scans), `checks` (whole-dataset checks before trials),
`selection` (training classes, the text of a sample), `transform` (preprocessing),
`loading` (dataset, collate, sampler, the loader that moves batches to the device) and
`trial` (one trial's data). The names below are re-exported so callers write `D.X`.

Never imports Ray: a trial's worker calls `build_trial_data(...)`, then builds its loader
with its rank and world size.

Two layouts (`data.format`), both under `data.root`:

- `folder`: `train/<wnid>/<file>` and `val/<wnid>/<file>` (JPEG, PNG, ... any case of
  extension). A symlink that leaves the root is not followed.
- `parquet` (what Hugging Face `datasets` exports): `train.parquet`, `train/**.parquet`,
  `train-*.parquet` or `data/train-*.parquet` (and the same for `val` or `validation`), with
  columns `image` (struct of `bytes`/`path`, or plain binary), `label` (int or wnid) and
  optionally `caption`/`captions`. Only the small columns are read up front; images are
  read a row group at a time, lazily, in each DataLoader worker, through a small LRU.
"""

from sweeper.data.base import MAX_CAPTION_CHARS, DataError, DataSplit, Sample
from sweeper.data.checks import check_dataset, load_dataset
from sweeper.data.layouts import (
    data_root,
    load_folder_dataset,
    load_parquet_dataset,
    parquet_split_files,
    scan_folder_split,
    scan_parquet_split,
)
from sweeper.data.loading import (
    Collate,
    DeviceBatches,
    GlobalBatchSampler,
    ImageTextDataset,
    batch_nbytes,
    flip_mask,
    loader_workers,
    make_loader,
    plan_loader,
    shm_free_bytes,
    steps_per_epoch,
    tokenize,
    trim_batch,
)
from sweeper.data.manifests import (
    Captions,
    ClassTable,
    read_captions,
    read_class_names,
    read_class_table,
)
from sweeper.data.selection import choose_train_classes, pick_text
from sweeper.data.transform import (
    ImageTransform,
    PatchTransform,
    Transform,
    image_transform,
    is_patch_processor,
)
from sweeper.data.trial import TrialData, build_trial_data

__all__ = [
    "MAX_CAPTION_CHARS",
    "Captions",
    "ClassTable",
    "Collate",
    "DataError",
    "DataSplit",
    "DeviceBatches",
    "GlobalBatchSampler",
    "ImageTextDataset",
    "ImageTransform",
    "PatchTransform",
    "Sample",
    "Transform",
    "TrialData",
    "batch_nbytes",
    "build_trial_data",
    "check_dataset",
    "choose_train_classes",
    "data_root",
    "flip_mask",
    "image_transform",
    "is_patch_processor",
    "load_dataset",
    "load_folder_dataset",
    "load_parquet_dataset",
    "loader_workers",
    "make_loader",
    "parquet_split_files",
    "pick_text",
    "plan_loader",
    "read_captions",
    "read_class_names",
    "read_class_table",
    "scan_folder_split",
    "scan_parquet_split",
    "shm_free_bytes",
    "steps_per_epoch",
    "tokenize",
    "trim_batch",
]
