"""Image-text data: datasets in folders, Parquet exports or WebDataset shards, local or in
a bucket; class names, captions, text sources, class subsets, the model's own
preprocessing, and exact global batches.

One job per module: `base` (the shared types), `formats` (one module per `data.format`,
registered in one table: `folder`, `parquet`, `webdataset`), `source` (where a dataset's
files are, and `open_dataset`, the one call that opens any of them), `manifests` (class
names, captions), `checks` (whole-dataset checks before trials), `selection` (training
classes, the text of a sample), `transform` (preprocessing), `loading` (dataset, collate,
sampler, the loader that moves batches to the device), `streaming` (exact batches from
shards read front to back), `shard` (a folder dataset written as WebDataset shards) and
`trial` (one trial's data). The names below are re-exported so callers write `D.X`.

Never imports Ray: a trial's worker calls `build_trial_data(...)`, then builds its loader
with its rank and world size.
"""

from sweeper.data.base import MAX_CAPTION_CHARS, DataError, DataSplit, Sample
from sweeper.data.checks import check_dataset, load_dataset
from sweeper.data.formats import FORMATS
from sweeper.data.loading import (
    Collate,
    DeviceBatches,
    GlobalBatchSampler,
    ImageTextDataset,
    batch_nbytes,
    batch_plan,
    eval_batches,
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
from sweeper.data.source import Dataset, DataSource, data_root, dataset_of, open_dataset
from sweeper.data.streaming import StreamPlan
from sweeper.data.transform import (
    ImageTransform,
    PatchTransform,
    Transform,
    image_transform,
    is_patch_processor,
)
from sweeper.data.trial import TrialData, build_trial_data

__all__ = [
    "FORMATS",
    "MAX_CAPTION_CHARS",
    "Captions",
    "ClassTable",
    "Collate",
    "DataError",
    "DataSource",
    "DataSplit",
    "Dataset",
    "DeviceBatches",
    "GlobalBatchSampler",
    "ImageTextDataset",
    "ImageTransform",
    "PatchTransform",
    "Sample",
    "StreamPlan",
    "Transform",
    "TrialData",
    "batch_nbytes",
    "batch_plan",
    "build_trial_data",
    "check_dataset",
    "choose_train_classes",
    "data_root",
    "dataset_of",
    "eval_batches",
    "flip_mask",
    "image_transform",
    "is_patch_processor",
    "load_dataset",
    "loader_workers",
    "make_loader",
    "open_dataset",
    "pick_text",
    "plan_loader",
    "read_captions",
    "read_class_names",
    "read_class_table",
    "shm_free_bytes",
    "steps_per_epoch",
    "tokenize",
    "trim_batch",
]
