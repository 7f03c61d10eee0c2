"""The interface every dataset format implements, and what it reads its files through.

A format (`data.format`) is one module of `sweeper.data.formats` holding one `Format`:
how a split is scanned into samples, how a split's files are fingerprinted for the caches,
and how images are read back (opened one by one, or streamed shard by shard). Everything
else (class names, captions, subsets, checks, loaders, caches) is the same for every
format and reads the format through `sweeper.data.formats.FORMATS`.

A format never opens a path itself: it goes through `Files` (`sweeper.data.source`
implements it), which reaches a local folder or any pyarrow/fsspec filesystem (a bucket).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from sweeper.data.base import DataSplit, Sample
from sweeper.data.manifests import Captions, ClassTable


@dataclass(frozen=True)
class Entry:
    """A file or folder of a listing: its name, full path on the dataset's filesystem,
    whether it is a folder, its size in bytes and modification time (ns; 0 if unknown)."""

    name: str
    path: str
    is_dir: bool
    size: int = 0
    mtime_ns: int = 0


class Files(Protocol):
    """The dataset's files as a format sees them (`sweeper.data.source.DataSource`)."""

    remote: bool

    def path(self, *parts: str) -> str:
        """The path of `parts` (POSIX, relative to the dataset's root)."""

    def uri(self, path: str) -> str:
        """`path` as the user would write it (a local path, or `s3://bucket/key`)."""

    def open(self, path: str) -> BinaryIO:
        """A binary, seekable file (on a bucket: every read is one ranged request)."""

    def stat(self, path: str) -> Entry | None:
        """The file or folder at `path`, None when there is none."""

    def entries(self, path: str) -> tuple[list[Entry], int]:
        """(the entries of folder `path` sorted by name, how many were left out because a
        symlink leads out of the dataset's root); DataError when it is not a folder."""

    def files_under(self, path: str) -> list[Entry]:
        """Every file below folder `path` (recursively), sorted by path."""


class Reader:
    """Reads the images of a format's samples in one process (each DataLoader worker makes
    its own). Random-access formats implement `open`; streamed formats (`streamed`: shards
    read front to back) implement `stream`, which the loader calls with runs of samples in
    stream order."""

    streamed = False

    def open(self, sample: Sample) -> Any:
        """What `PIL.Image.open` takes for the sample's image: a local path or a binary
        file. OSError when it cannot be read."""
        raise OSError(f"{self.where(sample)}: this format is read in streams, not by image")

    def stream(self, samples: Sequence[Sample]) -> Iterator[tuple[int, bytes | None]]:
        """(position in `samples`, the image's bytes or None when unreadable) for each
        sample, in the order read. The default opens each in turn."""
        for i, s in enumerate(samples):
            try:
                f = self.open(s)
                if isinstance(f, str):
                    with open(f, "rb") as fh:
                        yield i, fh.read()
                else:
                    with f:
                        yield i, f.read()
            except OSError:
                yield i, None

    def where(self, sample: Sample) -> str:
        """The sample's image as a user would find it (for messages)."""
        return sample.path


class Format:
    """One dataset format. `keys`: the `data.*` spec keys only this format reads (the spec
    refuses them under another format); `captions_inside`: its samples can carry their
    own captions (a text source `captions` then needs no `data.captions` manifest)."""

    name = ""
    keys: frozenset[str] = frozenset()
    captions_inside = False

    def class_keys(self, files: Files, split: str, spec: Any) -> list[str] | None:
        """The split's class keys when the layout names them without a scan (folders),
        else None; lets a trial scan only the classes it trains on."""
        return None

    def scan(self, files: Files, split: str, table: ClassTable | None, captions: Captions,
             spec: Any, only: set[str] | None = None) -> DataSplit:
        """The samples of `split` (`train` or `val`) with their labels and captions.
        `only`: a hint that only these class keys' samples are needed (labels still count
        every class). Raises DataError (one line naming the file) on a bad layout."""
        raise NotImplementedError

    def split_files(self, files: Files, split: str, spec: Any) -> list[Entry]:
        """The files that hold `split` (what `fingerprint` hashes)."""
        raise NotImplementedError

    def fingerprint(self, files: Files, split: str, spec: Any) -> str:
        """A hash of (path, size, mtime) of every file of the split: the caches' key."""
        h = hashlib.sha256(f"{self.name}\n".encode())
        for e in self.split_files(files, split, spec):
            h.update(f"{e.path}\t{e.size}\t{e.mtime_ns}\n".encode())
        return h.hexdigest()

    def reader(self, files: Files, spec: Any) -> Reader:
        """A reader of this dataset's images."""
        raise NotImplementedError
