"""What a GPU run depends on, shown on the CPU (issue 15): float32 master weights, the
precision and TF32 defaults per device, no host-to-device copy per batch beyond the batch,
the PIL image-processor backend pinned, DataLoader workers and prefetching sized from the
CPUs and /dev/shm, checkpoints (none at step 0, optimizer state apart and kept only in the
latest, pruned to the best), the upload mode, and (2 gloo processes) ranks that agree on
every batch and every fallback, with no collective around a cache build and DDP tuned.

The checkpoints are freshly initialised tiny models (no pretraining); the trials use the
session's pretrained tiny preset, as tests/test_training.py does.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from sweeper import data as D
from sweeper.checkpoint import (
    OPTIMIZER,
    STATE,
    checkpoint_nbytes,
    checkpoint_upload,
    load_checkpoint,
    prune_finished,
    strip_older_optimizers,
)
from sweeper.collectives import Agreement
from sweeper.experiment import storage_is_remote
from sweeper.models import DualEncoder, build_tiny, is_pil_backend, load_pretrained
from sweeper.prepare import with_model_path
from sweeper.spec import TinyModelSpec, TrainSpec, validate
from sweeper.synthetic import dataset_dir, vocabulary
from sweeper.training import (
    configure_matmul,
    loss_fn_for,
    param_groups,
    resolve_precision,
    train_step,
    use_tf32,
    wrap_ddp,
)
from sweeper.trials import resolve_trial
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import SYNTH, TINY, base_doc

WORLD = 2


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh tiny SigLIP saved in bfloat16, as many hub checkpoints are."""
    d = tmp_path_factory.mktemp("bf16-ckpt")
    model, processor = build_tiny(TinyModelSpec(**TINY), vocabulary())
    model.to(torch.bfloat16).save_pretrained(d)
    processor.save_pretrained(d)
    return d


def trial_cfg(tmp_path: Path, variant: str = "siglip", num_workers: int = 1,
              data: dict | None = None, eval: dict | None = None, **train: Any) -> Any:
    doc = base_doc(tmp_path)
    if "budget" in train:
        doc["train"].pop("epochs")
    doc["train"].update(train)
    doc["data"].update(data or {})
    doc["eval"] = eval or {}
    doc["scaling"]["num_workers"] = num_workers
    return resolve_trial(validate(doc), {"variant": variant, "text_source": "templates",
                                         "batch_size": 16, "n_train_classes": 4, "seed": 0})


# --------------------------------------------------------------------------- numerics


def test_bf16_checkpoint_trains_on_float32_master_weights(bf16_checkpoint: Path) -> None:
    model, processor = load_pretrained(bf16_checkpoint)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    enc = DualEncoder(model)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    tok = processor.tokenizer(["a red circle", "a blue square"] * 2, padding="max_length",
                              max_length=16, return_tensors="pt")
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "input_ids": tok["input_ids"],
             "labels": torch.arange(4)}
    opt = torch.optim.AdamW(param_groups(enc, TrainSpec(lr=1e-5)), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_step(enc, batch, opt, sched, loss_fn_for("sigmoid"), None,
               lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    w = "model.text_model.encoder.layers.0.mlp.fc1.weight"
    after = dict(enc.named_parameters())[w].detach()
    moved = (after - before[w]).abs()
    assert moved.max() > 0 and moved.mean() == pytest.approx(1e-5, rel=0.5)  # Adam: ~lr
    # Stored in bf16 the same update would be lost: most weights round back to themselves.
    assert (after.bfloat16() == before[w].bfloat16()).float().mean() > 0.9


@pytest.mark.parametrize(("cap", "auto", "tf32"), [((9, 0), "bf16", True),
                                                   ((8, 0), "bf16", True),
                                                   ((7, 5), "fp32", False),  # T4
                                                   ((7, 0), "fp32", False)])  # V100
def test_precision_auto_and_tf32_by_compute_capability(monkeypatch: pytest.MonkeyPatch,
                                                       cap: tuple[int, int], auto: str,
                                                       tf32: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(major=cap[0], minor=cap[1]))
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert TrainSpec().precision == "auto"
    assert resolve_precision("auto", gpu) == auto
    assert resolve_precision("bf16", gpu) == "bf16"  # asked for: emulated or not
    assert resolve_precision("fp32", gpu) == "fp32"
    assert use_tf32(gpu) is tf32
    assert resolve_precision("auto", cpu) == "fp32" and not use_tf32(cpu)
    was = torch.get_float32_matmul_precision()
    assert configure_matmul(cpu) is False and torch.get_float32_matmul_precision() == was


# --------------------------------------------------------------------------- loader path


class _H2DCopies(TorchDispatchMode):
    """Counts tensors copied from the host to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            dev = kwargs.get("device")
            if args[0].device.type == "cpu" and dev is not None \
                    and torch.device(dev).type != "cpu":
                self.n += 1
        return func(*args, **kwargs)


class _Loader(list):
    dataset = range(12)


def test_device_batches_copy_nothing_but_the_batch() -> None:
    """Per batch, the only host-to-device copies are the batch's own tensors: the
    normalisation constants are copied once per loader, the flip mask once per epoch (a
    copy from pageable memory blocks the host). The meta device stands in for a GPU."""
    tf = D.ImageTransform(8, 8, None, None, 3, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    batches = _Loader({"pixel_values": torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8),
                       "input_ids": torch.zeros(4, 5, dtype=torch.long),
                       "labels": torch.arange(4), "index": torch.arange(4) + 4 * i,
                       "skipped": 0, "size": 4} for i in range(3))
    sampler = SimpleNamespace(epoch=0)
    with _H2DCopies() as copies:
        db = D.DeviceBatches(batches, torch.device("meta"), tf, "flip", 0, sampler)
        at_start, per_batch = copies.n, []
        for epoch in range(2):
            sampler.epoch = epoch
            for batch in db:
                per_batch.append(copies.n)
                px = batch["pixel_values"]
    assert px.device.type == "meta" and px.shape == (4, 3, 8, 8)
    assert at_start == 2  # rescale/std and mean/std
    steps = [b - a for a, b in zip([at_start, *per_batch], per_batch, strict=False)]
    assert steps == [5, 4, 4, 5, 4, 4]  # 4 tensors per batch, + the mask at each epoch


def test_image_processor_pinned_to_pil(bf16_checkpoint: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With torchvision installed transformers 5 picks its torchvision backend: the loader
    asks for the PIL one (which `ImageTransform` reproduces). Shown without torchvision by
    making transformers believe it is there and recording the backend it resolves."""
    import transformers.models.auto.image_processing_auto as ipa
    from transformers import AutoProcessor

    resolved: list[str] = []
    resolve = ipa._resolve_backend

    def spy(*a: Any, **k: Any) -> str:
        resolved.append(resolve(*a, **k))
        return resolved[-1]

    monkeypatch.setattr(ipa, "_resolve_backend", spy)
    monkeypatch.setattr(ipa, "is_torchvision_available", lambda: True)
    AutoProcessor.from_pretrained(bf16_checkpoint)
    assert resolved == ["torchvision"]  # the default a GPU cluster gets
    _, processor = load_pretrained(bf16_checkpoint)
    assert resolved[1:] == ["pil"] and is_pil_backend(processor.image_processor)

    class TorchvisionBackend:
        pass

    class SiglipImageProcessor(TorchvisionBackend):
        pass

    assert not is_pil_backend(SiglipImageProcessor())
    assert not is_pil_backend(type("SiglipImageProcessorFast", (), {})())


def test_loader_workers_and_shared_memory() -> None:
    assert D.loader_workers("auto", 0.99) == 1  # a CPU worker: still one decoding process
    assert D.loader_workers("auto", 12) == 11 and D.loader_workers(3, 12) == 3
    assert D.loader_workers("auto", 200) == 32
    tf = D.ImageTransform(224, 224, None, None, 3, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    nb = D.batch_nbytes(256, tf, 64)  # a SigLIP-B/16 slice of 256
    assert nb == 256 * (224 * 224 * 3 + 2 * 8 * 64 + 16)
    gib = 2**30
    assert D.plan_loader(11, nb, 8, 64 * gib) == (11, 2, None)  # 32 GiB for 8 GPUs: all
    w, pf, note = D.plan_loader(11, nb, 8, 4 * gib)  # 256 MiB each: 6 batches in flight
    assert (w, pf) == (6, 1) and "/dev/shm" in note
    assert D.plan_loader(11, nb, 1, 64 * 2**20)[:2] == (0, 2)  # docker's default: none
    assert D.plan_loader(0, nb, 1, 64 * 2**20) == (0, 2, None)


def test_batch_bytes_and_prefetch_of_a_real_loader(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path, cache_dir: Path) -> None:
    _, processor = build_tiny(TinyModelSpec(**TINY), vocabulary())
    tf = D.ImageTransform.from_processor(processor.image_processor)
    root = dataset_dir(**SYNTH, cache_dir=cache_dir)
    td = D.build_trial_data(validate(base_doc(tmp_path)).data, "templates", 4, 0, tf, root)
    collate = D.Collate(processor.tokenizer, 16, uint8=True)
    batch = collate(td.train.__getitems__([(i, 0) for i in range(8)]))
    real = sum(v.numel() * v.element_size() for v in batch.values()
               if isinstance(v, torch.Tensor))
    assert D.batch_nbytes(8, tf, 16) == real
    monkeypatch.setattr(D.loading, "shm_free_bytes", lambda: 5 * real)  # 2 batches' worth
    sampler = D.GlobalBatchSampler(len(td.train), 8)
    # Bound for a GPU (the meta device stands in): uint8 crosses.
    loader = D.make_loader(td.train, sampler, D.Collate(processor.tokenizer, 16), 3,
                           device=torch.device("meta"))
    assert (loader.num_workers, loader.prefetch_factor) == (2, 1)
    # Bound for the CPU the workers normalise: float32 pixels, 4x the bytes; none fit.
    loader = D.make_loader(td.train, sampler, D.Collate(processor.tokenizer, 16), 3)
    assert loader.num_workers == 0


def test_storage_remote_and_upload_mode() -> None:
    mounts = ("overlay / overlay rw 0 0\nserver:/export /shared nfs4 rw 0 0\n"
              "s3fs /mnt/bucket fuse.s3fs rw 0 0\ntmpfs /shared/tmp tmpfs rw 0 0\n")
    assert storage_is_remote("/shared/sweeps", mounts)
    assert storage_is_remote("/mnt/bucket/sweeps", mounts)
    assert not storage_is_remote("/shared/tmp/sweeps", mounts)  # the longest mount wins
    assert not storage_is_remote("/sharedx", mounts) and not storage_is_remote("/home", mounts)
    assert storage_is_remote("s3://bucket/sweeps", mounts)
    assert checkpoint_upload("sync", "s3://b") == "sync"
    assert checkpoint_upload("async", "/tmp") == "async"
    assert checkpoint_upload("auto", "s3://b") == "async"


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_hold_weights_and_optimizer_apart(tmp_path: Path, cache_dir: Path,
                                                      caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """No checkpoint at step 0; `state.pt` and `optimizer.pt` (AdamW's moments: twice the
    weights), sized as `checkpoint_nbytes` predicts; a folder handed to a report that takes
    it is left to it; a checkpoint without its optimizer state still restores the
    weights."""
    cfg = with_model_path(trial_cfg(tmp_path, eval={"every_steps": 1}, budget={"steps": 2},
                                    precision="fp32"), cache_dir)
    handed: dict[int, Path | None] = {}
    ctx = WorkerContext(trial_dir=tmp_path / "trial", cache_dir=cache_dir,
                        report=lambda m, ck: handed.__setitem__(m["step"], ck),
                        report_takes_checkpoint=True)
    run_trial(cfg, ctx)
    assert handed[0] is None and sorted(handed) == [0, 1, 2]
    for ck in (handed[1], handed[2]):
        assert sorted(p.name for p in ck.iterdir()) == [OPTIMIZER, STATE]  # not deleted
    model, _ = load_pretrained(cfg.model_path)
    enc = DualEncoder(model, cfg.loss, cfg.freeze_vision)
    want = checkpoint_nbytes(enc)
    assert want["optimizer"] == 2 * want["weights"]
    sizes = {f: (handed[2] / f).stat().st_size for f in (STATE, OPTIMIZER)}
    assert 0 < sizes[STATE] - want["weights"] < 64 * 1024
    assert 0 < sizes[OPTIMIZER] - want["optimizer"] < 64 * 1024
    (handed[2] / OPTIMIZER).unlink()
    opt = torch.optim.AdamW(param_groups(enc, cfg.train), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="sweeper.checkpoint"):
        assert load_checkpoint(handed[2], enc, opt)["step"] == 2
    assert "no optimizer state" in caplog.text and not opt.state
    shutil.rmtree(handed[1])
    shutil.rmtree(handed[2])


def _fake_checkpoints(tmp_path: Path, steps: list[int]) -> list[SimpleNamespace]:
    out = []
    for s in steps:
        d = tmp_path / f"checkpoint_{s}"
        d.mkdir()
        (d / STATE).write_bytes(b"w")
        (d / OPTIMIZER).write_bytes(b"oo")
        out.append(SimpleNamespace(filesystem=pafs.LocalFileSystem(), path=str(d), step=s))
    return out


def test_optimizer_state_only_in_the_latest_and_finished_trials_pruned(tmp_path: Path
                                                                       ) -> None:
    cks = _fake_checkpoints(tmp_path, [1, 2, 3, 4])
    persisted: list[Any] = []
    for latest in [cks[0], cks[0], cks[1], None, cks[2], cks[3]]:  # async: lags, repeats
        strip_older_optimizers(persisted, latest)
    with_opt = [c.step for c in cks if (Path(c.path) / OPTIMIZER).exists()]
    assert with_opt == [4] and all((Path(c.path) / STATE).exists() for c in cks)
    # Finished: the best `keep` by val_top1 (ties: the earlier step), without optimizer.
    metrics = [{"step": 1, "val_top1": 0.5}, {"step": 2, "val_top1": 0.7},
               {"step": 3, "val_top1": 0.7}, {"step": 4, "val_top1": None}]
    assert prune_finished(list(zip(cks, metrics, strict=True)), keep=1) == 3
    assert [c.step for c in cks if Path(c.path).exists()] == [2]
    assert sorted(p.name for p in Path(cks[1].path).iterdir()) == [STATE]


# --------------------------------------------------------------------------- two ranks


def _bad_block_data(root: Path, cache_dir: Path) -> tuple[Path, list[str]]:
    """The synthetic data with every training image of the middle two of four classes
    unreadable: 24 in a row, so some samples find no readable neighbour to stand in and a
    rank's slice comes out short."""
    src = dataset_dir(**SYNTH, cache_dir=cache_dir)
    shutil.copytree(src, root)
    wnids = sorted(p.name for p in (root / "train").iterdir())[:4]
    for w in wnids[1:3]:
        for f in (root / "train" / w).iterdir():
            f.write_bytes(b"not an image")
    return root, wnids


def _bad_data_cfg(tmp: Path, root: Path, wnids: list[str], num_workers: int) -> Any:
    data = {"synthetic": None, "root": str(root), "class_names": str(root / "classes.json"),
            "captions": str(root / "captions.jsonl"), "train_classes": wnids}
    return trial_cfg(tmp, num_workers=num_workers, data=data, epochs=2, precision="fp32")


def _no_barrier(*a: Any, **k: Any) -> None:
    raise AssertionError("a barrier around a cache build (a collective wait of any length)")


def _rank_main(rank: int, init_file: str, out: str, cache_dir: str, data_root: str,
               wnids: list[str]) -> None:
    import sweeper.cache as C

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    tmp, cache = Path(out) / f"rank{rank}", Path(cache_dir)
    res: dict[str, Any] = {}
    try:
        agree = Agreement.create(WORLD)
        res["batch"] = agree.batch([3, 2][rank], [1, 4][rank])
        res["empty"] = agree.batch([0, 5][rank], 0)
        res["all"] = (agree.all(rank == 0), agree.all(True))
        enc = DualEncoder(build_tiny(TinyModelSpec(**TINY), vocabulary())[0])
        ddp = wrap_ddp(enc, torch.device("cpu"), WORLD)
        res["ddp"] = (ddp.gradient_as_bucket_view, ddp.broadcast_buffers)

        def trial(cfg: Any, name: str) -> list[dict]:
            reports: list[dict] = []
            run_trial(with_model_path(cfg, cache), WorkerContext(
                rank=rank, world_size=WORLD, trial_dir=Path(out) / name, cache_dir=cache,
                report=lambda m, ck: reports.append(m)))
            return reports

        res["bad"] = trial(_bad_data_cfg(tmp, Path(data_root), wnids, WORLD), "bad")
        dist.barrier = _no_barrier
        kinds: list[str] = []
        inputs = C.trial_inputs

        def spy(*a: Any, **k: Any) -> Any:
            got = inputs(*a, **k)
            kinds.append(got.kind)
            return got

        C.trial_inputs = spy
        store = str(Path(out) / "store")
        res["cached"] = trial(trial_cfg(tmp, "siglit", WORLD, {"cache_dir": store}),
                              "cached")
        if rank == 1:  # this rank alone cannot read the cache
            def unreadable(*a: Any, **k: Any) -> Any:
                raise OSError("stale file handle")

            C.SplitListing.scan = unreadable
        res["fallback"] = trial(trial_cfg(tmp, "siglit", WORLD, {"cache_dir": store}),
                                "fallback")
        res["kinds"] = kinds
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[list[dict], Path, list[str], Path]:
    out = tmp_path_factory.mktemp("ranks")
    root, wnids = _bad_block_data(out / "data", cache_dir)
    mp.spawn(_rank_main, args=(str(out / "init"), str(out), str(cache_dir), str(root), wnids),
             nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], \
        root, wnids, out


def test_ranks_agree_on_batches_and_fallbacks(two_ranks: Any) -> None:
    res = two_ranks[0]
    for r in res:
        assert r["batch"] == (2, 5)  # the smallest slice; unreadable images of both
        assert r["empty"] == (0, 0)  # one rank without a readable image: both skip
        assert r["all"] == (False, True)
        assert r["ddp"] == (True, False)  # bucket views; position ids are not broadcast


def test_short_slices_step_together(two_ranks: Any, tmp_path: Path, cache_dir: Path) -> None:
    """Rank slices that lost different numbers of images step on one shape (a mismatch
    would hang NCCL, or fail gloo's point-to-point exchange of the sigmoid ring), both
    ranks report the same, and the unreadable images counted are every rank's, as many
    as one process meets on the same data."""
    res, root, wnids, _ = two_ranks
    rank0, rank1 = res[0]["bad"], res[1]["bad"]
    assert [r["step"] for r in rank0] == [0, 3, 6]
    for a, b in zip(rank0, rank1, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_top1"] == b["val_top1"]
    assert all(math.isfinite(r["train_loss"]) for r in rank0[1:])
    one: list[dict] = []
    cfg = with_model_path(_bad_data_cfg(tmp_path, root, wnids, 1), cache_dir)
    run_trial(cfg, WorkerContext(trial_dir=tmp_path / "one", cache_dir=cache_dir,
                                 report=lambda m, ck: one.append(m)))
    # 9 samples find no stand-in; the 24 unreadable files are met again and again.
    assert rank0[-1]["skipped_images"] == one[-1]["skipped_images"] > 24


def test_cache_built_without_a_collective_and_fallback_taken_by_all(two_ranks: Any) -> None:
    res, _, _, out = two_ranks
    assert [r["kinds"] for r in res] == [["features", "none"]] * WORLD
    for a, b in zip(res[0]["cached"], res[1]["cached"], strict=True):
        assert a["train_loss"] == b["train_loss"]
    status = json.loads((out / "fallback" / "status.json").read_text())
    assert status["inputs"] == "none" and status["world_size"] == WORLD
    built = [p for p in (out / "store" / "features").iterdir() if not p.name.startswith(".")]
    assert len(built) == 2  # train and val, once for both ranks
