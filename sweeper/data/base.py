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

    Folder data: `path` is the image file. Parquet data: `path` is the Parquet file and the
    image is row `row` of row group `row_group` (both -1 for files)."""

    path: str
    label: int
    captions: tuple[str, ...] = ()
    row_group: int = -1
    row: int = -1


@dataclass
class DataSplit:
    """The samples of one split and the classes they are labelled with."""

    samples: list[Sample]
    wnids: list[str]  # label index -> wnid (class key)
    names: list[str]  # label index -> class name


def inside_root(path: Path, real_root: Path) -> bool:
    """Whether `path`, with every symlink resolved, stays under `real_root`."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(real_root)
    except OSError:
        return False
