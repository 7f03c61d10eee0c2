"""Image-text data: ImageNet-style folders and Parquet exports, class names, captions, text
sources, class subsets, the model's own preprocessing, and the global-batch sampler.

Never imports Ray: a trial's worker calls `build_trial_data(...)`, then builds its loader
with its rank and world size.

Two layouts (`data.format`), both under `data.root`:

- `folder`: `train/<wnid>/<file>` and `val/<wnid>/<file>` (JPEG, PNG, ... any case of
  extension). A symlink that leaves the root is not followed.
- `parquet` (what Hugging Face `datasets` exports): `train.parquet`, `train/**.parquet`,
  `train-*.parquet` or `data/train-*.parquet` (and the same for `val` or `validation`), with
  columns `image` (struct of `bytes`/`path`, or plain binary), `label` (int or wnid) and
  optionally `caption`/`captions`. Only the small columns are read up front; images are
  read a row group at a time, lazily, in each DataLoader worker, through a small LRU.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import math
import os
import posixpath
import random
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MAX_CAPTION_CHARS = 1000  # longer captions are truncated (and counted) when read
MAX_MANIFEST_LINE = 64 << 20  # a longer JSONL line is dropped (and counted), never parsed
ROW_GROUP_CACHE = 4  # Parquet row groups kept decoded-from-disk per DataLoader worker
_KEY_FIELDS = ("image", "path", "file", "file_name", "image_path", "id", "image_id")
_CAPTION_FIELDS = ("captions", "caption", "text")


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


def _inside(path: Path, real_root: Path) -> bool:
    """Whether `path`, with every symlink resolved, stays under `real_root`."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(real_root)
    except OSError:
        return False


# --------------------------------------------------------------------------- class names


@dataclass(frozen=True)
class ClassTable:
    """Class names from `data.class_names`, in the file's order (for integer labels)."""

    entries: tuple[tuple[str, str], ...]  # (wnid, name), index order
    source: str

    @property
    def by_wnid(self) -> dict[str, str]:
        return dict(self.entries)


def read_class_table(path: str | Path) -> ClassTable:
    """(wnid, name) entries in index order, from:

    - JSON `{wnid: name}` or `{wnid: [name, synonym, ...]}` (file order);
    - Keras' `imagenet_class_index.json`, `{"0": ["n01440764", "tench"], ...}` (index order,
      underscores in names become spaces);
    - CSV/TSV with `wnid,name` columns (a header row is optional);
    - text lines `wnid name words...` (ImageNet's `LOC_synset_mapping.txt`).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: class-names file not found")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read class names ({e.strerror})") from None
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


def read_class_names(path: str | Path) -> dict[str, str]:
    """{wnid: name} from any format `read_class_table` reads."""
    return read_class_table(path).by_wnid


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


def _jsonl_records(p: Path, out: Captions) -> Iterator[tuple[Any, str]]:
    with open(p, "rb") as f:
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


def _csv_records(p: Path, delim: str) -> Iterator[tuple[Any, str]]:
    old = csv.field_size_limit()
    csv.field_size_limit(MAX_MANIFEST_LINE)
    try:
        with open(p, encoding="utf-8-sig", errors="strict", newline="") as f:
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


def _parquet_records(p: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
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


def read_captions(path: str | Path, max_chars: int = MAX_CAPTION_CHARS) -> Captions:
    """{image key: captions} from a JSONL, CSV/TSV or Parquet manifest.

    A record names its image by `image`/`path`/`file` (a path relative to the data root, or
    a bare file name) or `id` (the file stem), and carries `caption` (one) or `captions` (a
    list); several records of one image add up. Paths leaving the root are refused; invalid
    UTF-8 is refused naming the line; captions longer than `max_chars` are truncated and a
    JSONL line over 64 MiB is dropped, both counted on the result (a 10 MB line never
    reaches the tokenizer).
    """
    p = Path(path)
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


def _captions_of(captions: dict[str, tuple[str, ...]], rel: str | None,
                 stem: str | None) -> tuple[str, ...]:
    if not captions:
        return ()
    return (rel and captions.get(rel)) or (stem and captions.get(stem)) or ()


# --------------------------------------------------------------------------- folders


def _class_dirs(root: Path, split: str) -> list[tuple[str, str]]:
    """(wnid, directory path) of `root/<split>/*`, sorted, inside the root."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing split folder")
    real_root = Path(os.path.realpath(root))
    out, left = [], 0
    with os.scandir(split_dir) as it:
        for e in sorted(it, key=lambda e: e.name):
            if e.name.startswith(".") or not e.is_dir():
                continue
            # A symlinked class folder may point anywhere: follow it only if it stays inside.
            if not _inside(Path(e.path), real_root):
                left += 1
                continue
            out.append((e.name, e.path))
    if left:
        log.warning("%s: %d class folder(s) symlinked outside the data root not followed",
                    split_dir, left)
    if not out:
        extra = f" ({left} symlinked outside the data root, not followed)" if left else ""
        raise DataError(f"{split_dir}: no class folders{extra}")
    return out


def _class_names_for(wnids: Sequence[str], names: dict[str, str] | None, where: Path,
                     ) -> list[str]:
    if names is None:
        return list(wnids)
    for w in wnids:
        if w not in names:
            raise DataError(f"class {w!r} in {where} has no name in data.class_names")
    return [names[w] for w in wnids]


def scan_folder_split(root: Path, split: str, names: dict[str, str] | None,
                      captions: dict[str, tuple[str, ...]],
                      only: set[str] | None = None) -> DataSplit:
    """Samples of `root/<split>/<wnid>/<file>`, labelled in sorted wnid order.

    `only`: scan just these wnids' folders (the label indices still count every class).
    A file symlinked outside the root is skipped (and counted in one warning)."""
    root = Path(root)
    dirs = _class_dirs(root, split)
    wnids = [w for w, _ in dirs]
    class_names = _class_names_for(wnids, names, root / split)
    real_root = Path(os.path.realpath(root))
    samples: list[Sample] = []
    left: list[str] = []
    for label, (wnid, d) in enumerate(dirs):
        if only is not None and wnid not in only:
            continue
        # The folder itself is inside the root (checked above): only symlinks can leave it.
        with os.scandir(d) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for e in entries:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            if e.is_symlink() and not _inside(Path(e.path), real_root):
                left.append(e.path)
                continue
            if not e.is_file():
                continue
            rel = f"{split}/{wnid}/{e.name}"
            samples.append(Sample(e.path, label, _captions_of(captions, rel, stem)))
    if left:
        log.warning("%s: %d image symlink(s) leaving the data root not followed, e.g. %s",
                    root / split, len(left), left[0])
    return DataSplit(samples, wnids, class_names)


def _data_file(root: Path | None, p: str | Path | None) -> Path | None:
    """A class-names or captions path: absolute, else relative to the data root when it
    exists there, else as given (relative to the working directory)."""
    if not p:
        return None
    q = Path(p).expanduser()
    if not q.is_absolute() and root is not None and (root / q).exists():
        return root / q
    return q


def _check_root(root: str | Path | None) -> Path:
    if root is None:
        raise DataError("data.root: no data root given")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"{r}: data root not found")
    return r


def _check_captions_matched(captions_path: Any, captions: dict, splits: Sequence[DataSplit],
                            root: Path) -> None:
    if captions_path is not None and not any(s.captions for sp in splits for s in sp.samples):
        raise DataError(f"{captions_path}: no caption matches any image under {root}")


def load_folder_dataset(root: str | Path, class_names: str | Path | None,
                        captions_path: str | Path | None) -> tuple[DataSplit, DataSplit]:
    """(train, val) of an ImageNet-style folder dataset, validated before training."""
    r = _check_root(root)
    names_path, caps_path = _data_file(r, class_names), _data_file(r, captions_path)
    names = read_class_names(names_path) if names_path else None
    captions = read_captions(caps_path) if caps_path else {}
    train = scan_folder_split(r, "train", names, captions)
    val = scan_folder_split(r, "val", names, captions)
    for split in (train, val):
        if not split.samples:
            raise DataError(f"{r / ('train' if split is train else 'val')}: no images")
    _check_captions_matched(caps_path, captions, (train, val), r)
    return train, val


# --------------------------------------------------------------------------- parquet


def parquet_split_files(root: Path, split: str) -> list[Path]:
    """The Parquet files of one split: `<split>.parquet`, `<split>/**.parquet`,
    `<split>-*.parquet` or `data/<split>-*.parquet` (`val` also finds `validation`)."""
    real_root = Path(os.path.realpath(root))
    for name in [split, *(("validation", "valid") if split == "val" else ())]:
        single, folder = root / f"{name}.parquet", root / name
        if single.is_file():
            files = [single]
        elif folder.is_dir():
            files = sorted(folder.rglob("*.parquet"))
        else:
            files = sorted(root.glob(f"{name}-*.parquet")) + sorted(
                root.glob(f"data/{name}-*.parquet"))
        if files:
            inside = [f for f in files if _inside(f, real_root)]
            if len(inside) < len(files):
                log.warning("%s: %d Parquet file(s) symlinked outside the data root not read",
                            root, len(files) - len(inside))
            if not inside:
                raise DataError(f"{root / name}: every Parquet file is a symlink leaving the "
                                "data root")
            return inside
    raise DataError(f"{root / split}: missing split (no {split}.parquet, {split}/*.parquet, "
                    f"{split}-*.parquet or data/{split}-*.parquet)")


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


class _LabelNamer:
    """Class key (wnid) and name of a Parquet label: a wnid string, or an int index into
    the ClassLabel names and/or `data.class_names`."""

    def __init__(self, table: ClassTable | None) -> None:
        self.table = table
        self.by_wnid = table.by_wnid if table else None

    def __call__(self, label: Any, hf_names: list[str] | None, where: Path) -> tuple[str, str]:
        if isinstance(label, str):
            if self.by_wnid is None:
                return label, label
            if label not in self.by_wnid:
                raise DataError(f"class {label!r} in {where} has no name in data.class_names")
            return label, self.by_wnid[label]
        i = int(label)
        if hf_names is not None and i < len(hf_names):
            key = hf_names[i]
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


def scan_parquet_split(root: Path, split: str, table: ClassTable | None,
                       captions: dict[str, tuple[str, ...]]) -> DataSplit:
    """Samples of one Parquet split, one per row with a label (rows with a null or negative
    label, like a test split's, are left out). Reads only the `label`, caption and
    `image.path` columns, a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    namer = _LabelNamer(table)
    rows: list[tuple[str, int, int, Any, tuple[str, ...]]] = []
    classes: dict[Any, tuple[Any, str, str]] = {}  # label -> (sort key, wnid, name)
    unlabelled = 0
    for f in parquet_split_files(root, split):
        try:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            if "image" not in schema.names:
                raise DataError(f"{f}: no 'image' column")
            itype = schema.field("image").type
            if pa.types.is_struct(itype):
                if itype.get_field_index("bytes") < 0 and itype.get_field_index("path") < 0:
                    raise DataError(f"{f}: column 'image' has neither 'bytes' nor 'path'")
            elif not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype)):
                raise DataError(f"{f}: column 'image' is {itype}, not a struct or binary")
            if "label" not in schema.names:
                raise DataError(f"{f}: no 'label' column")
            ltype = schema.field("label").type
            if not (pa.types.is_integer(ltype) or pa.types.is_string(ltype)
                    or pa.types.is_large_string(ltype) or pa.types.is_dictionary(ltype)):
                raise DataError(f"{f}: column 'label' is {ltype}, not an int or a wnid")
            hf_names = _hf_class_names(schema)
            cols = ["label", *(c for c in ("caption", "captions") if c in schema.names)]
            with_path = bool(captions) and pa.types.is_struct(itype) and \
                itype.get_field_index("path") >= 0
            if with_path:
                cols.append("image.path")
            for rg in range(pf.num_row_groups):
                batch = pf.read_row_group(rg, columns=cols).to_pydict()
                labels = batch["label"]
                caps_col = batch.get("caption") or batch.get("captions")
                paths = batch.get("image") if with_path else None
                for r, label in enumerate(labels):
                    if label is None or (not isinstance(label, str) and int(label) < 0):
                        unlabelled += 1
                        continue
                    key = label if isinstance(label, str) else int(label)
                    if key not in classes:
                        wnid, name = namer(label, hf_names, f)
                        classes[key] = (label if isinstance(label, str) else int(label),
                                        wnid, name)
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
                            caps += _captions_of(captions, ip,
                                                 posixpath.splitext(posixpath.basename(ip))[0])
                    rows.append((str(f), rg, r, key, caps))
        except DataError:
            raise
        except (OSError, pa.ArrowException, ValueError) as e:
            raise DataError(f"{f}: cannot read Parquet ({str(e).splitlines()[0][:200]})"
                            ) from None
    if unlabelled:
        log.warning("%s: %d row(s) without a label left out", root / split, unlabelled)
    # Labels: int labels in index order, wnid labels in sorted order (as folders are).
    order = sorted(classes, key=lambda k: (isinstance(k, str), k))
    wnids = [classes[k][1] for k in order]
    if len(set(wnids)) != len(wnids):
        dup = next(w for w in wnids if wnids.count(w) > 1)
        raise DataError(f"{root / split}: two labels map to class {dup!r}")
    index = {k: i for i, k in enumerate(order)}
    samples = [Sample(f, index[k], caps, rg, r) for f, rg, r, k, caps in rows]
    return DataSplit(samples, wnids, [classes[k][2] for k in order])


def load_parquet_dataset(root: str | Path, class_names: str | Path | None,
                         captions_path: str | Path | None) -> tuple[DataSplit, DataSplit]:
    """(train, val) of a Parquet image dataset, validated before training."""
    r = _check_root(root)
    names_path, caps_path = _data_file(r, class_names), _data_file(r, captions_path)
    table = read_class_table(names_path) if names_path else None
    captions = read_captions(caps_path) if caps_path else {}
    train = scan_parquet_split(r, "train", table, captions)
    val = scan_parquet_split(r, "val", table, captions)
    for name, split in (("train", train), ("val", val)):
        if not split.samples:
            raise DataError(f"{r / name}: no labelled images")
    _check_captions_matched(caps_path, captions, (train, val), r)
    return train, val


def _resolved_inputs(data_spec: Any, root: str | Path | None) -> tuple[Path, Any, Any]:
    r = _check_root(root or data_spec.root)
    class_names, captions = data_spec.class_names, data_spec.captions
    if data_spec.synthetic is not None:
        class_names = class_names or r / "classes.json"
        captions = captions or r / "captions.jsonl"
    return r, class_names, captions


def load_dataset(data_spec: Any, root: str | Path | None = None,
                 ) -> tuple[DataSplit, DataSplit]:
    """(train, val) of the spec's data, whatever its format, fully scanned and checked."""
    r, class_names, captions = _resolved_inputs(data_spec, root)
    if data_spec.format == "parquet":
        return load_parquet_dataset(r, class_names, captions)
    return load_folder_dataset(r, class_names, captions)


def check_dataset(data_spec: Any, n_train_classes: Sequence[int] = (),
                  text_sources: Sequence[str] = (), root: str | Path | None = None,
                  ) -> tuple[DataSplit, DataSplit]:
    """Everything about the data that can be refused before a trial launches: the layout,
    class names, captions, `data.train_classes`/`eval_classes`, and captions for a
    `captions` text source. Returns (train, val)."""
    train, val = load_dataset(data_spec, root)
    if data_spec.train_classes:  # (a k above the class count is the caller's to word)
        for k in n_train_classes:
            choose_train_classes(train.wnids, k, 0, data_spec.class_order,
                                 data_spec.train_classes)
    for i, w in enumerate(data_spec.eval_classes or []):
        if w not in val.wnids:
            raise DataError(f"data.eval_classes[{i}]: class {w!r} is not in the val split")
    if "captions" in text_sources and not any(s.captions for s in train.samples):
        raise DataError(f"{data_spec.captions or data_spec.root}: text_source 'captions' but "
                        "no training image has a caption")
    return train, val


# --------------------------------------------------------------------------- subsets & text


def choose_train_classes(wnids: Sequence[str], k: int, seed: int, order: str = "random",
                         explicit: Sequence[str] | None = None) -> list[str]:
    """The k training classes: the first k of an explicit list, the first k sorted, or a
    draw seeded by `seed` (the same on every rank and every rerun)."""
    if explicit:
        for i, w in enumerate(explicit):
            if w not in wnids:
                raise DataError(f"data.train_classes[{i}]: unknown class {w!r}")
        if len(set(explicit)) != len(explicit):
            raise DataError("data.train_classes: a class is listed twice")
        if k > len(explicit):
            raise DataError(f"n_train_classes: {k} exceeds the {len(explicit)} classes of "
                            "data.train_classes")
        return list(explicit)[:k]
    if k > len(wnids):
        raise DataError(f"n_train_classes: {k} exceeds the dataset's {len(wnids)} classes")
    if order == "sorted":
        return sorted(wnids)[:k]
    rng = random.Random(seed)
    return sorted(rng.sample(sorted(wnids), k))


def pick_text(sample: Sample, class_name: str, templates: Sequence[str], text_source: str,
              seed: int, epoch: int, index: int) -> str | None:
    """The text paired with a sample this epoch (deterministic in seed, epoch and index).

    `templates`: a template drawn per sample; `captions`: one of its captions (None when it
    has none: the sample is left out); `mixed`: a caption when it has one, else a template.
    """
    # Ints hash the same in every process and run (no PYTHONHASHSEED salt).
    rng = random.Random(hash((seed, epoch, index)) & 0xFFFFFFFF)
    if text_source in ("captions", "mixed") and sample.captions:
        return sample.captions[rng.randrange(len(sample.captions))]
    if text_source == "captions":
        return None
    return templates[rng.randrange(len(templates))].format(class_name)


# --------------------------------------------------------------------------- preprocessing


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _triple(v: Any) -> tuple[float, float, float]:
    if isinstance(v, int | float):
        return (float(v),) * 3
    t = tuple(float(x) for x in v)
    return t if len(t) == 3 else (t[0],) * 3


@dataclass(frozen=True)
class ImageTransform:
    """The model's own image-processor settings applied to a PIL image -> [3, H, W] float.

    Reads resolution, resize mode (fixed height x width, or shortest edge keeping the aspect
    ratio, as CLIP), centre crop, rescale and mean/std from the HF image processor and
    reproduces its geometry exactly (same output sizes, same PIL resampling, same crop and
    zero padding offsets, transparency composited on white), but runs as one cheap function
    that pickles into DataLoader worker processes.
    """

    height: int
    width: int
    shortest_edge: int | None
    crop: tuple[int, int] | None
    resample: int
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    do_resize: bool = True
    alpha_on_white: bool = True

    @classmethod
    def from_processor(cls, image_processor: Any) -> ImageTransform:
        ip = image_processor
        size = getattr(ip, "size", None)
        shortest = _size_get(size, "shortest_edge")
        h, w = _size_get(size, "height"), _size_get(size, "width")
        do_resize = bool(getattr(ip, "do_resize", True))
        if do_resize and not shortest and not (h and w):
            raise ValueError(f"unsupported image-processor size {size!r}: "
                             "expected height/width or shortest_edge")
        if do_resize and shortest and _size_get(size, "longest_edge"):
            raise ValueError("unsupported image-processor size: shortest_edge with "
                             "longest_edge")
        crop = None
        cs = getattr(ip, "crop_size", None)
        if getattr(ip, "do_center_crop", False) and cs:
            crop = (int(_size_get(cs, "height")), int(_size_get(cs, "width")))
        resample = getattr(ip, "resample", None)
        resample = Image.BICUBIC if resample is None else resample
        rescale = float(getattr(ip, "rescale_factor", 1 / 255) or 1 / 255)
        if not getattr(ip, "do_rescale", True):
            rescale = 1.0
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if getattr(ip, "do_normalize", True):
            mean, std = _triple(ip.image_mean), _triple(ip.image_std)
        default = int(shortest or 224)
        return cls(int(h or default), int(w or default),
                   int(shortest) if shortest and not (h and w) else None, crop,
                   int(resample), rescale, mean, std, do_resize,
                   bool(getattr(ip, "do_convert_rgb", True)))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the image (shortest-edge
        resize without a crop)."""
        if self.crop:
            return self.crop
        if self.do_resize and self.shortest_edge is None:
            return (self.height, self.width)
        return None

    def resize_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the resize step, as HF computes it (the long side of a
        shortest-edge resize is truncated, not rounded)."""
        if not self.do_resize:
            return w, h
        if self.shortest_edge is None:
            return self.width, self.height
        s = self.shortest_edge
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (s, new_long) if w <= h else (new_long, s)

    def to_rgb(self, img: Image.Image) -> Image.Image:
        if img.mode == "RGB":
            return img
        if self.alpha_on_white and ("A" in img.getbands()
                                    or img.info.get("transparency") is not None):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return img.convert("RGB")

    def resize_uint8(self, img: Image.Image) -> np.ndarray:
        """Resize (and crop) to the model's input resolution as HWC uint8."""
        img = self.to_rgb(img)
        size = self.resize_size(*img.size)
        if size != img.size:
            img = img.resize(size, self.resample)
        arr = np.asarray(img)
        if self.crop:
            arr = _center_crop(arr, *self.crop)
        return arr

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.array([self.rescale / s for s in self.std], dtype=np.float32).reshape(3, 1, 1)
        b = np.array([m / s for m, s in zip(self.mean, self.std, strict=True)],
                     dtype=np.float32).reshape(3, 1, 1)
        return a, b

    def normalize(self, arr: np.ndarray | torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """HWC (or NHWC) uint8 -> CHW (NCHW) float32, rescaled and normalised, written into
        `out` when given. One fused multiply-subtract, x * (rescale / std) - mean / std:
        HF's (x * rescale - mean) / std up to float32 rounding (within 1e-6)."""
        if isinstance(arr, torch.Tensor) and arr.device.type != "cpu":
            a, b = (torch.from_numpy(v).to(arr.device) for v in self._affine)
            return arr.movedim(-1, -3).float().mul_(a).sub_(b)
        x = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        x = np.moveaxis(x, -1, -3)
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float32)
        o = out.numpy()
        a, b = self._affine
        np.multiply(x, a, out=o)
        np.subtract(o, b, out=o)
        return out

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize_uint8(img))


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """HF's `center_crop` on HWC: offsets (H - ch) // 2, zero padding when too small."""
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, *arr.shape[2:]), dtype=arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[tp:tp + h, lp:lp + w] = arr
    top, left = top + tp, left + lp
    return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


# --------------------------------------------------------------------------- datasets


_WARNED: set[str] = set()


def _warn_bad(where: str, err: BaseException) -> None:
    """Log an unreadable image once per process."""
    if where not in _WARNED:
        _WARNED.add(where)
        log.warning("skipping unreadable image %s: %s: %s", where, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")


class _RowGroupCache:
    """The `image` column of the last few Parquet row groups read (per process)."""

    def __init__(self, size: int = ROW_GROUP_CACHE) -> None:
        self.size = size
        self.groups: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.files: OrderedDict[str, Any] = OrderedDict()

    def _file(self, path: str) -> Any:
        import pyarrow.parquet as pq

        pf = self.files.pop(path, None) or pq.ParquetFile(path)
        self.files[path] = pf
        while len(self.files) > self.size:
            self.files.popitem(last=False)
        return pf

    def get(self, path: str, row_group: int, row: int) -> tuple[bytes | None, str | None]:
        key = (path, row_group)
        col = self.groups.pop(key, None)
        if col is None:
            col = self._file(path).read_row_group(row_group, columns=["image"]).column(0)
            col = col.combine_chunks()
        self.groups[key] = col
        while len(self.groups) > self.size:
            self.groups.popitem(last=False)
        import pyarrow as pa

        if pa.types.is_struct(col.type):
            names = [col.type.field(i).name for i in range(col.type.num_fields)]
            b = col.field("bytes")[row].as_py() if "bytes" in names else None
            p = col.field("path")[row].as_py() if "path" in names else None
            return b, p
        return col[row].as_py(), None


class _Items(list):
    """The items of one batch (a list of item dicts, as `__getitem__` makes them) whose
    images already sit in one uint8 tensor `uint8` [n, H, W, 3] (item `pixel_values` are
    views of its rows); `transform` normalises it. Built in shared memory inside a
    DataLoader worker, so the batch crosses to the main process without another copy."""

    uint8: torch.Tensor | None = None
    transform: ImageTransform | None = None


def _batch_buffer(n: int, h: int, w: int) -> torch.Tensor:
    """An uninitialised [n, h, w, 3] uint8 tensor; in a DataLoader worker, allocated in
    shared memory so that sending the batch to the main process copies nothing (as torch's
    default_collate does)."""
    numel = n * h * w * 3
    if torch.utils.data.get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=torch.uint8)
            storage = proto._typed_storage()._new_shared(numel, device="cpu")
            return proto.new(storage).view(n, h, w, 3)
        except (AttributeError, RuntimeError):  # private API moved: plain memory
            pass
    return torch.empty(n, h, w, 3, dtype=torch.uint8)


class ImageTextDataset(torch.utils.data.Dataset):
    """Indexable by `(index, epoch)` so the text drawn per sample changes with the epoch
    even inside persistent DataLoader workers (they never see a `set_epoch` call).

    An unreadable, truncated or decompression-bomb image is logged once, counted
    (`skipped` on the item) and never raises. With `substitute_bad` (training), the next
    readable sample takes its place so every rank keeps the same batch size (the global-
    batch losses need equal shards); otherwise the item is only the count.
    """

    def __init__(self, samples: Sequence[Sample], names: Sequence[str], transform: ImageTransform,
                 templates: Sequence[str], text_source: str, seed: int,
                 substitute_bad: bool = False, root: str | Path | None = None) -> None:
        self.samples = list(samples)
        self.names = list(names)
        self.transform = transform
        self.templates = list(templates)
        self.text_source = text_source
        self.seed = seed
        self.substitute_bad = substitute_bad
        self.root = str(root) if root is not None else None
        self._cache: _RowGroupCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}  # each worker process opens its own files

    def __len__(self) -> int:
        return len(self.samples)

    # -- reading

    def _open(self, s: Sample) -> Image.Image:
        if s.row_group < 0:
            return Image.open(s.path)
        if self._cache is None:
            self._cache = _RowGroupCache()
        data, path = self._cache.get(s.path, s.row_group, s.row)
        if data is not None:
            return Image.open(io.BytesIO(data))
        if not path:
            raise OSError("row has neither image bytes nor a path")
        base = Path(self.root) if self.root else Path(s.path).parent
        p = Path(path) if Path(path).is_absolute() else base / path
        if not _inside(p, Path(os.path.realpath(base))):
            raise OSError(f"image path {path!r} leaves the data root")
        return Image.open(p)

    def _where(self, s: Sample) -> str:
        return s.path if s.row_group < 0 else f"{s.path}[row group {s.row_group}, row {s.row}]"

    def load_uint8(self, index: int) -> np.ndarray | None:
        """The sample's image resized for the model (HWC uint8), or None (logged) when it
        cannot be read. Decompression-bomb warnings count as errors."""
        s = self.samples[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with self._open(s) as im:
                    return self.transform.resize_uint8(im)
        except Exception as e:  # any decoder failure: one bad file never ends a trial
            _warn_bad(self._where(s), e)
            return None

    def _readable(self, index: int) -> tuple[int, np.ndarray | None, int]:
        """(index actually used, its pixels, bad images met)."""
        arr = self.load_uint8(index)
        if arr is not None or not self.substitute_bad:
            return index, arr, int(arr is None)
        bad, n = 1, len(self.samples)
        for j in range(1, min(n, 16)):
            alt = (index + j) % n  # a neighbour: usually the same class
            arr = self.load_uint8(alt)
            if arr is not None:
                return alt, arr, bad
            bad += 1
        return index, None, bad

    def _item(self, index: int, epoch: int, used: int, pixels: torch.Tensor | None,
              bad: int) -> dict[str, Any]:
        if pixels is None:
            return {"skipped": bad}
        s = self.samples[used]
        text = pick_text(s, self.names[s.label], self.templates, self.text_source, self.seed,
                         epoch, used)
        return {"pixel_values": pixels, "label": s.label, "text": text, "index": used,
                "skipped": bad}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        used, arr, bad = self._readable(index)
        return self._item(index, epoch, used, None if arr is None else
                          self.transform.normalize(arr), bad)

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> _Items:
        """A whole batch (what `Collate` takes): Parquet rows read grouped by row group,
        each image resized straight into one uint8 batch tensor (normalised later, once
        per batch, by `Collate` or by the loader `make_loader` builds)."""
        keys = [k if isinstance(k, tuple) else (k, 0) for k in keys]
        size = self.transform.output_size
        if size is None or not keys:  # sizes differ per image: one float tensor each
            return _Items(self[k] for k in keys)
        order = sorted(range(len(keys)), key=lambda i: (
            self.samples[keys[i][0]].path, self.samples[keys[i][0]].row_group, i))
        items = _Items([None] * len(keys))
        items.uint8, items.transform = _batch_buffer(len(keys), *size), self.transform
        rows = items.uint8.numpy()
        for i in order:
            index, epoch = keys[i]
            used, arr, bad = self._readable(index)
            if arr is not None:
                rows[i] = arr
            items[i] = self._item(index, epoch, used, None if arr is None else items.uint8[i],
                                  bad)
        return items


@dataclass
class Collate:
    """Tokenise the batch's texts and stack its images; drop unreadable samples.

    `pixel_values`: [b, 3, H, W] float, normalised; or, with `uint8` (set by `make_loader`,
    whose loader then normalises in the consuming process or on the GPU), the batch's
    [b, H, W, 3] uint8 pixels, a quarter of the bytes to move between processes."""

    tokenizer: Any
    max_length: int
    uint8: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good_idx = [i for i, it in enumerate(items) if it and "pixel_values" in it]
        skipped = sum(int(it.get("skipped", 0)) for it in items if it)
        if not good_idx:
            return {"skipped": skipped, "size": 0}
        good = [items[i] for i in good_idx]
        pixels = getattr(items, "uint8", None)
        if pixels is not None:
            if len(good_idx) < len(items):
                pixels = pixels[torch.tensor(good_idx)]
            if not self.uint8:
                pixels = items.transform.normalize(pixels)
        else:
            pixels = torch.stack([it["pixel_values"] for it in good])
        texts = [it["text"] for it in good]
        tok = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {
            "pixel_values": pixels,
            "input_ids": tok["input_ids"],
            "attention_mask": tok.get("attention_mask"),
            "labels": torch.tensor([it["label"] for it in good], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "skipped": skipped,
            "size": len(good),
        }


@dataclass
class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of every *global* batch of one epoch.

    The epoch's permutation (seeded by seed + epoch) is cut into global batches of
    `batch_size`; rank r takes items [r*b, (r+1)*b) of each, b = batch_size / world_size.
    The last incomplete batch is dropped, unless it is the only one (fewer samples than one
    batch), in which case it is trimmed to a multiple of the world size. Every rank therefore
    runs the same number of steps, and the union over ranks is exactly the global batch.
    """

    n: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    epoch: int = 0
    skip_batches: int = 0
    shuffle: bool = True

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        full = self.n // self.batch_size
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(full)]
        if not batches:
            keep = (self.n // self.world_size) * self.world_size
            batches = [order[:keep]] if keep else []
        return batches

    def __len__(self) -> int:
        return max(0, len(self.global_batches()) - self.skip_batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for gb in self.global_batches()[self.skip_batches:]:
            b = len(gb) // self.world_size
            mine = gb[self.rank * b:(self.rank + 1) * b]
            yield [(i, self.epoch) for i in mine]


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps in one epoch of `n` samples at global `batch_size`."""
    return n // batch_size if n >= batch_size else int(n >= world_size)


@dataclass
class TrialData:
    """Everything a trial's worker needs from the data side."""

    train: ImageTextDataset
    val_samples: list[Sample]
    val_wnids: list[str]
    val_names: list[str]
    train_classes: list[str]  # wnids
    train_class_names: list[str]
    eval_templates: list[str]
    transform: ImageTransform
    seen: list[bool] = field(default_factory=list)  # per val class: trained on?
    left_out_no_caption: int = 0


def _trial_splits(data_spec: Any, n_train_classes: int, seed: int, root: Path,
                  class_names: Any, captions: Any) -> tuple[DataSplit, DataSplit, list[str]]:
    """(train restricted to the chosen classes, val, chosen wnids). Folder data scans only
    the chosen classes' training folders (a k-class trial never lists all of ImageNet)."""
    if data_spec.format == "parquet":
        train, val = load_parquet_dataset(root, class_names, captions)
        chosen = choose_train_classes(train.wnids, n_train_classes, seed,
                                      data_spec.class_order, data_spec.train_classes)
    else:
        names_path, caps_path = _data_file(root, class_names), _data_file(root, captions)
        names = read_class_names(names_path) if names_path else None
        caps = read_captions(caps_path) if caps_path else {}
        wnids = [w for w, _ in _class_dirs(root, "train")]
        chosen = choose_train_classes(wnids, n_train_classes, seed, data_spec.class_order,
                                      data_spec.train_classes)
        train = scan_folder_split(root, "train", names, caps, only=set(chosen))
        val = scan_folder_split(root, "val", names, caps)
        if not val.samples:
            raise DataError(f"{root / 'val'}: no images")
    keep = {train.wnids.index(w) for w in chosen}
    train.samples = [s for s in train.samples if s.label in keep]
    return train, val, chosen


def build_trial_data(data_spec: Any, text_source: str, n_train_classes: int, seed: int,
                     transform: ImageTransform, root: str | Path | None = None) -> TrialData:
    """Load and subset the data of one trial (the same on every rank)."""
    r, class_names, captions = _resolved_inputs(data_spec, root)
    train, val, chosen = _trial_splits(data_spec, n_train_classes, seed, r, class_names,
                                       captions)
    samples = train.samples
    left_out = 0
    if text_source == "captions":
        with_caps = [s for s in samples if s.captions]
        left_out = len(samples) - len(with_caps)
        samples = with_caps
    if not samples:
        raise DataError(f"{r / 'train'}: no training samples for the chosen classes"
                        + (" with a caption" if text_source == "captions" else ""))
    val_wnids, val_names = val.wnids, val.names
    val_samples = val.samples
    if data_spec.eval_classes:
        unknown = [w for w in data_spec.eval_classes if w not in val.wnids]
        if unknown:
            raise DataError(f"data.eval_classes: unknown class {unknown[0]!r}")
        sel = [val.wnids.index(w) for w in data_spec.eval_classes]
        remap = {old: new for new, old in enumerate(sel)}
        val_samples = [Sample(s.path, remap[s.label], s.captions, s.row_group, s.row)
                       for s in val.samples if s.label in remap]
        val_wnids = [val.wnids[i] for i in sel]
        val_names = [val.names[i] for i in sel]
    # Train labels use the train split's indices; names come from the train split too.
    ds = ImageTextDataset(samples, train.names, transform, data_spec.templates, text_source,
                          seed, substitute_bad=True, root=r)
    chosen_set = set(chosen)
    return TrialData(
        train=ds,
        val_samples=val_samples,
        val_wnids=val_wnids,
        val_names=val_names,
        train_classes=chosen,
        train_class_names=[train.names[train.wnids.index(w)] for w in chosen],
        eval_templates=list(data_spec.eval_templates or data_spec.templates),
        transform=transform,
        seen=[w in chosen_set for w in val_wnids],
        left_out_no_caption=left_out,
    )


class NormalizingLoader:
    """A DataLoader whose batches carry uint8 pixels ([b, H, W, 3], see `Collate.uint8`),
    yielding them normalised ([b, 3, H, W] float): on the current CUDA device when the
    loader pins memory (the 4x smaller uint8 batch is what crosses PCIe), else on the CPU
    in this process. Anything else in the batch passes through; other attributes are the
    DataLoader's."""

    def __init__(self, loader: torch.utils.data.DataLoader, transform: ImageTransform) -> None:
        self.loader, self.transform = loader, transform

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        device = None
        if self.loader.pin_memory and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        for batch in self.loader:
            px = batch.get("pixel_values")
            if isinstance(px, torch.Tensor) and px.dtype == torch.uint8:
                if device is not None:
                    px = px.to(device, non_blocking=True)
                batch["pixel_values"] = self.transform.normalize(px)
            yield batch


def make_loader(ds: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, collate: Any,
                num_workers: int, pin_memory: bool = False) -> Any:
    """A DataLoader over a batch sampler; workers persist across epochs when there are any.

    With an `ImageTextDataset` and a `Collate`, decoded images cross from the workers as
    uint8 and are normalised once per batch by the returned `NormalizingLoader`."""
    transform = getattr(ds, "transform", None)
    wrap = isinstance(collate, Collate) and isinstance(transform, ImageTransform)
    if wrap:
        collate = dataclasses.replace(collate, uint8=True)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # The batch sampler runs in this process, so a persistent worker still sees each
        # epoch's new order; keeping workers alive saves their start-up every epoch.
        persistent_workers=num_workers > 0,
    )
    return NormalizingLoader(loader, transform) if wrap else loader


__all__ = [
    "Captions",
    "ClassTable",
    "Collate",
    "DataError",
    "DataSplit",
    "GlobalBatchSampler",
    "ImageTextDataset",
    "ImageTransform",
    "NormalizingLoader",
    "Sample",
    "TrialData",
    "build_trial_data",
    "check_dataset",
    "choose_train_classes",
    "load_dataset",
    "load_folder_dataset",
    "load_parquet_dataset",
    "make_loader",
    "parquet_split_files",
    "pick_text",
    "read_captions",
    "read_class_names",
    "read_class_table",
    "scan_folder_split",
    "scan_parquet_split",
    "steps_per_epoch",
]
