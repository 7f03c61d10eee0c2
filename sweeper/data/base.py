"""What every data module shares: the error type, a sample, a split, the root check."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MAX_CAPTION_CHARS = 1000  # longer captions are truncated (and counted) when read
MAX_MANIFEST_LINE = 64 << 20  # a longer JSONL line is dropped (and counted), never parsed
ROW_GROUP_CACHE = 4  # Parquet row groups kept decoded-from-disk per DataLoader worker


class DataError(ValueError):
    """Bad data layout found before training (one line, naming the path or key)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True, slots=True)
class Sample:
    """One image, its class index and its captions (possibly none).

    `path` is the file that holds the image (a local path, or a path on the dataset's
    filesystem) and `at` where in that file it is, in the terms of the format that scanned
    it (empty: the whole file is the image; a Parquet (row group, row); a WebDataset
    shard's (byte offset, bytes) of the sample's members). Only the format's own module
    reads `at`."""

    path: str
    label: int
    captions: tuple[str, ...] = ()
    at: tuple[int, ...] = ()

    @property
    def id(self) -> tuple[str, tuple[int, ...]]:
        """What identifies the image within its dataset (rows of the caches are matched
        on it)."""
        return self.path, self.at


@dataclass
class DataSplit:
    """The samples of one split and the classes they are labelled with. `skipped`: samples
    the scan found but could not use (no label, an image member over the size bound),
    counted in the trials' `skipped_images`."""

    samples: list[Sample]
    wnids: list[str]  # label index -> wnid (class key)
    names: list[str]  # label index -> class name
    skipped: int = 0


def inside_root(path: Path, real_root: Path) -> bool:
    """Whether `path`, with every symlink resolved, stays under `real_root`."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(real_root)
    except OSError:
        return False
