"""Caches shared by the trials of a sweep (and by later sweeps on the same storage).

Two stores, both `.npy` arrays that every reader opens memory-mapped (the page cache holds
one copy per machine, whatever the number of trials, workers and DataLoader processes):

* **Frozen-tower features** (`<root>/features/<key>/`): when a variant freezes the vision
  tower (SigLiT, LiT) and `data.cache_features` is on, the image embeddings of the train
  and val splits, `[N, d]` float32, the *normalised* output of `DualEncoder.encode_image`
  (the frozen tower runs in eval mode: deterministic without augmentation, which is why
  `data.augment` is refused with it). Trials then train only the text tower and never
  decode an image.
* **Decode-once images** (`<root>/images/<key>/`, `data.cache_images`): every image of a
  split decoded and resized to the model's input resolution once, `[N, H, W, 3]` uint8;
  the dataset normalises the rows of each batch to float (`ImageTransform.normalize`,
  straight into the batch tensor), exactly as it does freshly decoded images.

`<root>` is `data.cache_dir` if set, else `<storage>/.cache`; when `storage` is a bucket,
the `.cache` of its node-local mirror (`sweeper.storage.mirror_dir`), and a store built on
one node is uploaded to `<storage>/.cache/...` (meta.json last) for the others to copy
instead of building it (`ensure_store(remote=...)`); stores are never read over the
network. A store's `<key>` is a content hash of everything its rows depend on: the
checkpoint (directory or hub id, its config.json and the size and mtime of its files),
the image transform's settings, the split and the dataset format's fingerprint of the
split's files (their `(path, size, mtime)`: image files, Parquet files or shards, local or
in a bucket; and, for features, the precision they were computed in). Any change gives a
new key, so a stale store is never read. Rows follow the split's scan order (the format's
`scan`; a WebDataset split is decoded shard by shard, front to back); the whole split is
cached, so trials with different class subsets share one store, and a trial on cached
rows reads them by index, whatever its format (a full shuffle, even for shards).

Stores are built before the trials by Ray tasks (`orchestration`, via `cache_jobs` and
`run_job`), or, when those did not run (in-process tests, a new variant on resume), by the
worker itself: one rank under a file lock while the others wait on it, so concurrent
trials and ranks build a store once.
A store is written to a temporary folder and renamed into place: readers never see half.

Never imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sweeper import data as D
from sweeper.collectives import Agreement
from sweeper.data.streaming import read_batches
from sweeper.evaluation import ValImages
from sweeper.models import DualEncoder, load_pretrained
from sweeper.spec import DataSpec, ModelSpec, SweepSpec
from sweeper.storage import Location, atomic_write_json, publish_dir, pull_dir
from sweeper.training import autocast_for, resolve_precision
from sweeper.trials import covering_configs, model_axis

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- keys


def cache_root(data_spec: Any, trial_dir: str | Path | None = None,
               storage: str | Path | None = None) -> Path:
    """Where the stores live: `data.cache_dir`, else `<storage>/.cache`. A worker knows
    its trial folder, `<storage>/<name>/trials/<id>` (sink.py), hence the storage; a trial
    folder outside that layout (in-process runs) keeps its stores in `<trial_dir>/.cache`."""
    if getattr(data_spec, "cache_dir", None):
        return Path(data_spec.cache_dir).expanduser().resolve()
    if storage is not None:
        return Path(storage).expanduser().resolve() / ".cache"
    t = Path(trial_dir or ".").resolve()
    if t.parent.name == "trials":
        return t.parents[2] / ".cache"
    return t / ".cache"


def remote_cache(trial_location: Location | None) -> Location | None:
    """`<storage>/.cache` in the bucket, from a trial's folder there
    (`<storage>/<name>/trials/<id>`); None on local storage."""
    if trial_location is None or not trial_location.remote:
        return None
    return trial_location.parent.parent.parent / ".cache"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def checkpoint_fingerprint(pretrained: str) -> dict[str, Any]:
    """What identifies a checkpoint's weights, without loading them: for a directory its
    path, a hash of its config.json and the (name, size, mtime_ns) of its files; for a hub
    id the id and, when the hub cache holds it, the config's hash and snapshot (revision)."""
    p = Path(pretrained)
    if p.is_dir():
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
                       if f.is_file() and not f.name.startswith("."))
        cfg = p / "config.json"
        return {"checkpoint": str(p.resolve()), "files": files,
                "config": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None}
    out: dict[str, Any] = {"checkpoint": pretrained, "config": None, "revision": None}
    with contextlib.suppress(Exception):  # no hub library or nothing cached: the id alone
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "config.json")
        if isinstance(cached, str) and Path(cached).is_file():
            out["config"] = hashlib.sha256(Path(cached).read_bytes()).hexdigest()
            out["revision"] = Path(cached).parent.name  # snapshots/<commit>/config.json
    return out


@dataclass
class SplitListing:
    """Every sample of one split, in scan order (= row order of its stores), and how to
    read them (`reader`, the dataset format's)."""

    root: str
    split: str
    samples: list[D.Sample]
    digest: str  # the format's fingerprint: (path, size, mtime) of every file of the split
    reader: Any = None

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.samples]

    @classmethod
    def scan(cls, dataset: D.Dataset | str | Path, split: str) -> SplitListing:
        """The split of `dataset` (a `D.Dataset`, or the root of a folder dataset)."""
        ds = dataset if isinstance(dataset, D.Dataset) else D.open_dataset(dataset)
        # The class table (integer labels need it), not the captions: rows are images.
        samples = ds.format.scan(ds.files, split, ds.table(), D.Captions(), ds.spec).samples
        return cls(ds.root, split, samples, ds.fingerprint(split), ds.reader())

    def rows(self, samples: list[D.Sample]) -> np.ndarray:
        """Row of each sample in this split's stores (KeyError: not in the split)."""
        index = {s.id: i for i, s in enumerate(self.samples)}
        return np.array([index[s.id] for s in samples], dtype=np.int64)


def transform_settings(transform: D.Transform) -> dict[str, Any]:
    return dataclasses.asdict(transform)


def feature_key(checkpoint: dict[str, Any], transform: D.Transform,
                listing: SplitListing, precision: str) -> str:
    """Content key of a split's frozen-tower features."""
    return _sha({"v": CACHE_VERSION, "kind": "features", "checkpoint": checkpoint,
                 "transform": transform_settings(transform), "split": listing.split,
                 "files": listing.digest, "precision": precision})[:24]


def image_key(transform: D.Transform, listing: SplitListing) -> str:
    """Content key of a split's decoded uint8 images (only the resize settings matter, but
    the whole transform is hashed: simpler and never stale)."""
    return _sha({"v": CACHE_VERSION, "kind": "images",
                 "transform": transform_settings(transform), "split": listing.split,
                 "files": listing.digest})[:24]


# --------------------------------------------------------------------------- stores


class ArrayStore:
    """One cached array on disk: `data.npy` [N, ...], `ok.npy` [N] bool (False: the image
    could not be decoded; its row is zeros) and `meta.json`.

    The arrays are opened memory-mapped on first use in each process, and the store
    pickles as its folder: DataLoader workers and other processes map the same file
    instead of receiving a copy."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self._data: np.ndarray | None = None
        self._ok: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.dir / "data.npy", mmap_mode="r")
        return self._data

    @property
    def ok(self) -> np.ndarray:
        if self._ok is None:
            self._ok = np.load(self.dir / "ok.npy")
        return self._ok

    def __len__(self) -> int:
        return int(self.meta["n"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None, "_ok": None}


def _complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def ensure_store(directory: Path, build: Callable[[Path], dict[str, Any]],
                 remote: Location | None = None) -> ArrayStore:
    """The store in `directory`, built by `build(tmp_dir)` (which writes data.npy and
    ok.npy and returns metadata) if absent: under a file lock beside it, in a temporary
    folder renamed into place, so concurrent builders build once and readers never see a
    partial store. With `remote` (the store's folder in the bucket, when `storage` is
    one) a store another node built is copied from there instead, and one built here is
    uploaded there (meta.json last)."""
    if _complete(directory):
        return ArrayStore(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(directory):
            return ArrayStore(directory)
        if remote is not None and _pull(remote, directory):
            log.info("cache: copied %s from %s", directory.name, remote)
            return ArrayStore(directory)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
        try:
            t0 = time.time()
            meta = build(tmp)
            meta["build_s"] = round(time.time() - t0, 3)
            meta["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            atomic_write_json(tmp / "meta.json", meta)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if remote is not None:
            try:
                publish_dir(directory, remote, "meta.json")
            except OSError as e:  # the other nodes build their own copy
                log.warning("cache: could not upload %s to %s: %s", directory.name, remote, e)
    log.info("cache: built %s in %.1fs", directory, ArrayStore(directory).meta["build_s"])
    return ArrayStore(directory)


def _pull(remote: Location, directory: Path) -> bool:
    try:
        return pull_dir(remote, directory, "meta.json")
    except OSError as e:  # unreachable now: build it here instead
        log.warning("cache: could not copy %s from %s: %s", directory.name, remote, e)
        return False


class _Decode(torch.utils.data.Dataset):
    """(i, image i of a split read exactly as training reads it, whether it could be read)
    (`ImageTextDataset.load_uint8`; an unreadable image gives a blank one and False, and
    the trials then skip it as they would when decoding): resized for the model (HWC
    uint8), or with `as_inputs` the vision tower's inputs (`transform.inputs`)."""

    def __init__(self, listing: SplitListing, transform: D.Transform,
                 as_inputs: bool = False) -> None:
        self.ds = D.ImageTextDataset(listing.samples, [], transform, ["{}"], "templates", 0,
                                     reader=listing.reader)
        self.transform, self.as_inputs = transform, as_inputs

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, Any, bool]:
        arr = self.ds.load_uint8(i)
        ok = arr is not None
        if not ok:
            arr = self.transform.blank()
        if self.as_inputs:
            return i, self.transform.inputs(arr), ok
        return i, np.require(arr, requirements=["C", "W"]), ok  # torch wants writable


class _StreamDecode(torch.utils.data.IterableDataset):
    """`_Decode` of a streamed format (WebDataset): each DataLoader worker reads its
    contiguous share of the split's shards front to back (`D.StreamPlan` in order)."""

    def __init__(self, decode: _Decode, plan: D.StreamPlan) -> None:
        self.decode, self.plan = decode, plan

    def __iter__(self) -> Iterator[tuple[int, Any, bool]]:
        info = torch.utils.data.get_worker_info()
        ds = self.decode.ds
        for slot in [info.id] if info is not None else range(self.plan.slots):
            batches, stretch = self.plan.slot_batches(slot)
            for _, idx, images in read_batches(ds.reader, ds.samples, batches, stretch):
                with ds.prefetched(images):
                    yield from (self.decode[i] for i in idx)


def _decoded(listing: SplitListing, transform: D.Transform, batch_size: int,
             num_workers: int, as_inputs: bool = False
             ) -> Iterator[tuple[torch.Tensor, Any, torch.Tensor]]:
    """Batches (row indices [b]; uint8 [b, H, W, 3], or with `as_inputs` the vision
    tower's inputs by name; ok [b]); one image per batch when their shapes differ
    (shortest-edge resize without a crop; NaFlex inputs are padded to one shape). A
    streamed format's rows come in the order its shards are read."""
    fixed = transform.output_size is not None or (as_inputs and isinstance(transform,
                                                                           D.PatchTransform))
    bs = batch_size if fixed else 1
    decode = _Decode(listing, transform, as_inputs)
    if not decode.ds.streamed:
        yield from torch.utils.data.DataLoader(decode, batch_size=bs, num_workers=num_workers)
        return
    plan = D.StreamPlan(listing.samples, bs, train=False)
    plan.workers = num_workers
    yield from torch.utils.data.DataLoader(_StreamDecode(decode, plan), batch_size=bs,
                                           num_workers=num_workers)


def _write_rows(tmp: Path, n: int,
                batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
                dtype: Any, empty_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Write (row indices, rows, ok) batches into tmp/data.npy (allocated at the first
    batch) and tmp/ok.npy; returns the array's shape. A row no batch wrote stays zeros,
    not ok."""
    out, ok_all = None, np.zeros(n, dtype=bool)
    for index, rows, ok in batches:
        if out is None:
            out = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=dtype,
                                            shape=(n, *rows.shape[1:]))
        out[index] = rows
        ok_all[index] = ok
    if out is None:
        out = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=dtype,
                                        shape=(0, *empty_shape))
    out.flush()
    shape = tuple(out.shape)
    del out
    np.save(tmp / "ok.npy", ok_all)
    return shape


def ensure_image_cache(root: Path, listing: SplitListing, transform: D.Transform,
                       batch_size: int = 64, num_workers: int = 0,
                       remote: Location | None = None) -> ArrayStore:
    """The decode-once uint8 store of a split, built if absent (or copied from `remote`,
    the bucket's counterpart of `root`); images of one output size only: not SigLIP 2
    NaFlex, whose resized images keep their aspect ratio."""
    if transform.output_size is None:
        raise ValueError("data.cache_images: the model's images have no fixed size "
                         f"({type(transform).__name__}); set data.cache_images: false")
    key = image_key(transform, listing)

    def build(tmp: Path) -> dict[str, Any]:
        h, w = transform.output_size
        shape = _write_rows(tmp, len(listing.paths),
                            ((i.numpy(), u8.numpy(), ok.numpy()) for i, u8, ok in
                             _decoded(listing, transform, batch_size, num_workers)),
                            np.uint8, (h, w, 3))
        return {"kind": "images", "key": key, "n": len(listing.paths), "shape": shape,
                "split": listing.split, "root": listing.root,
                "transform": transform_settings(transform)}

    return ensure_store(root / "images" / key, build,
                        remote / "images" / key if remote is not None else None)


@torch.no_grad()
def ensure_feature_cache(root: Path, listing: SplitListing, transform: D.Transform,
                         enc: Any, checkpoint: dict[str, Any], precision: str,
                         device: torch.device, batch_size: int = 256,
                         num_workers: int = 0, remote: Location | None = None) -> ArrayStore:
    """The frozen-tower feature store of a split, built with `enc` (a `DualEncoder` whose
    vision tower is the checkpoint's, frozen) if absent (or copied from `remote`, the
    bucket's counterpart of `root`)."""
    key = feature_key(checkpoint, transform, listing, precision)
    autocast = autocast_for(precision, device)

    def embed() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        was_training = enc.training
        enc.eval()
        try:
            for index, inputs, ok in _decoded(listing, transform, batch_size, num_workers,
                                              True):
                inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
                with autocast():
                    e = enc.encode_image(**inputs)
                yield index.numpy(), e.float().cpu().numpy(), ok.numpy()
        finally:
            enc.train(was_training)

    def build(tmp: Path) -> dict[str, Any]:
        shape = _write_rows(tmp, len(listing.paths), embed(), np.float32, (0,))
        return {"kind": "features", "key": key, "n": len(listing.paths), "shape": shape,
                "split": listing.split, "root": listing.root, "checkpoint": checkpoint,
                "precision": precision, "device": str(device),
                "transform": transform_settings(transform)}

    return ensure_store(root / "features" / key, build,
                        remote / "features" / key if remote is not None else None)


# --------------------------------------------------------------------------- datasets


class CachedDataset(D.ImageTextDataset):
    """`base` (an `ImageTextDataset`: same samples, texts, indexing by `(index, epoch)`,
    normalisation and substitution of unreadable images) with each image read from a
    decode-once store row (uint8 [H, W, 3]) instead of decoded: `rows[i]` is sample i's row.
    A row whose image did not decode when the store was built counts as unreadable."""

    def __init__(self, base: D.ImageTextDataset, store: ArrayStore, rows: np.ndarray) -> None:
        self.__dict__.update(base.__dict__)  # whatever fields the base dataset has
        self.store, self.rows = store, rows

    @property
    def streamed(self) -> bool:
        return False  # rows of a store, read by index whatever the dataset's format

    def load_uint8(self, index: int) -> np.ndarray | None:
        r = int(self.rows[index])
        if not self.store.ok[r]:
            return None  # logged when the store was built
        # One row out of the memory map, copied (torch refuses read-only arrays).
        return np.array(self.store.array[r])


class FeatureDataset(CachedDataset):
    """A `CachedDataset` over a feature store: item `pixel_values` is the image's cached
    embedding [d] (float32, already normalised), passed through as it is."""

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        used, row, bad = self._readable(index)
        return self._item(index, epoch, used,
                          None if row is None else {"pixel_values": torch.from_numpy(row)}, bad)

    def __getitems__(self, keys: list[Any]) -> list[dict[str, Any]]:
        return [self[k] for k in keys]


@dataclass
class EmbedsCollate:
    """`base` collate (tokenise, stack) of a feature-cached dataset: the stacked rows are
    the batch's `image_embeds` [b, d], and `pixel_values` is None (the vision tower is
    skipped)."""

    base: Any

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        out = self.base(items)
        if out.get("size"):
            out["image_embeds"] = out.pop("pixel_values")
            out["pixel_values"] = None
        return out


# --------------------------------------------------------------------------- trial wiring


@dataclass
class TrialInputs:
    """What a trial trains and evaluates on, with or without a cache.

    `train`/`collate`: the training dataset and its collate; `wrap_val`: turns the val
    `ImageTextDataset` into its cached form (identity without an image cache);
    `val_images`: with the feature cache, this rank's val embeddings on the device, for
    `Evaluator.images`; `kind`: "features", "images" or "none"."""

    train: D.ImageTextDataset
    collate: Any
    wrap_val: Callable[[D.ImageTextDataset], D.ImageTextDataset] = lambda ds: ds
    val_images: ValImages | None = None
    kind: str = "none"
    stores: dict[str, str] = dataclasses.field(default_factory=dict)


def uses_feature_cache(cfg: Any) -> bool:
    return bool(cfg.freeze_vision and getattr(cfg.data, "cache_features", False)
                and getattr(cfg.data, "augment", "none") == "none")


def trial_inputs(cfg: Any, ctx: Any, td: D.TrialData, enc: Any, transform: D.Transform,
                 collate: Any, precision: str, agree: Agreement | None = None,
                 num_workers: int = 0) -> TrialInputs:
    """The trial's datasets, reading the stores the trial's config asks for (built here if
    the pre-trial tasks did not). Falls back to decoding, with a warning, where the data
    cannot be cached (not an image-folder dataset, samples outside the scanned split): on
    every rank when one rank cannot (`agree`), so that all of them train on the same inputs.

    Every rank opens the stores itself. A store that is missing is built by whichever rank
    takes its file lock first (`ensure_store`); the others wait on the lock, a file, not in
    a collective, so a build of any length never meets the process group's timeout (30
    minutes on NCCL), and they then read what it wrote (or build their own copy where the
    storage is not shared between machines)."""
    plain = TrialInputs(td.train, collate)
    feats = uses_feature_cache(cfg)
    if not (feats or cfg.data.cache_images):
        return plain
    agree = agree or Agreement()
    root = cache_root(cfg.data, ctx.trial_dir)
    remote = remote_cache(getattr(ctx, "remote", None))
    t0 = time.time()
    try:
        dataset = D.dataset_of(cfg.data, D.data_root(cfg.data, ctx.cache_dir))
        listings = {s: SplitListing.scan(dataset, s) for s in SPLITS}
        train_rows = listings["train"].rows(td.train.samples)
        val_rows = listings["val"].rows(td.val_samples)
        mapped = True
    except (KeyError, OSError, D.DataError) as e:
        log.warning("cache: cannot map the trial's images to the cache (%s); decoding", e)
        mapped = False
    if not agree.all(mapped):
        if mapped:
            log.warning("cache: another rank cannot read the cache; decoding on every rank")
        return plain
    if feats:
        ckpt = checkpoint_fingerprint(cfg.model_path)
        stores = {s: ensure_feature_cache(root, listings[s], transform, enc, ckpt, precision,
                                          ctx.device, cfg.eval.batch_size, num_workers, remote)
                  for s in SPLITS}
        mine = np.arange(ctx.rank, len(td.val_samples), ctx.world_size)
        rows = val_rows[mine]
        ok = stores["val"].ok[rows]
        emb = torch.from_numpy(np.asarray(stores["val"].array[rows[ok]], dtype=np.float32))
        labels = torch.tensor([td.val_samples[i].label for i in mine[ok]], dtype=torch.long)
        val = ValImages(emb.to(ctx.device), labels.to(ctx.device),
                        torch.from_numpy(mine[ok]).to(ctx.device), int((~ok).sum()))
        out = TrialInputs(FeatureDataset(td.train, stores["train"], train_rows),
                          EmbedsCollate(collate), val_images=val, kind="features")
    else:
        stores = {s: ensure_image_cache(root, listings[s], transform, cfg.eval.batch_size,
                                        num_workers, remote) for s in SPLITS}
        val_store = stores["val"]

        def wrap_val(ds: D.ImageTextDataset) -> D.ImageTextDataset:
            return CachedDataset(ds, val_store, val_rows)

        out = TrialInputs(CachedDataset(td.train, stores["train"], train_rows), collate,
                          wrap_val=wrap_val, kind="images")
    out.stores = {s: str(st.dir) for s, st in stores.items()}
    log.debug("cache: %s of %s ready in %.1fs (%s)", out.kind, cfg.trial_id, time.time() - t0,
             ", ".join(f"{s}={Path(d).name}" for s, d in out.stores.items()))
    return out


# --------------------------------------------------------------------------- pre-trial jobs


@dataclass(frozen=True)
class CacheJob:
    """Build the stores of both splits of one (kind, model, data, precision)."""

    kind: str  # "features" | "images"
    model_json: str
    model_path: str  # the checkpoint directory (sweeper.prepare)
    data_json: str
    precision: str
    root: str
    cache_dir: str | None
    batch_size: int
    trial_id: str  # a trial that needs it (for messages)
    remote: Location | None = None  # <storage>/.cache when storage is a bucket


def cache_jobs(spec: SweepSpec, storage: str | Path, model_paths: dict[str, str],
               cache_dir: str | None = None, remote: Location | None = None
               ) -> list[CacheJob]:
    """The distinct stores the sweep's trials read, one job each (deduplicated);
    `model_paths` as `sweeper.prepare.model_paths` gives them. `storage`: a local path
    (the node-local mirror of a bucket, whose `.cache` is `remote`)."""
    jobs: dict[tuple[str, ...], CacheJob] = {}
    # Every combination of the axes a store depends on (None: one of them is drawn from a
    # range; the trials then build what they need).
    store_axes = ("train.precision", "eval.batch_size")
    configs = covering_configs(spec, lambda k: model_axis(k) or k.startswith("data.")
                               or k in store_axes, model_paths)
    for t in configs or []:
        kind = "features" if uses_feature_cache(t) else "images" if t.data.cache_images \
            else None
        if kind is None:
            continue
        precision = t.train.precision if kind == "features" else "-"
        job = CacheJob(kind, t.model.model_dump_json(), str(t.model_path),
                       t.data.model_dump_json(), precision,
                       str(cache_root(t.data, storage=storage)), cache_dir,
                       t.eval.batch_size, t.trial_id, remote)
        jobs.setdefault((kind, job.model_json, job.data_json, precision), job)
    return [j for j in jobs.values() if not _job_done(j)]


def _job_done(job: CacheJob) -> bool:
    marker = job_marker(job)
    if marker.is_file():
        return True
    return job.remote is not None and (job.remote / "jobs" / marker.name).is_file()


def job_marker(job: CacheJob) -> Path:
    """`<root>/jobs/<key>.json`, written when a job has built its stores. The key covers
    the job and what its stores' keys depend on that can be read without loading the model
    (the checkpoint's files, the splits' files), so a sweep whose stores are all built
    starts no task, and a changed checkpoint or dataset starts one again."""
    data_spec = DataSpec.model_validate_json(job.data_json)
    dataset = D.dataset_of(data_spec, D.data_root(data_spec, job.cache_dir))
    key = _sha({"v": CACHE_VERSION, "job": [job.kind, job.model_json, job.data_json,
                                            job.precision, job.batch_size],
                "checkpoint": checkpoint_fingerprint(job.model_path),
                "files": {s: dataset.fingerprint(s) for s in SPLITS}})[:24]
    return Path(job.root) / "jobs" / f"{key}.json"


def run_job(job: CacheJob) -> dict[str, Any]:
    """Build a job's stores (on the GPU when this process has one); returns their keys."""
    t0 = time.time()
    model_spec = ModelSpec.model_validate_json(job.model_json)
    data_spec = DataSpec.model_validate_json(job.data_json)
    dataset = D.dataset_of(data_spec, D.data_root(data_spec, job.cache_dir))
    listings = {s: SplitListing.scan(dataset, s) for s in SPLITS}
    root = Path(job.root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_pretrained(job.model_path, model_spec.trust_remote_code)
    transform = D.image_transform(processor.image_processor, model_spec.max_num_patches)
    nw = D.loader_workers(data_spec.num_workers, 1.0)  # the task's one CPU
    if job.kind == "features":
        precision = resolve_precision(job.precision, device)
        ckpt = checkpoint_fingerprint(job.model_path)
        enc = DualEncoder(model, "softmax", freeze_vision=True).to(device)
        stores = {s: ensure_feature_cache(root, listings[s], transform, enc, ckpt, precision,
                                          device, job.batch_size, nw, job.remote)
                  for s in SPLITS}
    else:
        stores = {s: ensure_image_cache(root, listings[s], transform, job.batch_size, nw,
                                        job.remote) for s in SPLITS}
    out = {"kind": job.kind, "stores": {s: str(st.dir) for s, st in stores.items()},
           "seconds": time.time() - t0, "device": str(device), "trial": job.trial_id}
    marker = job_marker(job)
    atomic_write_json(marker, out)
    if job.remote is not None:
        (job.remote / "jobs" / marker.name).write_json(out)
    return out
