"""Where a dataset lives, and the one call that opens it.

`data.root` (and `data.class_names`, `data.captions` beside it) is a local folder or a URI
of any filesystem pyarrow or fsspec reaches (`s3://`, `gs://`, `hdfs://`, ...), resolved
exactly as `storage` is (`sweeper.storage.resolve`: the cloud's own credentials and
settings from the environment, `AWS_ENDPOINT_URL` included; `data.filesystem` builds the
filesystem from options as `storage_filesystem` does, and the spec refuses credentials in
it). Nothing is copied to the node: a format reads each image, row group or shard where
it is, by ranged or streamed reads.

`open_dataset(root, format, class_names, captions, filesystem)` is the one call that
opens a dataset in any format, local or in a bucket; `dataset_of(data_spec)` opens the one
a spec's `data:` section names.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from sweeper import synthetic
from sweeper.data.base import DataError, DataSplit, inside_root
from sweeper.data.formats import FORMATS
from sweeper.data.formats.base import Entry, Format, Reader
from sweeper.data.manifests import Captions, ClassTable, read_captions, read_class_table
from sweeper.spec import DataSpec, SpecError
from sweeper.storage import Location, explain_error, is_uri, resolve

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- files


class DataSource:
    """The files under a dataset's root (`sweeper.data.formats.base.Files`): a local
    folder, or a folder on a pyarrow filesystem. Pickles with its filesystem (never with
    credentials from the environment), so DataLoader workers and other nodes read the same
    files with their own credentials."""

    def __init__(self, location: Location) -> None:
        self.loc = location
        self.remote = location.remote
        self._real_root = None if self.remote else Path(os.path.realpath(location.fs_path))

    def __repr__(self) -> str:
        return f"DataSource({self.loc})"

    def path(self, *parts: str) -> str:
        base = self.loc.fs_path.rstrip("/") or "/"
        return posixpath.join(base, *parts) if parts else base

    def uri(self, path: str) -> str:
        return f"{self.loc.scheme}://{path}" if self.remote else path

    def _fail(self, path: str, e: OSError) -> DataError:
        return DataError(f"{self.uri(path)}: {explain_error(e)}")

    def open(self, path: str) -> BinaryIO:
        if not self.remote:
            return open(path, "rb")
        return self.loc.fs.open_input_file(path)  # type: ignore[union-attr]

    def stat(self, path: str) -> Entry | None:
        name = posixpath.basename(path.rstrip("/"))
        if not self.remote:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise self._fail(path, e) from None
            isdir = os.path.isdir(path)
            return Entry(name, path, isdir, 0 if isdir else st.st_size, st.st_mtime_ns)
        try:
            info = self.loc.fs.get_file_info(path)  # type: ignore[union-attr]
        except OSError as e:
            raise self._fail(path, e) from None
        if info.type == pafs.FileType.NotFound:
            return None
        return _entry(info)

    def inside(self, path: str) -> bool:
        """Whether `path`, symlinks resolved, stays under the root (always on a bucket)."""
        return self.remote or inside_root(Path(path), self._real_root)  # type: ignore[arg-type]

    def entries(self, path: str) -> tuple[list[Entry], int]:
        if not self.remote:
            out, left = [], 0
            try:
                it = os.scandir(path)
            except NotADirectoryError:
                raise DataError(f"{path}: not a folder") from None
            except OSError as e:
                raise self._fail(path, e) from None
            with it:
                for e in sorted(it, key=lambda e: e.name):
                    if e.is_symlink() and not self.inside(e.path):
                        left += 1
                        continue
                    try:
                        isdir = e.is_dir()
                        st = e.stat() if not isdir else None
                    except OSError:
                        continue
                    out.append(Entry(e.name, e.path, isdir, st.st_size if st else 0,
                                     st.st_mtime_ns if st else 0))
            return out, left
        try:
            infos = self.loc.fs.get_file_info(  # type: ignore[union-attr]
                pafs.FileSelector(path, allow_not_found=True))
        except OSError as e:
            raise self._fail(path, e) from None
        return sorted((_entry(i) for i in infos), key=lambda e: e.name), 0

    def files_under(self, path: str) -> list[Entry]:
        if not self.remote:
            files = [p for p in sorted(Path(path).rglob("*")) if p.is_file()]
            out = []
            for p in files:
                st = p.stat()
                out.append(Entry(p.name, str(p), False, st.st_size, st.st_mtime_ns))
            return out
        try:
            infos = self.loc.fs.get_file_info(  # type: ignore[union-attr]
                pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError as e:
            raise self._fail(path, e) from None
        return sorted((_entry(i) for i in infos if i.type == pafs.FileType.File),
                      key=lambda e: e.path)

    def file(self, path: str) -> DataFile:
        return DataFile(self, path)


def _entry(info: pafs.FileInfo) -> Entry:
    isdir = info.type == pafs.FileType.Directory
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return Entry(info.base_name, info.path, isdir, 0 if isdir else int(info.size or 0),
                 int(mtime))


@dataclass(frozen=True)
class DataFile:
    """One file of a `DataSource` with the few `pathlib.Path` methods the manifest
    readers use (`suffix`, `is_file`, `read_bytes`, `open`)."""

    source: DataSource
    path: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.path)[1]

    def is_file(self) -> bool:
        e = self.source.stat(self.path)
        return e is not None and not e.is_dir

    def exists(self) -> bool:
        return self.source.stat(self.path) is not None

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError("data files are read-only, in binary")
        return self.source.open(self.path)

    def read_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    def __str__(self) -> str:
        return self.source.uri(self.path)


def data_source(root: str | Path, filesystem: dict[str, Any] | None = None) -> DataSource:
    """The files under `root` (a local path or a URI; `filesystem`: `data.filesystem`).
    Raises DataError (one line naming `data.root` or `data.filesystem`)."""
    try:
        return DataSource(resolve(str(root), filesystem,
                                  keys=("data.root", "data.filesystem")))
    except SpecError as e:
        raise DataError(str(e)) from None


# --------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """One dataset: its files, its format and the format's options (a `DataSpec`), and
    its class-names and captions files (read once, on first use)."""

    files: DataSource
    format: Format
    spec: Any
    class_names: DataFile | Path | None = None
    captions: DataFile | Path | None = None
    _manifests: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> str:
        return self.files.uri(self.files.path())

    def table(self) -> ClassTable | None:
        if "table" not in self._manifests:
            self._manifests["table"] = (read_class_table(self.class_names)
                                        if self.class_names is not None else None)
        return self._manifests["table"]

    def caption_map(self) -> Captions:
        if "captions" not in self._manifests:
            self._manifests["captions"] = (read_captions(self.captions)
                                           if self.captions is not None else Captions())
        return self._manifests["captions"]

    def class_keys(self, split: str) -> list[str] | None:
        """The split's class keys when the layout names them without a scan, else None."""
        return self.format.class_keys(self.files, split, self.spec)

    def split(self, name: str, only: set[str] | None = None) -> DataSplit:
        """The samples of split `name` (`train`, `val`); `only`: the class keys needed."""
        return self.format.scan(self.files, name, self.table(), self.caption_map(),
                                self.spec, only)

    def load(self) -> tuple[DataSplit, DataSplit]:
        """(train, val), fully scanned and checked: no split without images, and a
        captions file that matches at least one image."""
        self.check_root()
        train, val = self.split("train"), self.split("val")
        for name, s in (("train", train), ("val", val)):
            if not s.samples:
                raise DataError(f"{self.files.uri(self.files.path(name))}: no labelled images")
        if self.captions is not None and not any(
                s.captions for sp in (train, val) for s in sp.samples):
            raise DataError(f"{self.captions}: no caption matches any image under {self.root}")
        return train, val

    def check_root(self) -> None:
        """Refuse a root that is missing, unreachable or refused (one line naming it). A
        bucket's root is listed: a listing's error says why (a HEAD's cannot)."""
        if self.files.remote:
            found = bool(self.files.entries(self.files.path())[0])
        else:
            e = self.files.stat(self.files.path())
            found = e is not None and e.is_dir
        if not found:
            raise DataError(f"{self.root}: data root not found")

    def fingerprint(self, split: str) -> str:
        return self.format.fingerprint(self.files, split, self.spec)

    def reader(self) -> Reader:
        return self.format.reader(self.files, self.spec)


def _manifest(files: DataSource, p: str | Path | None,
              filesystem: dict[str, Any] | None) -> DataFile | Path | None:
    """A class-names or captions path: a URI; absolute; else relative to the data root
    (a bucket's; a local root's when it exists there, else as given: relative to the
    working directory)."""
    if not p:
        return None
    if is_uri(p):
        src = data_source(posixpath.dirname(str(p)), filesystem)
        return src.file(src.path(posixpath.basename(str(p))))
    q = Path(p).expanduser()
    if not q.is_absolute() and files.remote:
        return files.file(files.path(q.as_posix()))
    if not q.is_absolute() and (files.loc.local / q).exists():  # type: ignore[operator]
        return files.loc.local / q  # type: ignore[operator]
    return q


def open_dataset(root: str | Path, format: str = "folder",
                 class_names: str | Path | None = None, captions: str | Path | None = None,
                 filesystem: dict[str, Any] | None = None, spec: Any = None) -> Dataset:
    """The dataset at `root` (a local folder or a URI) in `format`, with its class names
    and captions files (absolute, URIs, or relative to the root), on the filesystem
    `filesystem` describes (`data.filesystem`; default: the one the URI names). `spec`:
    the format's options (a `DataSpec`; default: its defaults). Raises DataError (one
    line naming the key or file)."""
    if format not in FORMATS:
        raise DataError(f"data.format: {format!r} is not one of {', '.join(FORMATS)}")
    if spec is None:
        spec = DataSpec(root=str(root), format=format)
    files = data_source(root, filesystem)
    return Dataset(files, FORMATS[format], spec, _manifest(files, class_names, filesystem),
                   _manifest(files, captions, filesystem))


def dataset_of(data_spec: Any, root: str | Path | None = None) -> Dataset:
    """The dataset a spec's `data:` section names; `root`: where it is when that is not
    `data.root` (the generated synthetic dataset, whose class names and captions are
    `classes.json` and `captions.jsonl` beside it)."""
    r = root or data_spec.root
    if r is None:
        raise DataError("data.root: no data root given")
    class_names, captions = data_spec.class_names, data_spec.captions
    if data_spec.synthetic is not None:
        class_names = class_names or "classes.json"
        captions = captions or "captions.jsonl"
    return open_dataset(r, data_spec.format, class_names, captions,
                        getattr(data_spec, "filesystem", None), spec=data_spec)


def data_root(data_spec: Any, cache_dir: str | Path | None = None) -> str | Path:
    """The dataset a trial reads: the synthetic one (generated and cached on first use, a
    local folder) or `data.root` as written (a path or a URI)."""
    if data_spec.synthetic is not None:
        s = data_spec.synthetic
        return synthetic.dataset_dir(s.n_classes, s.train_per_class, s.val_per_class,
                                     s.image_size, s.seed, Path(cache_dir) if cache_dir else None)
    return data_spec.root
