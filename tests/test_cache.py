"""The shared caches (sweeper/cache.py): content keys, memory-mapped stores, a SigLiT trial
on cached features equal to one without, decode-once images bit-identical to decoding, and
augmentation refused with the feature cache."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper import cache as C
from sweeper import data as D
from sweeper.models import DualEncoder, load_pretrained
from sweeper.prepare import model_paths, resolve_checkpoint, with_model_path
from sweeper.spec import ModelSpec, SpecError, TinyModelSpec, validate
from sweeper.synthetic import generate
from sweeper.trials import resolve_trial
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import TINY, base_doc


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):
    spec = ModelSpec(pretrained="tiny", tiny=TinyModelSpec(**TINY))
    model, processor = load_pretrained(resolve_checkpoint(spec, cache_dir))
    return spec, model, processor


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    return generate(tmp_path / "data", n_classes=3, train_per_class=4, val_per_class=2,
                    image_size=20)


def _transform(processor) -> D.ImageTransform:
    return D.ImageTransform.from_processor(processor.image_processor)


def test_feature_key_changes_with_checkpoint_transform_and_files(tiny, cache_dir, data_root,
                                                                 tmp_path: Path) -> None:
    spec, _, processor = tiny
    tr = _transform(processor)
    ckpt = C.checkpoint_fingerprint(resolve_checkpoint(spec, cache_dir))
    listing = C.SplitListing.scan(data_root, "train")
    key = C.feature_key(ckpt, tr, listing, "fp32")
    assert key == C.feature_key(C.checkpoint_fingerprint(resolve_checkpoint(spec, cache_dir)),
                                tr, C.SplitListing.scan(data_root, "train"), "fp32")
    # Another checkpoint: a copy of the model whose config differs.
    other = tmp_path / "other-model"
    src = Path(resolve_checkpoint(spec, cache_dir))
    other.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    cfg["projection_note"] = "changed"
    (other / "config.json").write_text(json.dumps(cfg))
    assert C.feature_key(C.checkpoint_fingerprint(str(other)), tr, listing, "fp32") != key
    # Another transform, precision or split.
    assert C.feature_key(ckpt, dataclasses.replace(tr, height=tr.height + 1), listing,
                         "fp32") != key
    assert C.feature_key(ckpt, tr, listing, "bf16") != key
    assert C.feature_key(ckpt, tr, C.SplitListing.scan(data_root, "val"), "fp32") != key
    # A file touched (mtime), rewritten (size), added.
    first = Path(listing.paths[0])
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = C.SplitListing.scan(data_root, "train")
    assert C.feature_key(ckpt, tr, touched, "fp32") != key
    first.write_bytes(first.read_bytes() + b"\0")
    assert C.feature_key(ckpt, tr, C.SplitListing.scan(data_root, "train"), "fp32") not in (
        key, C.feature_key(ckpt, tr, touched, "fp32"))
    (first.parent / "extra.png").write_bytes(first.read_bytes())
    assert len(C.SplitListing.scan(data_root, "train").samples) == len(listing.samples) + 1
    assert C.image_key(tr, listing) != C.image_key(tr, C.SplitListing.scan(data_root, "train"))


def test_stores_are_memory_mapped_and_pickle_as_paths(tiny, data_root, tmp_path) -> None:
    _, model, processor = tiny
    tr = _transform(processor)
    listing = C.SplitListing.scan(data_root, "train")
    store = C.ensure_image_cache(tmp_path / "c", listing, tr, batch_size=5)
    assert isinstance(store.array, np.memmap) and store.array.shape == (12, 16, 16, 3)
    assert store.array.dtype == np.uint8 and not store.array.flags.writeable
    base = D.ImageTextDataset(listing.samples, ["a", "b", "c"], tr, ["{}"], "templates", 0)
    ds = C.CachedDataset(base, store, listing.rows(listing.samples))
    blob = pickle.dumps(ds)
    assert bytes(store.array[3]) not in blob  # the pixels do not travel with the dataset
    again = pickle.loads(blob)
    assert again.store._data is None and isinstance(again.store.array, np.memmap)
    assert Path(again.store.array.filename) == store.dir / "data.npy"
    # Read through DataLoader worker processes: each maps the same file.
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         collate_fn=lambda items: items)
    got = [it["index"] for batch in loader for it in batch]
    assert sorted(got) == list(range(12))
    # Built once: a second call (another trial) finds it.
    assert C.ensure_image_cache(tmp_path / "c", listing, tr).meta["built_at"] == \
        store.meta["built_at"]
    enc = DualEncoder(model, "sigmoid", freeze_vision=True)
    feats = C.ensure_feature_cache(tmp_path / "c", listing, tr, enc, {"id": "x"}, "fp32",
                                   torch.device("cpu"), batch_size=5)
    assert isinstance(feats.array, np.memmap) and feats.array.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats.array, axis=1), 1, atol=1e-5)  # normalised


def test_image_cache_is_bit_identical_to_decoding(tiny, data_root, tmp_path) -> None:
    _, _, processor = tiny
    tr = _transform(processor)
    listing = C.SplitListing.scan(data_root, "train")
    bad = Path(listing.paths[5])
    bad.write_bytes(b"not an image")  # an unreadable file: skipped on both paths
    listing = C.SplitListing.scan(data_root, "train")
    store = C.ensure_image_cache(tmp_path / "c", listing, tr, batch_size=5)
    base = D.ImageTextDataset(listing.samples, ["a", "b", "c"], tr, ["a {}"], "templates", 0)
    ds = C.CachedDataset(base, store, listing.rows(listing.samples))
    assert not store.ok[5] and store.ok.sum() == 11
    for i in range(len(base)):
        ref = base.load_uint8(i)
        got = ds.load_uint8(i)
        if i == 5:
            assert ref is None and got is None
            continue
        assert got.dtype == np.uint8 and np.array_equal(got, ref)
        a, b = base[(i, 1)], ds[(i, 1)]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["text"] == b["text"]
    keys = [(i, 0) for i in range(len(base))]
    collate = D.Collate(processor.tokenizer, 16)
    a, b = collate(base.__getitems__(keys)), collate(ds.__getitems__(keys))
    assert a["skipped"] == b["skipped"] == 1
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert torch.equal(a["input_ids"], b["input_ids"])


def _trial(tmp_path: Path, sweeper_cache: Path, variant: str, name: str,
           **data: object) -> tuple[dict, list[dict]]:
    doc = base_doc(tmp_path)
    doc["train"]["epochs"] = 2
    doc["data"].update(data)
    cfg = resolve_trial(validate(doc), {"variant": variant, "text_source": "templates",
                                        "batch_size": 16, "n_train_classes": 4, "seed": 0})
    reports: list[dict] = []
    ctx = WorkerContext(trial_dir=tmp_path / name, cache_dir=sweeper_cache,
                        report=lambda m, ck: reports.append(m))
    return run_trial(with_model_path(cfg, sweeper_cache), ctx), reports


KEYS = ("step", "train_loss", "val_top1", "val_top5", "logit_scale", "logit_bias")


def test_siglit_on_cached_features_equals_uncached(tmp_path: Path, cache_dir: Path) -> None:
    store = tmp_path / "store"
    _, plain = _trial(tmp_path, cache_dir, "siglit", "plain", cache_features=False,
                      cache_dir=str(store))
    assert not (store / "features").exists()
    final, cached = _trial(tmp_path, cache_dir, "siglit", "cached", cache_features=True,
                           cache_dir=str(store))
    assert final["status"] == "terminated"
    metas = [json.loads(p.read_text()) for p in (store / "features").glob("*/meta.json")]
    assert sorted(m["split"] for m in metas) == ["train", "val"]
    assert [r["step"] for r in cached] == [r["step"] for r in plain] == [0, 3, 6]
    for a, b in zip(plain, cached, strict=True):
        for k in KEYS:
            if a[k] is None:
                assert b[k] is None
            else:
                assert b[k] == pytest.approx(a[k], abs=1e-4), k
    # A second trial (another seed's class subset) reuses the stores: nothing rebuilt.
    before = {p: p.stat().st_mtime_ns for p in store.rglob("data.npy")}
    _trial(tmp_path, cache_dir, "siglit", "again", cache_features=True, cache_dir=str(store))
    assert {p: p.stat().st_mtime_ns for p in store.rglob("data.npy")} == before


def test_siglip_on_decode_once_images_equals_decoding(tmp_path: Path, cache_dir: Path) -> None:
    store = tmp_path / "store"
    _, plain = _trial(tmp_path, cache_dir, "siglip", "plain", cache_images=False,
                      cache_dir=str(store))
    _, cached = _trial(tmp_path, cache_dir, "siglip", "cached", cache_images=True,
                       cache_dir=str(store))
    assert len(list((store / "images").glob("*/data.npy"))) == 2
    for a, b in zip(plain, cached, strict=True):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}  # the same pixels exactly


def test_cache_jobs_build_before_the_trials(tmp_path: Path, cache_dir: Path) -> None:
    doc = base_doc(tmp_path)
    doc["grid"]["variant"] = ["siglip", "siglit"]
    spec = validate(doc)
    paths = model_paths(spec, cache_dir)
    jobs = C.cache_jobs(spec, tmp_path / "results", paths, str(cache_dir))
    assert [j.kind for j in jobs] == ["features"]  # siglit only; siglip decodes
    assert jobs[0].root == str((tmp_path / "results" / ".cache").resolve())
    out = C.run_job(jobs[0])
    assert sorted(out["stores"]) == ["train", "val"]
    assert C.cache_jobs(spec, tmp_path / "results", paths, str(cache_dir)) == []  # built
    # The worker of a trial under <storage>/<name>/trials/<id> finds them there.
    cfg = resolve_trial(spec, {"variant": "siglit", "text_source": "templates",
                               "batch_size": 16, "n_train_classes": 4, "seed": 0})
    tdir = tmp_path / "results" / "t" / "trials" / cfg.trial_id
    assert C.cache_root(cfg.data, tdir) == Path(jobs[0].root)
    before = {p: p.stat().st_mtime_ns for p in Path(jobs[0].root).rglob("data.npy")}
    run_trial(with_model_path(cfg, cache_dir), WorkerContext(trial_dir=tdir, cache_dir=cache_dir))
    assert {p: p.stat().st_mtime_ns for p in Path(jobs[0].root).rglob("data.npy")} == before


def test_cached_variant_with_augmentation_is_refused(tmp_path: Path) -> None:
    doc = base_doc(tmp_path)
    doc["grid"]["variant"] = ["siglip", "siglit"]
    doc["data"]["augment"] = "flip"
    with pytest.raises(SpecError) as err:
        validate(doc)
    msg = str(err.value)
    assert msg.startswith("data.augment: 'flip' cannot be combined with data.cache_features")
    assert "\n" not in msg and "siglit" in msg
    doc["data"]["cache_features"] = False  # decoding every epoch: augmentation is fine
    validate(doc)
    doc["data"]["cache_features"] = True
    doc["grid"]["variant"] = ["siglip"]  # no frozen tower: nothing cached
    validate(doc)
    doc["grid"]["variant"] = ["siglit"]
    doc["data"]["augment"] = "none"
    doc["grid"]["data.augment"] = ["none", "flip"]
    with pytest.raises(SpecError, match=r"^grid\.data\.augment\[1\]: 'flip' cannot"):
        validate(doc)


def test_flip_is_seeded_per_sample() -> None:
    a, b = D.flip_mask(0, 1, 100), D.flip_mask(0, 1, 100)
    assert torch.equal(a, b) and 20 < int(a.sum()) < 80
    assert not torch.equal(a, D.flip_mask(0, 2, 100))
    px = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)

    class Loader(list):
        dataset = range(100)

    mask = D.flip_mask(5, 0, 100)
    idx = torch.tensor([int(mask.nonzero()[0]), int((~mask).nonzero()[0])])
    out = next(iter(D.DeviceBatches(Loader([{"pixel_values": px, "index": idx}]),
                                    torch.device("cpu"), augment="flip", seed=5)))
    assert torch.equal(out["pixel_values"][0], px[0].flip(-1))
    assert torch.equal(out["pixel_values"][1], px[1])
