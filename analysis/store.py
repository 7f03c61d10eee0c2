"""Read-only access to an experiment directory: a local folder or a pyarrow filesystem URI.

Local folders go through `sweeper.sink`'s readers, so the analysis skips a torn last
line exactly as the sweeper does. URIs (`s3://`, `gs://`, `file://`, ...) resolve to the
filesystem the sweeper itself writes through (`sweeper.storage.resolve`: pyarrow's, with
the cloud's standard settings such as `AWS_ENDPOINT_URL`, or an fsspec protocol) and parse
the same way; a `sweeper.storage.Location` (a spec's own `storage_filesystem`) is read as
it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sweeper.sink import parse_jsonl, read_json, read_jsonl
from sweeper.storage import Location, resolve


def is_uri(location: str | Path | Location) -> bool:
    """True for `scheme://...` locations and remote Locations (read through pyarrow.fs),
    false for local paths."""
    if isinstance(location, Location):
        return location.remote
    return isinstance(location, str) and "://" in location


def location_of(location: str | Path | Location) -> Location:
    """`location` as a sweeper Location (a local one for `file://` and plain paths)."""
    return location if isinstance(location, Location) else resolve(str(location))


class Store:
    """A read-only view of one directory tree. Paths are given as parts below its root."""

    def __init__(self, location: str | Path | Location) -> None:
        self.uri = is_uri(location)
        if isinstance(location, Location) and self.uri:
            self.fs = location.fs
            self.root = location.fs_path.rstrip("/")
            self.location = str(location).rstrip("/")
            self.local_path: Path | None = None
        elif self.uri:
            if str(location).startswith("file://"):
                self.fs, root = pafs.FileSystem.from_uri(str(location))
            else:
                loc = resolve(str(location))
                self.fs, root = loc.fs, loc.fs_path
            self.root = root.rstrip("/")
            self.location = str(location).rstrip("/")
            self.local_path = None
        else:
            self.fs = None
            self.local_path = Path(str(location)).expanduser().resolve()
            self.root = str(self.local_path)
            self.location = str(self.local_path)

    def _path(self, parts: tuple[str, ...]) -> str:
        return "/".join((self.root, *parts)) if parts else self.root

    def display(self, *parts: str) -> str:
        """Where `parts` lives, as a user would type it (absolute path or full URI)."""
        return "/".join((self.location, *parts)) if parts else self.location

    def _info(self, parts: tuple[str, ...]) -> pafs.FileInfo:
        assert self.fs is not None
        return self.fs.get_file_info(self._path(parts))

    def is_dir(self, *parts: str) -> bool:
        """True when `parts` is an existing directory."""
        if self.local_path is not None:
            return self.local_path.joinpath(*parts).is_dir()
        return self._info(parts).type == pafs.FileType.Directory

    def is_file(self, *parts: str) -> bool:
        """True when `parts` is an existing file."""
        if self.local_path is not None:
            return self.local_path.joinpath(*parts).is_file()
        return self._info(parts).type == pafs.FileType.File

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the subdirectories of `parts`, sorted; [] when it is not a directory."""
        if self.local_path is not None:
            base = self.local_path.joinpath(*parts)
            if not base.is_dir():
                return []
            return sorted(p.name for p in base.iterdir() if p.is_dir())
        assert self.fs is not None
        selector = pafs.FileSelector(self._path(parts), allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except (OSError, ValueError):
            return []
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_text(self, *parts: str) -> str | None:
        """The file's text (undecodable bytes replaced), or None when it cannot be read."""
        if self.local_path is not None:
            try:
                return self.local_path.joinpath(*parts).read_text(
                    encoding="utf-8", errors="replace"
                )
            except OSError:
                return None
        assert self.fs is not None
        try:
            with self.fs.open_input_stream(self._path(parts)) as f:
                return f.read().decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return None

    def read_json(self, *parts: str) -> Any | None:
        """The parsed JSON file, or None when it is missing or unreadable."""
        if self.local_path is not None:
            return read_json(self.local_path.joinpath(*parts))
        text = self.read_text(*parts)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def read_jsonl(self, *parts: str) -> list[dict[str, Any]]:
        """Complete JSON lines of the file; [] when it is missing."""
        if self.local_path is not None:
            return read_jsonl(self.local_path.joinpath(*parts))
        text = self.read_text(*parts)
        return parse_jsonl(text) if text is not None else []

    def read_parquet(self, *parts: str) -> pa.Table | None:
        """The Parquet file as an Arrow table, or None when it does not exist."""
        if not self.is_file(*parts):
            return None
        if self.local_path is not None:
            return pq.read_table(self.local_path.joinpath(*parts))
        return pq.read_table(self._path(parts), filesystem=self.fs)
