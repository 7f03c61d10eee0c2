"""`data.format: parquet`: what Hugging Face `datasets` exports.

Files `<split>.parquet`, `<split>/**.parquet`, `<split>-*.parquet` or
`data/<split>-*.parquet` (`val` also finds `validation`), with columns `image` (struct of
`bytes`/`path`, or plain binary), `label` (int or wnid) and optionally
`caption`/`captions`. Only the small columns are read up front; images are read a row
group at a time, lazily, in each DataLoader worker, through a small LRU (in a bucket, the
row group's byte ranges only: Parquet's footer says where each column chunk is).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections import OrderedDict
from typing import Any

from sweeper.data.base import MAX_CAPTION_CHARS, ROW_GROUP_CACHE, DataError, DataSplit, Sample
from sweeper.data.formats.base import Entry, Files, Format, Reader
from sweeper.data.manifests import Captions, ClassTable, LabelNamer, captions_of

log = logging.getLogger(__name__)


def split_files(files: Files, split: str) -> list[Entry]:
    """The Parquet files of one split: `<split>.parquet`, `<split>/**.parquet`,
    `<split>-*.parquet` or `data/<split>-*.parquet` (`val` also finds `validation`)."""
    top, _ = files.entries(files.path())
    data = next((e for e in top if e.is_dir and e.name == "data"), None)
    below = files.entries(data.path)[0] if data is not None else []
    for name in [split, *(("validation", "valid") if split == "val" else ())]:
        single = next((e for e in top if not e.is_dir and e.name == f"{name}.parquet"), None)
        folder = next((e for e in top if e.is_dir and e.name == name), None)
        if single is not None:
            found = [single]
        elif folder is not None:
            found = [e for e in files.files_under(folder.path) if e.name.endswith(".parquet")]
        else:
            found = [e for e in (*top, *below) if not e.is_dir and e.name.startswith(f"{name}-")
                     and e.name.endswith(".parquet")]
        if found:
            inside = [e for e in found if files.inside(e.path)]
            if len(inside) < len(found):
                log.warning("%s: %d Parquet file(s) symlinked outside the data root not read",
                            files.uri(files.path()), len(found) - len(inside))
            if not inside:
                raise DataError(f"{files.uri(files.path(name))}: every Parquet file is a "
                                "symlink leaving the data root")
            return inside
    raise DataError(f"{files.uri(files.path(split))}: missing split (no {split}.parquet, "
                    f"{split}/*.parquet, {split}-*.parquet or data/{split}-*.parquet)")


def _parquet(files: Files, path: str) -> Any:
    import pyarrow.parquet as pq

    if not files.remote:
        return pq.ParquetFile(path)
    # pre_buffer: a row group's columns in one coalesced request, not one per column
    return pq.ParquetFile(files.open(path), pre_buffer=True)


def _hf_class_names(schema: Any) -> list[str] | None:
    """ClassLabel names of the `label` column from Hugging Face `datasets` metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feats = json.loads(raw).get("info", {}).get("features", {})
        names = feats.get("label", {}).get("names")
    except (ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _check_schema(schema: Any, where: str) -> Any:
    """The `image` column's type, after refusing a file without usable columns."""
    import pyarrow as pa

    if "image" not in schema.names:
        raise DataError(f"{where}: no 'image' column")
    itype = schema.field("image").type
    if pa.types.is_struct(itype):
        if itype.get_field_index("bytes") < 0 and itype.get_field_index("path") < 0:
            raise DataError(f"{where}: column 'image' has neither 'bytes' nor 'path'")
    elif not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype)):
        raise DataError(f"{where}: column 'image' is {itype}, not a struct or binary")
    if "label" not in schema.names:
        raise DataError(f"{where}: no 'label' column")
    ltype = schema.field("label").type
    if not (pa.types.is_integer(ltype) or pa.types.is_string(ltype)
            or pa.types.is_large_string(ltype) or pa.types.is_dictionary(ltype)):
        raise DataError(f"{where}: column 'label' is {ltype}, not an int or a wnid")
    return itype


def scan_split(files: Files, split: str, table: ClassTable | None,
               captions: Captions) -> DataSplit:
    """Samples of one Parquet split, one per row with a label (rows with a null or negative
    label, like a test split's, are left out). Reads only the `label`, caption and
    `image.path` columns, a row group at a time."""
    import pyarrow as pa

    namer = LabelNamer(table)
    rows: list[tuple[str, int, int, Any, tuple[str, ...]]] = []
    unlabelled = 0
    for e in split_files(files, split):
        where = files.uri(e.path)
        try:
            pf = _parquet(files, e.path)
            schema = pf.schema_arrow
            itype = _check_schema(schema, where)
            hf_names = _hf_class_names(schema)
            cols = ["label", *(c for c in ("caption", "captions") if c in schema.names)]
            with_path = bool(captions) and pa.types.is_struct(itype) and \
                itype.get_field_index("path") >= 0
            if with_path:
                cols.append("image.path")
            for rg in range(pf.num_row_groups):
                batch = pf.read_row_group(rg, columns=cols).to_pydict()
                caps_col = batch.get("caption") or batch.get("captions")
                paths = batch.get("image") if with_path else None
                for r, label in enumerate(batch["label"]):
                    if label is None or (not isinstance(label, str) and int(label) < 0):
                        unlabelled += 1
                        continue
                    key = namer.add(label, hf_names, where)
                    caps: tuple[str, ...] = ()
                    c = caps_col[r] if caps_col else None
                    if isinstance(c, str) and c:
                        caps = (c[:MAX_CAPTION_CHARS],)
                    elif isinstance(c, list):
                        caps = tuple(str(x)[:MAX_CAPTION_CHARS] for x in c if x)
                    if paths is not None:
                        ip = (paths[r] or {}).get("path")
                        if ip:
                            ip = ip.replace("\\", "/")
                            caps += captions_of(captions, ip,
                                                posixpath.splitext(posixpath.basename(ip))[0])
                    rows.append((e.path, rg, r, key, caps))
        except DataError:
            raise
        except (OSError, pa.ArrowException, ValueError) as err:
            raise DataError(f"{where}: cannot read Parquet ({str(err).splitlines()[0][:200]})"
                            ) from None
    if unlabelled:
        log.warning("%s: %d row(s) without a label left out", files.uri(files.path(split)),
                    unlabelled)
    index, wnids, names = namer.labels(files.uri(files.path(split)))
    samples = [Sample(f, index[k], caps, (rg, r)) for f, rg, r, k, caps in rows]
    return DataSplit(samples, wnids, names)


class _RowGroupCache:
    """The `image` column of the last few Parquet row groups read (per process)."""

    def __init__(self, files: Files, size: int = ROW_GROUP_CACHE) -> None:
        self.files, self.size = files, size
        self.groups: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.open: OrderedDict[str, Any] = OrderedDict()

    def _file(self, path: str) -> Any:
        pf = self.open.pop(path, None) or _parquet(self.files, path)
        self.open[path] = pf
        while len(self.open) > self.size:
            self.open.popitem(last=False)
        return pf

    def get(self, path: str, row_group: int, row: int) -> tuple[bytes | None, str | None]:
        import pyarrow as pa

        key = (path, row_group)
        col = self.groups.pop(key, None)
        if col is None:
            col = self._file(path).read_row_group(row_group, columns=["image"]).column(0)
            col = col.combine_chunks()
        self.groups[key] = col
        while len(self.groups) > self.size:
            self.groups.popitem(last=False)
        if pa.types.is_struct(col.type):
            names = [col.type.field(i).name for i in range(col.type.num_fields)]
            b = col.field("bytes")[row].as_py() if "bytes" in names else None
            p = col.field("path")[row].as_py() if "path" in names else None
            return b, p
        return col[row].as_py(), None


class ParquetReader(Reader):
    """Images out of their row group (the image bytes in the row, or a `path` relative to
    the data root that stays inside it)."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self._cache: _RowGroupCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}  # each worker process opens its own files

    def open(self, sample: Sample) -> Any:
        import pyarrow as pa

        if self._cache is None:
            self._cache = _RowGroupCache(self.files)
        try:
            data, path = self._cache.get(sample.path, *sample.at)
        except pa.ArrowException as e:
            raise OSError(str(e).splitlines()[0][:200]) from None
        if data is not None:
            return io.BytesIO(data)
        if not path:
            raise OSError("row has neither image bytes nor a path")
        p = path.replace("\\", "/")
        if self.files.remote:  # a key under the root: no absolute path, no `..`
            if p.startswith("/") or ".." in p.split("/"):
                raise OSError(f"image path {path!r} leaves the data root")
            with self.files.open(self.files.path(p)) as f:  # one request, not PIL's many
                return io.BytesIO(f.read())
        full = p if p.startswith("/") else self.files.path(p)
        if not self.files.inside(full):
            raise OSError(f"image path {path!r} leaves the data root")
        return full

    def where(self, sample: Sample) -> str:
        rg, r = sample.at
        return f"{self.files.uri(sample.path)}[row group {rg}, row {r}]"


class ParquetFormat(Format):
    name = "parquet"
    captions_inside = True

    def scan(self, files: Files, split: str, table: ClassTable | None, captions: Captions,
             spec: Any, only: set[str] | None = None) -> DataSplit:
        return scan_split(files, split, table, captions)

    def split_files(self, files: Files, split: str, spec: Any) -> list[Entry]:
        return split_files(files, split)

    def reader(self, files: Files, spec: Any) -> Reader:
        return ParquetReader(files)


FORMAT = ParquetFormat()
