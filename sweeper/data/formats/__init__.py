"""The dataset formats `data.format` names: one module each, one line each in `FORMATS`.

Every part of sweeper that depends on the format (the spec's validation, the checks before
a sweep, a trial's data, the loader, the caches) reads it from this table, never by
comparing `data.format` to a name. A new format is a module with a `Format` (see
`sweeper.data.formats.base`) and one entry below.
"""

from __future__ import annotations

from sweeper.data.formats import folder, parquet, webdataset
from sweeper.data.formats.base import Format

FORMATS: dict[str, Format] = {f.name: f for f in (
    folder.FORMAT,
    parquet.FORMAT,
    webdataset.FORMAT,
)}

__all__ = ["FORMATS", "Format"]
