"""Dataset layouts under `data.root`: ImageNet-style folders and Hugging Face Parquet
exports, scanned into splits of samples."""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sweeper import synthetic
from sweeper.data.base import (
    IMAGE_EXTS,
    MAX_CAPTION_CHARS,
    DataError,
    DataSplit,
    Sample,
    inside_root,
)
from sweeper.data.manifests import (
    ClassTable,
    captions_of,
    read_captions,
    read_class_names,
    read_class_table,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- folders


def class_dirs(root: Path, split: str) -> list[tuple[str, str]]:
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
            if not inside_root(Path(e.path), real_root):
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
    dirs = class_dirs(root, split)
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
            if e.is_symlink() and not inside_root(Path(e.path), real_root):
                left.append(e.path)
                continue
            if not e.is_file():
                continue
            rel = f"{split}/{wnid}/{e.name}"
            samples.append(Sample(e.path, label, captions_of(captions, rel, stem)))
    if left:
        log.warning("%s: %d image symlink(s) leaving the data root not followed, e.g. %s",
                    root / split, len(left), left[0])
    return DataSplit(samples, wnids, class_names)


def data_file(root: Path | None, p: str | Path | None) -> Path | None:
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
    names_path, caps_path = data_file(r, class_names), data_file(r, captions_path)
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
            inside = [f for f in files if inside_root(f, real_root)]
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
                            caps += captions_of(captions, ip,
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
    names_path, caps_path = data_file(r, class_names), data_file(r, captions_path)
    table = read_class_table(names_path) if names_path else None
    captions = read_captions(caps_path) if caps_path else {}
    train = scan_parquet_split(r, "train", table, captions)
    val = scan_parquet_split(r, "val", table, captions)
    for name, split in (("train", train), ("val", val)):
        if not split.samples:
            raise DataError(f"{r / name}: no labelled images")
    _check_captions_matched(caps_path, captions, (train, val), r)
    return train, val


def resolved_inputs(data_spec: Any, root: str | Path | None) -> tuple[Path, Any, Any]:
    r = _check_root(root or data_spec.root)
    class_names, captions = data_spec.class_names, data_spec.captions
    if data_spec.synthetic is not None:
        class_names = class_names or r / "classes.json"
        captions = captions or r / "captions.jsonl"
    return r, class_names, captions


def data_root(data_spec: Any, cache_dir: str | Path | None = None) -> Path:
    """The dataset folder a trial reads: the synthetic one (generated and cached on first
    use) or `data.root`."""
    if data_spec.synthetic is not None:
        s = data_spec.synthetic
        return synthetic.dataset_dir(s.n_classes, s.train_per_class, s.val_per_class,
                                     s.image_size, s.seed, Path(cache_dir) if cache_dir else None)
    return Path(data_spec.root)
