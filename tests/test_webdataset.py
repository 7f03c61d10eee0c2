"""WebDataset shards and the one table of data formats: the registry (every format found
through it, nothing outside the formats' modules comparing `data.format` to a name), the
shard tool, the stream plan's exact global batches (every rank the same steps, no sample
twice in an epoch, a resume that skips exactly the batches done, DataLoader workers
included), faults in shards (a corrupt member, a truncated shard, a member over the size
bound read in pieces, a huge extended header), and in-process trials: the same steps and
samples as the same data in folders, and a trial killed mid-epoch resumed without seeing a
sample twice. Datasets in buckets are in test_data_buckets.py."""

from __future__ import annotations

import ast
import hashlib
import io
import logging
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from sweeper import data as D
from sweeper.data.formats import FORMATS
from sweeper.data.formats import webdataset as W
from sweeper.data.formats.base import Format
from sweeper.data.shard import main as shard_main
from sweeper.data.shard import write_shards
from sweeper.data.streaming import StreamPlan, buffer_shuffle
from sweeper.spec import DataSpec, SpecError, validate
from sweeper.synthetic import dataset_dir
from tests.conftest import SYNTH
from tests.test_data import TF, FakeTokenizer, jpeg_bytes, one_line

PKG = Path(__file__).resolve().parents[1] / "sweeper"


@pytest.fixture(scope="module")
def synth(cache_dir: Path) -> Path:
    """The conftest's synthetic folder dataset: 8 classes, 12 train and 6 val each."""
    return dataset_dir(**SYNTH, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def shards(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset as WebDataset shards of at most 20 samples."""
    out = tmp_path_factory.mktemp("wds")
    assert write_shards(synth, out, class_names="classes.json", captions="captions.jsonl",
                        maxcount=20) == {"train": 5, "val": 3}
    return out


def wds(root: Path, **kw: Any) -> D.Dataset:
    return D.open_dataset(root, "webdataset", "classes.json", spec=DataSpec(
        root=str(root), format="webdataset", class_names="classes.json", **kw))


# --------------------------------------------------------------------------- the registry


def _format_compares(path: Path) -> list[str]:
    """`x.format == "name"`, `getattr(x, "format", ...) != "name"`, `format in ("a", "b")`
    and the like: comparisons of a data format to a string constant."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def is_format(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "format":
            return not isinstance(node.value, ast.Constant)  # "...".format is a call
        if isinstance(node, ast.Name) and node.id in ("format", "fmt"):
            return True
        return (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr"
                and any(isinstance(a, ast.Constant) and a.value == "format" for a in node.args))

    def has_str(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Constant) and isinstance(n.value, str)
                   for n in ast.walk(node))

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_format(s) for s in sides) and any(has_str(s) for s in sides
                                                        if not is_format(s)):
                out.append(f"{path.name}:{node.lineno}")
    return out


def test_registry_finds_the_formats_and_nothing_compares_format_names(tmp_path: Path) -> None:
    assert set(FORMATS) == {"folder", "parquet", "webdataset"}
    for name, f in FORMATS.items():
        assert isinstance(f, Format) and f.name == name
        for method in ("scan", "split_files", "fingerprint", "reader"):
            assert getattr(type(f), method) is not getattr(Format, method) or \
                method == "fingerprint", (name, method)
    assert FORMATS["webdataset"].reader(None, DataSpec(root="x")).streamed
    assert not FORMATS["folder"].reader(None, DataSpec(root="x")).streamed
    # The spec's validation reads the table: names, and the keys only a format reads.
    with pytest.raises(SpecError, match=r"^data\.format: 'zip' is not one of folder, "
                                        r"parquet, webdataset$"):
        validate({**_doc(), "data": {"root": "/x", "format": "zip"}})
    with pytest.raises(SpecError, match=r"train_shards is read by data\.format webdataset only"):
        validate({**_doc(), "data": {"root": "/x", "train_shards": "a-{0..3}.tar"}})
    # Outside the formats' modules, no code compares a format to a name.
    found = [hit for p in PKG.rglob("*.py") if "formats" not in p.parts
             for hit in _format_compares(p)]
    assert found == []
    # The check has teeth.
    probe = tmp_path / "probe.py"
    probe.write_text("def f(d):\n    return d.format == 'parquet' or (\n"
                     "        getattr(d, 'format', 'folder') != 'folder')\n")
    assert _format_compares(probe) == ["probe.py:2", "probe.py:3"]


def _doc() -> dict:
    from tests.conftest import base_doc

    return base_doc(Path("/tmp"))


# --------------------------------------------------------------------------- shard lists


def test_brace_expansion_as_open_clip_writes_it() -> None:
    assert W.expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert W.expand_braces("{x,y}/s-{8..10}.tar") == ["x/s-8.tar", "x/s-9.tar", "x/s-10.tar",
                                                       "y/s-8.tar", "y/s-9.tar", "y/s-10.tar"]
    assert W.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="more than"):
        W.expand_braces("{0..99999999}.tar")
    with pytest.raises(ValueError, match="counts down"):
        W.expand_braces("{5..1}.tar")


# --------------------------------------------------------------------------- the shard tool


def test_shards_hold_the_folder_dataset(synth: Path, shards: Path, tmp_path: Path) -> None:
    folder = D.open_dataset(synth, "folder", "classes.json", "captions.jsonl").load()
    sharded = wds(shards).load()
    for f, s in zip(folder, sharded, strict=True):
        assert (s.wnids, s.names) == (f.wnids, f.names)
        assert sorted((x.label, x.captions) for x in s.samples) == \
            sorted((x.label, x.captions) for x in f.samples)
        assert s.skipped == 0
    # The samples come shuffled into the shards: the first shard holds many classes.
    first = [x.label for x in sharded[0].samples if x.path.endswith("train-000000.tar")]
    assert len(first) == 20 and len(set(first)) >= 5
    # The same input and seed give the same bytes (the command line's own output).
    assert shard_main([str(synth), str(tmp_path / "again"), "--class-names", "classes.json",
                       "--captions", "captions.jsonl", "--maxcount", "20"]) == 0

    def digest(root: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.tar")))
                              ).hexdigest()

    assert digest(tmp_path / "again") == digest(shards)
    assert shard_main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------- the plan


class _S:
    """A sample as the plan sees it: the shard it is in."""

    def __init__(self, path: str) -> None:
        self.path = path


def _samples(sizes: list[int]) -> list[_S]:
    return [_S(f"shard{k}") for k, n in enumerate(sizes) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_plan_gives_exact_global_batches(workers: int) -> None:
    samples = _samples([7, 20, 3, 15, 11, 9])  # 65 samples, uneven shards
    world, batch = 2, 8
    plans = [StreamPlan(samples, batch, r, world, seed=3, shuffle_buffer=10)
             for r in range(world)]
    for p in plans:
        p.workers = workers
    for epoch in (0, 1):
        per_rank = []
        for p in plans:
            p.epoch = epoch
            batches = [[i for i, _ in b] for b in p]
            assert len(batches) == 65 // 8 == D.steps_per_epoch(65, batch, world)
            assert all(len(b) == batch // world for b in batches)
            per_rank.append(batches)
        seen = [i for r in per_rank for b in r for i in b]
        assert len(seen) == len(set(seen)) == 8 * 8  # no sample twice in the epoch
    # A function of (seed, epoch): the same again, another order next epoch.
    again = StreamPlan(samples, batch, 0, world, seed=3, shuffle_buffer=10)
    again.workers = workers
    plans[0].epoch = again.epoch = 1
    assert list(again) == list(plans[0])
    plans[0].epoch = 0
    assert [b for b in plans[0]] != list(again)
    # A resume after k batches gives exactly the batches that were still to come.
    for k in range(len(again)):
        again.skip_batches = 0
        full = list(again)
        again.skip_batches = k
        assert list(again) == full[k:] and len(again) == len(full) - k


def test_plan_small_split_and_evaluation() -> None:
    samples = _samples([3, 2])
    tiny = StreamPlan(samples, 8, 0, 2)  # fewer samples than a batch: one of 2 per rank
    assert [len(b) for b in tiny] == [2]
    ev = [StreamPlan(_samples([7, 20, 3]), 4, r, 2, train=False) for r in range(2)]
    for p in ev:
        p.workers = 2
    got = [i for p in ev for b in p for i, _ in b]
    assert sorted(got) == list(range(30))  # every sample once, in shard order per rank
    assert [[i for i, _ in b] for b in ev[0]][:2] == [[0, 1, 2, 3], [8, 9, 10, 11]]


def test_shuffle_buffer_is_bounded() -> None:
    items = list(range(200))
    out = buffer_shuffle(items, 16, random.Random(0))
    assert sorted(out) == items and out != items
    # An item leaves the buffer at most `size` positions before it could have entered.
    assert all(x <= pos + 16 for pos, x in enumerate(out))
    assert buffer_shuffle(items, 1, random.Random(0)) == items


def test_loader_workers_deliver_the_plan(shards: Path) -> None:
    """Two DataLoader worker processes, persistent across epochs: the batches come in the
    plan's order, and a resume mid-epoch (skip_batches, seen by the running workers
    through shared memory) starts exactly where it should."""
    train, _ = wds(shards).load()
    ds = D.ImageTextDataset(train.samples, train.names, TF, ["{}"], "templates", 0,
                            reader=wds(shards).reader())
    plan = D.batch_plan(ds, 16, seed=1, shuffle_buffer=8)
    assert isinstance(plan, StreamPlan)
    loader = D.make_loader(ds, plan, D.Collate(FakeTokenizer(), 8), 2)
    assert plan.workers == 2
    for epoch, skip in ((0, 0), (1, 0), (1, 2)):
        plan.epoch, plan.skip_batches = epoch, skip
        want = [[i for i, _ in b] for b in plan]
        got = [b["index"].tolist() for b in loader]
        assert got == want and len(got) == 96 // 16 - skip


# --------------------------------------------------------------------------- faults


def _tar(path: Path, members: list[tuple[str, bytes]], pax: dict | None = None) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax and name in pax:
                info.pax_headers = pax[name]
            t.addfile(info, io.BytesIO(data))


def _sample(key: str, label: int | None, image: bytes | None, caption: str = "") -> list:
    out = [(f"{key}.jpg", image)] if image is not None else []
    out += [(f"{key}.cls", str(label).encode())] if label is not None else []
    return out + ([(f"{key}.txt", caption.encode())] if caption else [])


def test_faults_in_shards_are_counted_not_fatal(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="sweeper.data")
    root = tmp_path / "wds"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "classes.json").write_text('{"0": ["n0", "zero"], "1": ["n1", "one"]}')
    img = jpeg_bytes((200, 10, 10))
    big = jpeg_bytes((10, 200, 10), size=(900, 900), fmt="PNG")  # about 1.7 MB
    assert len(big) > 1.5 * 2**20
    _tar(root / "train" / "a.tar", [*_sample("a0", 0, img, "red"), *_sample("a1", 1, b"junk"),
                                    *_sample("a2", None, img), *_sample("a3", 1, big),
                                    *_sample("a4", 0, img)])
    _tar(root / "train" / "b.tar", [m for k in range(6) for m in _sample(f"b{k}", k % 2, img)])
    data = (root / "train" / "b.tar").read_bytes()
    (root / "train" / "b.tar").write_bytes(data[:len(data) * 3 // 5])  # cut mid-way
    _tar(root / "val" / "v.tar", _sample("v0", 0, img) + _sample("v1", 1, img))
    train, _ = wds(root, max_member_mb=1).load()
    # Left out at the scan: the sample without a label, the one over 1 MB, the one the
    # truncation cut; b.tar's 4 samples before the cut are used (its 6th is lost).
    assert train.skipped == 3
    assert [Path(s.path).name for s in train.samples] == ["a.tar"] * 3 + ["b.tar"] * 4
    cut = [r.getMessage() for r in caplog.records if "truncated or corrupt shard" in
           r.getMessage()]
    assert len(cut) == 1 and "b.tar" in cut[0]
    wds(root, max_member_mb=1).load()  # read again: the truncated shard is not logged again
    assert len([r for r in caplog.records if "truncated" in r.getMessage()]) == 1
    # Reading: the junk image is skipped and counted, the rest decoded; the batch is
    # smaller (the ranks agree on the smallest), nothing raises.
    ds = D.ImageTextDataset(train.samples, train.names, TF, ["{}"], "templates", 0,
                            substitute_bad=True, reader=wds(root, max_member_mb=1).reader())
    plan = StreamPlan(train.samples, 6, train=False)  # a.tar's 3, then b.tar's
    batch = next(iter(D.make_loader(ds, plan, D.Collate(FakeTokenizer(), 8), 0)))
    assert batch["size"] == 5 and batch["skipped"] == 1
    # An image member over the bound is skipped in reads of at most the bound (never in
    # memory whole): while indexing, and when a reader meets it.
    reads: list[int] = []
    whole = wds(root, max_member_mb=1)
    a_tar = whole.format.split_files(whole.files, "train", whole.spec)[0]
    idx = W.index_shard(_Spy(reads), a_tar, 2**20)
    assert len(idx["samples"]) == 5 and max(reads) <= 2**20
    offsets = [s[1] for s in idx["samples"]]
    a3 = D.Sample(a_tar.path, 1, (), (offsets[3], offsets[4] - offsets[3]))
    reads.clear()
    assert list(W.WebDatasetReader(_Spy(reads), 1).stream([a3])) == [(0, None)]
    assert 0 < max(reads) <= 2**20


class _Spy:
    """Local files whose reads are recorded (their sizes)."""

    remote = False

    def __init__(self, reads: list[int]) -> None:
        self.reads = reads

    def uri(self, path: str) -> str:
        return path

    def open(self, path: str) -> Any:
        f = open(path, "rb")  # noqa: SIM115 (closed by the reader)
        reads = self.reads

        class File(io.RawIOBase):
            def read(self, n: int = -1) -> bytes:
                data = f.read(n)
                reads.append(len(data))
                return data

            def seek(self, pos: int, whence: int = 0) -> int:
                return f.seek(pos, whence)

            def close(self) -> None:
                f.close()

        return File()


def test_huge_extended_header_ends_the_shard(tmp_path: Path) -> None:
    """tarfile reads a pax header into memory whole: one over 1 MiB is refused instead,
    and the shard counts as corrupt from there."""
    root = tmp_path / "wds"
    (root / "train").mkdir(parents=True)
    img = jpeg_bytes((1, 2, 3))
    _tar(root / "train" / "a.tar", [*_sample("k0", 0, img), *_sample("k1", 0, img)],
         pax={"k1.jpg": {"comment": "x" * (2 << 20)}})
    spec = DataSpec(root=str(root), format="webdataset")
    files = D.open_dataset(root, "webdataset", spec=spec).files
    idx = W.index_shard(files, W.shard_entries(files, "train", spec)[0])
    assert [s[0] for s in idx["samples"]] == ["k0"]
    assert "extended header" in idx["truncated"]


def test_member_names_are_never_paths(tmp_path: Path) -> None:
    """Members named like paths out of the root (`..`, absolute) are keys: the shard is
    indexed and read, nothing lands on disk, and nothing in sweeper extracts a tar."""
    root = tmp_path / "wds"
    (root / "train").mkdir(parents=True)
    img = jpeg_bytes((9, 9, 9))
    escape = tmp_path / "escaped"
    _tar(root / "train" / "a.tar", [*_sample("../../escaped/k0", 0, img),
                                    *_sample(f"{escape}/k1", 0, img)])
    before = sorted(tmp_path.rglob("*"))
    spec = DataSpec(root=str(root), format="webdataset")
    files = D.open_dataset(root, "webdataset", spec=spec).files
    shard = W.shard_entries(files, "train", spec)[0]
    idx = W.index_shard(files, shard)
    assert [s[0] for s in idx["samples"]] == ["../../escaped/k0", f"{escape}/k1"]
    samples = [D.Sample(shard.path, 0, (), (o, n)) for _, o, n, *_ in idx["samples"]]
    assert [b for _, b in W.WebDatasetReader(files).stream(samples)] == [img, img]
    assert sorted(tmp_path.rglob("*")) == before and not escape.exists()
    calls = [n.func.attr for p in PKG.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert not {"extract", "extractall"} & set(calls)


def test_refusals_name_the_shard(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(D.DataError) as e:
        wds(shards, train_shards="train/train-{000000..000009}.tar").load()
    assert one_line(e) == (f"{shards / 'train' / 'train-000005.tar'}: shard named by "
                           "data.train_shards not found")
    assert len(wds(shards, train_shards="train/train-{000000..000001}.tar").load()[0]
               .samples) == 40
    empty = tmp_path / "empty"
    shutil.copytree(shards, empty)
    for f in (empty / "val").iterdir():
        f.unlink()
    with pytest.raises(D.DataError) as e:
        wds(empty).load()
    assert one_line(e) == f"{empty / 'val'}: no .tar shards"
    with pytest.raises(D.DataError) as e:
        wds(shards, val_shards="../elsewhere.tar").load()
    assert "not a path under data.root" in one_line(e)


# --------------------------------------------------------------------------- trials


def _trial(root: Path, fmt: str, tmp: Path, cache_dir: Path, seen: dict[int, list[int]],
           stop_at: int | None = None, resume: Path | None = None,
           every: int | None = None) -> tuple[dict, list[dict]]:
    """One in-process trial (2 epochs of 48 samples, batch 16, 2 DataLoader workers); the
    sample indices of each step go to `seen`; `stop_at`: the step at which its worker is
    killed (an exception out of the step)."""
    import sweeper.worker as worker
    from sweeper.prepare import with_model_path
    from sweeper.trials import resolve_trial
    from tests.conftest import base_doc

    doc = base_doc(tmp)
    doc["data"] = {"root": str(root), "format": fmt, "class_names": "classes.json",
                   "num_workers": 2, "shuffle_buffer": 8} if fmt == "webdataset" else \
        {"root": str(root), "class_names": "classes.json", "num_workers": 2}
    doc["train"]["epochs"] = 2
    if every:
        doc["eval"] = {"every_steps": every}
    cfg = resolve_trial(validate(doc), {"variant": "siglip", "text_source": "templates",
                                        "batch_size": 16, "n_train_classes": 4, "seed": 0})
    reports: list[dict] = []
    last = tmp / "last_ckpt"

    def report(metrics: dict, ckpt: Path | None) -> None:
        reports.append(metrics)
        if ckpt is not None:
            shutil.rmtree(last, ignore_errors=True)
            shutil.copytree(ckpt, last)

    real = worker.step_for

    def spy(train: Any) -> Any:
        step = real(train)

        def recorded(module: Any, batch: dict, *args: Any) -> torch.Tensor:
            n = max(seen, default=0) + 1
            if n == stop_at:
                raise RuntimeError("worker killed")
            seen[n] = batch["index"].tolist()
            return step(module, batch, *args)
        return recorded

    worker.step_for = spy
    try:
        final = worker.run_trial(with_model_path(cfg, cache_dir), worker.WorkerContext(
            trial_dir=tmp / "trial", cache_dir=cache_dir, report=report, resume_from=resume))
    finally:
        worker.step_for = real
    return final, reports


def test_trials_on_shards_match_folders_and_resume_exactly(
        synth: Path, shards: Path, cache_dir: Path, tmp_path: Path) -> None:
    folder: dict[int, list[int]] = {}
    f_final, _ = _trial(synth, "folder", tmp_path / "f", cache_dir, folder)
    ref: dict[int, list[int]] = {}
    w_final, w_reports = _trial(shards, "webdataset", tmp_path / "w", cache_dir, ref)
    # The same number of steps and samples as the same data in folders.
    for key in ("steps", "samples_seen", "epochs"):
        assert w_final[key] == f_final[key], key
    assert w_final["status"] == "terminated" and sorted(ref) == list(range(1, 7))
    for epoch in (0, 1):  # every epoch: 48 distinct samples, each once
        idx = [i for s in range(3 * epoch + 1, 3 * epoch + 4) for i in ref[s]]
        assert len(idx) == len(set(idx)) == 48
    assert w_reports[0]["data_wait_frac"] is None
    assert all(0 <= r["data_wait_frac"] <= 1 for r in w_reports[1:])
    assert 0 <= w_final["data_wait_frac"] <= 1
    # Killed at step 5 (mid-epoch 2, after the checkpoint of step 4), then resumed: the
    # resumed steps see exactly the samples the uninterrupted run saw there, and the epoch
    # sees no sample twice.
    run = tmp_path / "killed"
    first: dict[int, list[int]] = {}
    with pytest.raises(RuntimeError, match="worker killed"):
        _trial(shards, "webdataset", run, cache_dir, first, stop_at=5, every=1)
    assert sorted(first) == [1, 2, 3, 4]
    again = dict(first)
    final, _ = _trial(shards, "webdataset", run, cache_dir, again, resume=run / "last_ckpt",
                      every=1)
    assert final["status"] == "terminated" and sorted(again) == list(range(1, 7))
    assert again == ref
    td = D.build_trial_data(DataSpec(root=str(shards), format="webdataset",
                                     class_names="classes.json"), "templates", 4, 0, TF)
    keys = [td.train.samples[i].id for s in (4, 5, 6) for i in again[s]]  # (shard, offset)
    assert len(keys) == len(set(keys)) == 48


# --------------------------------------------------------------------------- the rest


def test_image_cache_and_naflex_on_shards(shards: Path, tmp_path: Path,
                                          siglip2_checkpoints: dict[str, Path]) -> None:
    """The decode-once store of a split of shards, built by 2 DataLoader workers reading
    them front to back, holds each image as decoding it gives; SigLIP 2 NaFlex patch
    sequences come through the streamed loader."""
    from transformers import AutoProcessor

    from sweeper import cache as C

    dataset = wds(shards)
    listing = C.SplitListing.scan(dataset, "val")
    store = C.ensure_image_cache(tmp_path, listing, TF, batch_size=8, num_workers=2)
    assert store.ok.all() and len(store) == len(listing.samples) == 48
    ds = D.ImageTextDataset(listing.samples, [], TF, ["{}"], "templates", 0,
                            reader=listing.reader)
    for i, raw in listing.reader.stream(listing.samples):
        with ds.prefetched({i: raw}):
            assert (store.array[i] == ds.load_uint8(i)).all()
    # NaFlex: patches, their mask and shapes per image, through the streamed path.
    ip = AutoProcessor.from_pretrained(siglip2_checkpoints["naflex"]).image_processor
    train, _ = dataset.load()
    nds = D.ImageTextDataset(train.samples, train.names, D.image_transform(ip, 9),
                             ["a {}"], "templates", 0, reader=dataset.reader())
    batch = next(iter(D.make_loader(nds, D.batch_plan(nds, 8), D.Collate(FakeTokenizer(), 8),
                                    0)))
    assert batch["size"] == 8 and batch["pixel_values"].shape[:2] == (8, 9)
    assert batch["pixel_attention_mask"].shape == (8, 9) and "spatial_shapes" in batch


def test_data_wait_is_the_time_blocked_on_the_loader(monkeypatch: pytest.MonkeyPatch,
                                                     caplog) -> None:
    """`_DataClock` on a fake clock: each batch takes 2 s to come, each step 8 s, an
    evaluation 100 s (not loop time): the loop waited 20 % of its time; the epoch's line
    says so above 10 %."""
    from types import SimpleNamespace

    import sweeper.worker as worker

    now = [0.0]
    monkeypatch.setattr(worker.time, "perf_counter", lambda: now[0])

    def loader() -> Any:
        for b in range(3):
            now[0] += 2.0
            yield b

    clock = worker._DataClock()
    start = clock.mark()
    for _ in clock.batches(loader()):
        now[0] += 8.0  # the step
        clock.pause(lambda: now.__setitem__(0, now[0] + 100.0))  # an evaluation
    loop_s, waited = clock.since(start)
    assert (loop_s, waited) == (30.0, 6.0)
    caplog.set_level(logging.WARNING, logger="sweeper.worker")
    seq = SimpleNamespace(ctx=SimpleNamespace(rank=0), cfg=SimpleNamespace(trial_id="t"),
                          st={"epoch": 1})
    worker._Sequencer._epoch_wait(seq, loop_s, waited)
    worker._Sequencer._epoch_wait(seq, loop_s, 0.05 * loop_s)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("[t] epoch 1: data_wait_frac 0.20")
