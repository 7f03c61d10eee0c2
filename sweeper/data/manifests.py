"""Manifests: class-name tables (JSON, CSV, LOC_synset_mapping.txt) and captions
(JSONL, CSV/TSV, Parquet), read with bounded memory and paths kept inside the root."""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.data.base import IMAGE_EXTS, MAX_CAPTION_CHARS, MAX_MANIFEST_LINE, DataError

log = logging.getLogger(__name__)

_KEY_FIELDS = ("image", "path", "file", "file_name", "image_path", "id", "image_id")
_CAPTION_FIELDS = ("captions", "caption", "text")


# --------------------------------------------------------------------------- class names


@dataclass(frozen=True)
class ClassTable:
    """Class names from `data.class_names`, in the file's order (for integer labels)."""

    entries: tuple[tuple[str, str], ...]  # (wnid, name), index order
    source: str

    @property
    def by_wnid(self) -> dict[str, str]:
        return dict(self.entries)


def _as_file(path: Any) -> Any:
    """A local path as a Path; a file of a dataset's filesystem (`source.DataFile`, which
    has the few Path methods used here) as it is."""
    return path if hasattr(path, "read_bytes") and hasattr(path, "open") else Path(path)


def read_class_table(path: Any) -> ClassTable:
    """(wnid, name) entries in index order, from:

    - JSON `{wnid: name}` or `{wnid: [name, synonym, ...]}` (file order);
    - Keras' `imagenet_class_index.json`, `{"0": ["n01440764", "tench"], ...}` (index order,
      underscores in names become spaces);
    - CSV/TSV with `wnid,name` columns (a header row is optional);
    - text lines `wnid name words...` (ImageNet's `LOC_synset_mapping.txt`).

    `path`: a local path, or a file of the dataset's filesystem (a bucket).
    """
    p = _as_file(path)
    if not p.is_file():
        raise DataError(f"{p}: class-names file not found")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read class names ({e.strerror or e})") from None
    suffix = p.suffix.lower()
    entries: list[tuple[str, str]] = []
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}: expected a JSON object")
        keras = []
        for k, v in obj.items():
            if (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                    and str(k).isdigit()):
                keras.append((int(k), v[0], v[1].replace("_", " ")))
            elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                entries.append((str(k), v[0]))  # {wnid: [synonyms...]}: the first one
            elif isinstance(v, str):
                entries.append((str(k), v))
            else:
                raise DataError(f"{p}: entry {k!r} is neither a name nor [wnid, name]")
        if keras and entries:
            raise DataError(f"{p}: mixes {{wnid: name}} and {{index: [wnid, name]}} entries")
        if keras:
            keras.sort()
            if [i for i, _, _ in keras] != list(range(len(keras))):
                raise DataError(f"{p}: class indices are not 0..{len(keras) - 1}")
            entries = [(w, n) for _, w, n in keras]
    elif suffix == ".txt":
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            parts = line.strip().split(None, 1)
            if len(parts) < 2:
                raise DataError(f"{p}: line {i + 1} needs a wnid and a name")
            entries.append((parts[0], parts[1].strip()))
    else:
        lines = text.splitlines()
        delim = "\t" if suffix == ".tsv" or (lines and "\t" in lines[0]) else ","
        try:
            rows = list(csv.reader(io.StringIO(text), delimiter=delim))
        except csv.Error as e:
            raise DataError(f"{p}: not valid CSV ({e})") from None
        wi, ni = 0, 1
        if rows and rows[0] and rows[0][0].strip().lower() in ("wnid", "id", "synset", "class"):
            header = [c.strip().lower() for c in rows[0]]
            wi = header.index("wnid") if "wnid" in header else 0
            ni = next((header.index(c) for c in ("name", "class_name", "label")
                       if c in header), 1)
            rows = rows[1:]
        for i, row in enumerate(rows):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= max(wi, ni):
                raise DataError(f"{p}: line {i + 1} needs wnid and name columns")
            entries.append((row[wi].strip(), row[ni].strip()))
    if not entries:
        raise DataError(f"{p}: no class names")
    seen: set[str] = set()
    for w, n in entries:
        if w in seen:
            raise DataError(f"{p}: class {w!r} is listed twice")
        if not n:
            raise DataError(f"{p}: class {w!r} has an empty name")
        seen.add(w)
    return ClassTable(tuple(entries), str(p))


def read_class_names(path: Any) -> dict[str, str]:
    """{wnid: name} from any format `read_class_table` reads."""
    return read_class_table(path).by_wnid


class LabelNamer:
    """Class key (wnid) and name of a label stored with an image (a Parquet `label`, a
    WebDataset `.cls` or `.json`): a wnid string, or an int index into the dataset's own
    class names (`own`, e.g. Hugging Face ClassLabel names) and/or `data.class_names`.
    `add` records the classes met; `labels` numbers them as folders are numbered."""

    def __init__(self, table: ClassTable | None) -> None:
        self.table = table
        self.by_wnid = table.by_wnid if table else None
        self.classes: dict[Any, tuple[str, str]] = {}  # label -> (wnid, name)

    def __call__(self, label: Any, own: list[str] | None, where: Any) -> tuple[str, str]:
        if isinstance(label, str):
            if self.by_wnid is None:
                return label, label
            if label not in self.by_wnid:
                raise DataError(f"class {label!r} in {where} has no name in data.class_names")
            return label, self.by_wnid[label]
        i = int(label)
        if own is not None and i < len(own):
            key = own[i]
            if self.by_wnid is None:
                return key, key
            if key in self.by_wnid:
                return key, self.by_wnid[key]
        if self.table is not None:
            if i >= len(self.table.entries):
                raise DataError(f"label {i} in {where} has no class name in "
                                f"{self.table.source} ({len(self.table.entries)} classes)")
            return self.table.entries[i]
        raise DataError(f"label {i} in {where} has no class name (give data.class_names, or "
                        "export the dataset with ClassLabel names)")

    def add(self, label: Any, own: list[str] | None, where: Any) -> str | int:
        """The label as a key (a wnid string or an int), its class named and recorded."""
        key = label if isinstance(label, str) else int(label)
        if key not in self.classes:
            self.classes[key] = self(label, own, where)
        return key

    def labels(self, where: Any) -> tuple[dict[Any, int], list[str], list[str]]:
        """({key: label index}, wnids, names) of the classes recorded: int labels in index
        order, wnid labels in sorted order (as folders are)."""
        order = sorted(self.classes, key=lambda k: (isinstance(k, str), k))
        wnids = [self.classes[k][0] for k in order]
        if len(set(wnids)) != len(wnids):
            dup = next(w for w in wnids if wnids.count(w) > 1)
            raise DataError(f"{where}: two labels map to class {dup!r}")
        return ({k: i for i, k in enumerate(order)}, wnids,
                [self.classes[k][1] for k in order])


# --------------------------------------------------------------------------- captions




class Captions(dict):
    """{image key: captions}; `truncated` captions were cut to the length limit and
    `dropped_lines` manifest lines were too long to parse."""

    truncated: int = 0
    dropped_lines: int = 0
    source: str = ""


def _safe_key(raw: str, source: str) -> str:
    """A manifest key as a root-relative POSIX path, an image id, or a refusal if the path
    would leave the data root (`..`, absolute paths, drive letters)."""
    key = raw.strip().replace("\\", "/")
    if (key.startswith("/") or re.match(r"^[A-Za-z]:", key)
            or ".." in key.split("/") or "\x00" in key):
        raise DataError(f"{source}: image path {raw[:200]!r} points outside the data root")
    key = posixpath.normpath(key) if "/" in key else key
    if "/" not in key and posixpath.splitext(key)[1].lower() in IMAGE_EXTS:
        key = posixpath.splitext(key)[0]  # a bare file name: match it by its stem
    return key


def _caption_record(rec: Any, source: str) -> tuple[str | None, list[str]]:
    if not isinstance(rec, dict):
        raise DataError(f"{source}: every record must be an object")
    key = next((rec[f] for f in _KEY_FIELDS if rec.get(f) not in (None, "")), None)
    if isinstance(key, dict):  # a Hugging Face Image struct {bytes, path}
        key = key.get("path")
    if key is None:
        raise DataError(f"{source}: a record has no {'/'.join(_KEY_FIELDS[:2])}/id field")
    caps = next((rec[f] for f in _CAPTION_FIELDS if rec.get(f) is not None), None)
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list | tuple):
        return _safe_key(str(key), source), []
    return _safe_key(str(key), source), [str(c) for c in caps if c is not None and str(c)]


class _Raw(io.RawIOBase):
    """A binary file of any filesystem (a pyarrow NativeFile included) as the raw stream
    `io.BufferedReader` takes."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.f.close()
        super().close()


def _binary(p: Any) -> io.BufferedIOBase:
    """`p` opened for buffered binary reading (a local file, or a bucket's object read in
    1 MiB ranged requests)."""
    if isinstance(p, Path):
        return open(p, "rb")
    return io.BufferedReader(_Raw(p.open("rb")), 1 << 20)


def _jsonl_records(p: Any, out: Captions) -> Iterator[tuple[Any, str]]:
    with _binary(p) as f:
        n = 0
        while True:
            line = f.readline(MAX_MANIFEST_LINE + 1)
            if not line:
                return
            n += 1
            if len(line) > MAX_MANIFEST_LINE and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the line
                    line = f.readline(1 << 20)
                out.dropped_lines += 1
                continue
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{p}: line {n} is not valid UTF-8") from None
            try:
                yield json.loads(text), f"{p}: line {n}"
            except ValueError:
                raise DataError(f"{p}: line {n} is not valid JSON") from None


def _csv_records(p: Any, delim: str) -> Iterator[tuple[Any, str]]:
    old = csv.field_size_limit()
    csv.field_size_limit(MAX_MANIFEST_LINE)
    try:
        with io.TextIOWrapper(_binary(p), encoding="utf-8-sig", errors="strict",
                              newline="") as f:
            reader = csv.DictReader(f, delimiter=delim)
            try:
                for rec in reader:
                    yield rec, f"{p}: line {reader.line_num}"
            except UnicodeDecodeError:
                raise DataError(f"{p}: line {reader.line_num + 1} is not valid UTF-8") from None
            except csv.Error as e:
                raise DataError(f"{p}: line {reader.line_num}: {e}") from None
    finally:
        csv.field_size_limit(old)


def _parquet_records(p: Any) -> Iterator[tuple[Any, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(p) if isinstance(p, Path) else p.open("rb"))
        names = pf.schema_arrow.names
        cols = [c for c in (*_KEY_FIELDS, *_CAPTION_FIELDS) if c in names]
        if "image" in cols and pa.types.is_struct(pf.schema_arrow.field("image").type):
            cols[cols.index("image")] = "image.path"  # never read the image bytes
        for i in range(pf.num_row_groups):
            for r, rec in enumerate(pf.read_row_group(i, columns=cols).to_pylist()):
                for k, v in rec.items():
                    if isinstance(v, bytes):
                        try:
                            rec[k] = v.decode("utf-8")
                        except UnicodeDecodeError:
                            raise DataError(f"{p}: row group {i} row {r}: column {k!r} is "
                                            "not valid UTF-8") from None
                yield rec, f"{p}: row group {i} row {r}"
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{p}: cannot read Parquet ({str(e).splitlines()[0][:200]})") from None


def read_captions(path: Any, max_chars: int = MAX_CAPTION_CHARS) -> Captions:
    """{image key: captions} from a JSONL, CSV/TSV or Parquet manifest.

    A record names its image by `image`/`path`/`file` (a path relative to the data root, or
    a bare file name) or `id` (the file stem), and carries `caption` (one) or `captions` (a
    list); several records of one image add up. Paths leaving the root are refused; invalid
    UTF-8 is refused naming the line; captions longer than `max_chars` are truncated and a
    JSONL line over 64 MiB is dropped, both counted on the result (a 10 MB line never
    reaches the tokenizer). `path`: a local path, or a file of the dataset's filesystem.
    """
    p = _as_file(path)
    if not p.is_file():
        raise DataError(f"{p}: captions file not found")
    out = Captions()
    out.source = str(p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        records = _parquet_records(p)
    elif suffix in (".csv", ".tsv"):
        records = _csv_records(p, "\t" if suffix == ".tsv" else ",")
    else:
        records = _jsonl_records(p, out)
    for rec, where in records:
        key, caps = _caption_record(rec, where)
        if not caps:
            continue
        kept = []
        for c in caps:
            if len(c) > max_chars:
                out.truncated += 1
                c = c[:max_chars]
            kept.append(c)
        out[key] = (*out.get(key, ()), *kept)
    if out.truncated or out.dropped_lines:
        log.warning("%s: %d caption(s) truncated to %d characters, %d over-long line(s) "
                    "dropped", p, out.truncated, max_chars, out.dropped_lines)
    return out


def captions_of(captions: dict[str, tuple[str, ...]], rel: str | None,
                 stem: str | None) -> tuple[str, ...]:
    if not captions:
        return ()
    return (rel and captions.get(rel)) or (stem and captions.get(stem)) or ()
