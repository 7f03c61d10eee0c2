"""`data.format: folder`: ImageNet-style folders, `train/<wnid>/<file>` and
`val/<wnid>/<file>` (JPEG, PNG, ... any case of extension), one file per image.

Locally a symlink that leaves the root is not followed. In a bucket each image is one
object, read whole by one request when a DataLoader worker decodes it.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Sequence
from typing import Any

from sweeper.data.base import IMAGE_EXTS, DataError, DataSplit, Sample
from sweeper.data.formats.base import Entry, Files, Format, Reader
from sweeper.data.manifests import Captions, ClassTable, captions_of

log = logging.getLogger(__name__)


def class_dirs(files: Files, split: str) -> list[Entry]:
    """The class folders `<root>/<split>/*`, sorted, inside the root."""
    split_dir = files.path(split)
    where = files.uri(split_dir)
    e = files.stat(split_dir)
    if e is None or not e.is_dir:
        raise DataError(f"{where}: missing split folder")
    entries, left = files.entries(split_dir)
    out = [e for e in entries if e.is_dir and not e.name.startswith(".")]
    if left:
        log.warning("%s: %d class folder(s) symlinked outside the data root not followed",
                    where, left)
    if not out:
        extra = f" ({left} symlinked outside the data root, not followed)" if left else ""
        raise DataError(f"{where}: no class folders{extra}")
    return out


def _class_names_for(wnids: Sequence[str], table: ClassTable | None, where: str) -> list[str]:
    if table is None:
        return list(wnids)
    names = table.by_wnid
    for w in wnids:
        if w not in names:
            raise DataError(f"class {w!r} in {where} has no name in data.class_names")
    return [names[w] for w in wnids]


def scan_split(files: Files, split: str, table: ClassTable | None, captions: Captions,
               only: set[str] | None = None) -> DataSplit:
    """Samples of `<root>/<split>/<wnid>/<file>`, labelled in sorted wnid order.

    `only`: scan just these wnids' folders (the label indices still count every class).
    A file symlinked outside the root is skipped (and counted in one warning)."""
    dirs = class_dirs(files, split)
    wnids = [d.name for d in dirs]
    class_names = _class_names_for(wnids, table, files.uri(files.path(split)))
    samples: list[Sample] = []
    left = 0
    for label, d in enumerate(dirs):
        if only is not None and d.name not in only:
            continue
        entries, n_out = files.entries(d.path)
        left += n_out
        for e in entries:
            stem, ext = posixpath.splitext(e.name)
            if e.is_dir or e.name.startswith(".") or ext.lower() not in IMAGE_EXTS:
                continue
            rel = f"{split}/{d.name}/{e.name}"
            samples.append(Sample(e.path, label, captions_of(captions, rel, stem)))
    if left:
        log.warning("%s: %d image symlink(s) leaving the data root not followed",
                    files.uri(files.path(split)), left)
    return DataSplit(samples, wnids, class_names)


class FolderReader(Reader):
    """Opens each image file: by its local path (PIL reads it), or in a bucket as one
    object read whole by one request (PIL's small reads would each be a request)."""

    def __init__(self, files: Files | None = None) -> None:
        self.files = files

    def open(self, sample: Sample) -> Any:
        if self.files is None or not self.files.remote:
            return sample.path
        with self.files.open(sample.path) as f:
            return io.BytesIO(f.read())

    def where(self, sample: Sample) -> str:
        return self.files.uri(sample.path) if self.files is not None else sample.path


class FolderFormat(Format):
    name = "folder"

    def class_keys(self, files: Files, split: str, spec: Any) -> list[str]:
        return [d.name for d in class_dirs(files, split)]

    def scan(self, files: Files, split: str, table: ClassTable | None, captions: Captions,
             spec: Any, only: set[str] | None = None) -> DataSplit:
        return scan_split(files, split, table, captions, only)

    def split_files(self, files: Files, split: str, spec: Any) -> list[Entry]:
        out = []
        for d in class_dirs(files, split):
            out += [e for e in files.entries(d.path)[0] if not e.is_dir
                    and posixpath.splitext(e.name)[1].lower() in IMAGE_EXTS]
        return out

    def reader(self, files: Files, spec: Any) -> Reader:
        return FolderReader(files)


FORMAT = FolderFormat()
