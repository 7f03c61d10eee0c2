"""Image-text data: ImageNet-style folders, class names, captions, text sources, class
subsets, the model's own preprocessing, and the global-batch sampler.

Never imports Ray: a trial's worker calls `build_data(...)` with its rank and world size.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """Bad data layout found before training (one line, naming the path or key)."""


@dataclass(frozen=True)
class Sample:
    """One image on disk, its class index and its captions (possibly none)."""

    path: str
    label: int
    captions: tuple[str, ...] = ()


@dataclass
class DataSplit:
    """The samples of one split and the classes they are labelled with."""

    samples: list[Sample]
    wnids: list[str]  # label index -> wnid
    names: list[str]  # label index -> class name


# --------------------------------------------------------------------------- class names


def read_class_names(path: str | Path) -> dict[str, str]:
    """{wnid: name} from JSON ({wnid: name} or Keras' {"0": [wnid, name]}) or CSV/TSV."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: class-names file not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}: expected a JSON object")
        out: dict[str, str] = {}
        for k, v in obj.items():
            if isinstance(v, list) and len(v) == 2:  # Keras imagenet_class_index.json
                out[str(v[0])] = str(v[1]).replace("_", " ")
            elif isinstance(v, str):
                out[str(k)] = v
            else:
                raise DataError(f"{p}: entry {k!r} is neither a name nor [wnid, name]")
        return out
    delim = "\t" if p.suffix.lower() == ".tsv" or "\t" in text.splitlines()[0] else ","
    rows = list(csv.reader(io.StringIO(text), delimiter=delim))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["wnid", "name"]:
        rows = rows[1:]
    out = {}
    for i, row in enumerate(rows):
        if not row:
            continue
        if len(row) < 2:
            raise DataError(f"{p}: line {i + 1} needs wnid and name columns")
        out[row[0].strip()] = row[1].strip()
    return out


# --------------------------------------------------------------------------- captions


def _safe_relpath(rel: str, source: str) -> str:
    """Refuse manifest paths that would leave the dataset root."""
    pp = Path(rel)
    if pp.is_absolute() or ".." in pp.parts or rel.startswith(("/", "\\")):
        raise DataError(f"{source}: image path {rel!r} points outside the data root")
    return pp.as_posix()


def read_captions(path: str | Path, max_chars: int = 1000) -> dict[str, tuple[str, ...]]:
    """{image key: captions} from a JSONL/CSV/Parquet manifest.

    An image key is a path relative to the data root or an image id (file stem). Captions
    longer than `max_chars` are truncated (a 10 MB line must not reach the tokenizer).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: captions file not found")
    records: list[dict[str, Any]] = []
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(p).to_pylist()
    elif suffix in (".csv", ".tsv"):
        with open(p, encoding="utf-8", errors="replace", newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        with open(p, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise DataError(f"{p}: line {i + 1} is not valid JSON") from None
                records.append(rec)
    out: dict[str, tuple[str, ...]] = {}
    for rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{p}: every record must be an object")
        key = rec.get("image") or rec.get("path") or rec.get("file") or rec.get("id")
        if key is None:
            raise DataError(f"{p}: a record has no image/path/id field")
        key = str(key)
        if "/" in key or "\\" in key:
            key = _safe_relpath(key, str(p))
        caps = rec.get("captions", rec.get("caption"))
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list | tuple) or not caps:
            continue
        out[key] = tuple(str(c)[:max_chars] for c in caps)
    return out


# --------------------------------------------------------------------------- folders


def _list_class_dirs(split_dir: Path) -> list[Path]:
    root = split_dir.resolve()
    out = []
    for d in sorted(split_dir.iterdir()):
        # A symlinked class folder may point anywhere; follow it only if it stays inside.
        if d.is_dir() and d.resolve().is_relative_to(root.parent):
            out.append(d)
    return out


def scan_folder_split(root: Path, split: str, names: dict[str, str] | None,
                      captions: dict[str, tuple[str, ...]]) -> DataSplit:
    """Samples of `root/<split>/<wnid>/<file>`, labelled in sorted wnid order."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing split folder")
    class_dirs = _list_class_dirs(split_dir)
    if not class_dirs:
        raise DataError(f"{split_dir}: no class folders")
    wnids = [d.name for d in class_dirs]
    if names is not None:
        for w in wnids:
            if w not in names:
                raise DataError(f"class {w!r} in {split_dir} has no name in data.class_names")
    real_root = root.resolve()
    samples = []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS or not f.is_file():
                continue
            if not f.resolve().is_relative_to(real_root):
                log.warning("skipping %s: symlink leaves the data root", f)
                continue
            rel = f.relative_to(root).as_posix()
            caps = captions.get(rel) or captions.get(f.stem) or ()
            samples.append(Sample(str(f), label, caps))
    return DataSplit(samples, wnids, [names[w] if names else w for w in wnids])


def load_folder_dataset(root: str | Path, class_names: str | Path | None,
                        captions_path: str | Path | None) -> tuple[DataSplit, DataSplit]:
    """(train, val) of an ImageNet-style folder dataset, validated before training."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    names = read_class_names(class_names) if class_names else None
    captions = read_captions(captions_path) if captions_path else {}
    train = scan_folder_split(root, "train", names, captions)
    val = scan_folder_split(root, "val", names, captions)
    if captions_path and captions and not any(s.captions for s in train.samples + val.samples):
        raise DataError(f"{captions_path}: no caption matches any image under {root}")
    return train, val


# --------------------------------------------------------------------------- subsets & text


def choose_train_classes(wnids: Sequence[str], k: int, seed: int, order: str = "random",
                         explicit: Sequence[str] | None = None) -> list[str]:
    """The k training classes: an explicit list, the first k sorted, or a seeded draw."""
    if explicit:
        missing = [w for w in explicit if w not in wnids]
        if missing:
            raise DataError(f"data.train_classes: unknown class {missing[0]!r}")
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
    rng = random.Random(hash((seed, epoch, index)) & 0xFFFFFFFF)
    if text_source in ("captions", "mixed") and sample.captions:
        return sample.captions[rng.randrange(len(sample.captions))]
    if text_source == "captions":
        return None
    return templates[rng.randrange(len(templates))].format(class_name)


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ImageTransform:
    """The model's own image-processor settings applied to a PIL image -> [3, H, W] float.

    Reads resolution, resize mode, crop, rescale and mean/std from the HF image processor,
    so a hub checkpoint gets exactly its preprocessing, but runs as one cheap function that
    pickles into DataLoader worker processes.
    """

    height: int
    width: int
    shortest_edge: int | None
    crop: tuple[int, int] | None
    resample: int
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_processor(cls, image_processor: Any) -> ImageTransform:
        size = dict(image_processor.size)
        crop = None
        if getattr(image_processor, "do_center_crop", False) and image_processor.crop_size:
            cs = dict(image_processor.crop_size)
            crop = (int(cs["height"]), int(cs["width"]))
        shortest = size.get("shortest_edge")
        h = int(size.get("height", shortest or 224))
        w = int(size.get("width", shortest or 224))
        resample = getattr(image_processor, "resample", Image.BICUBIC)
        return cls(h, w, int(shortest) if shortest else None, crop, int(resample),
                   float(getattr(image_processor, "rescale_factor", 1 / 255)),
                   tuple(float(x) for x in image_processor.image_mean),
                   tuple(float(x) for x in image_processor.image_std))

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop if self.crop else (self.height, self.width)

    def resize_uint8(self, img: Image.Image) -> np.ndarray:
        """Resize (and crop) to the model's input resolution as HWC uint8."""
        img = img.convert("RGB")
        if self.shortest_edge is not None:
            w, h = img.size
            s = self.shortest_edge / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), self.resample)
        else:
            img = img.resize((self.width, self.height), self.resample)
        if self.crop:
            ch, cw = self.crop
            w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        return np.array(img, dtype=np.uint8)  # a writable copy: torch refuses read-only views

    def normalize(self, arr: np.ndarray | torch.Tensor) -> torch.Tensor:
        """HWC (or NHWC) uint8 -> CHW (NCHW) float32, rescaled and normalised."""
        t = torch.as_tensor(arr).float()
        t = t.movedim(-1, -3) * self.rescale
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (t - mean) / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize_uint8(img))


# --------------------------------------------------------------------------- datasets


class ImageTextDataset(torch.utils.data.Dataset):
    """Indexable by `(index, epoch)` so the text drawn per sample changes with the epoch
    even inside persistent DataLoader workers (they never see a `set_epoch` call)."""

    def __init__(self, samples: Sequence[Sample], names: Sequence[str], transform: ImageTransform,
                 templates: Sequence[str], text_source: str, seed: int) -> None:
        self.samples = list(samples)
        self.names = list(names)
        self.transform = transform
        self.templates = list(templates)
        self.text_source = text_source
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        s = self.samples[index]
        text = pick_text(s, self.names[s.label], self.templates, self.text_source, self.seed,
                         epoch, index)
        try:
            with Image.open(s.path) as im:
                pixels = self.transform(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("skipping unreadable image %s: %s", s.path, e)
            return {"skipped": 1}
        return {"pixel_values": pixels, "label": s.label, "text": text, "index": index}


@dataclass
class Collate:
    """Tokenise the batch's texts and stack its images; drop unreadable samples."""

    tokenizer: Any
    max_length: int

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [it for it in items if it and "pixel_values" in it]
        skipped = sum(1 for it in items if it and it.get("skipped"))
        if not good:
            return {"skipped": skipped, "size": 0}
        texts = [it["text"] for it in good]
        tok = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in good]),
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


def build_trial_data(data_spec: Any, text_source: str, n_train_classes: int, seed: int,
                     transform: ImageTransform, root: str | Path | None = None) -> TrialData:
    """Load and subset the data of one trial (the same on every rank)."""
    root = Path(root or data_spec.root)
    class_names = data_spec.class_names
    captions = data_spec.captions
    if data_spec.synthetic is not None:
        class_names = class_names or root / "classes.json"
        captions = captions or root / "captions.jsonl"
    train, val = load_folder_dataset(root, class_names, captions)
    chosen = choose_train_classes(train.wnids, n_train_classes, seed, data_spec.class_order,
                                  data_spec.train_classes)
    keep = {train.wnids.index(w) for w in chosen}
    samples = [s for s in train.samples if s.label in keep]
    left_out = 0
    if text_source == "captions":
        with_caps = [s for s in samples if s.captions]
        left_out = len(samples) - len(with_caps)
        samples = with_caps
    if not samples:
        raise DataError(f"{root}/train: no training samples for the chosen classes")
    val_wnids, val_names = val.wnids, val.names
    val_samples = val.samples
    if data_spec.eval_classes:
        unknown = [w for w in data_spec.eval_classes if w not in val.wnids]
        if unknown:
            raise DataError(f"data.eval_classes: unknown class {unknown[0]!r}")
        sel = [val.wnids.index(w) for w in data_spec.eval_classes]
        remap = {old: new for new, old in enumerate(sel)}
        val_samples = [Sample(s.path, remap[s.label], s.captions) for s in val.samples
                       if s.label in remap]
        val_wnids = [val.wnids[i] for i in sel]
        val_names = [val.names[i] for i in sel]
    # Train labels use the train split's indices; names come from the train split too.
    ds = ImageTextDataset(samples, train.names, transform, data_spec.templates, text_source, seed)
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


def make_loader(ds: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, collate: Collate,
                num_workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over a batch sampler; workers persist across epochs when there are any."""
    return torch.utils.data.DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # The batch sampler runs in this process, so a persistent worker still sees each
        # epoch's new order; keeping workers alive saves their start-up every epoch.
        persistent_workers=num_workers > 0,
    )


__all__ = [
    "Collate",
    "DataError",
    "GlobalBatchSampler",
    "ImageTextDataset",
    "ImageTransform",
    "Sample",
    "TrialData",
    "build_trial_data",
    "choose_train_classes",
    "load_folder_dataset",
    "make_loader",
    "pick_text",
    "read_captions",
    "read_class_names",
    "steps_per_epoch",
]
