"""Fine-tuning and zero-shot evaluation (issue 5), in-process through `run_trial` (no Ray):
parameter groups, schedules, clipping, budgets, the step-0 evaluation, seen/unseen
accuracy, the frozen-tower embedding cache, checkpoints and the final model, determinism,
divergence, resume, and the global-batch sampler."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from sweeper import data as D
from sweeper.checkpoint import load_checkpoint
from sweeper.evaluation import Evaluator, val_loader, zero_shot_metrics
from sweeper.models import DualEncoder, load_pretrained, text_max_length
from sweeper.prepare import resolve_checkpoint, with_model_path
from sweeper.sink import TrialSink, read_jsonl
from sweeper.spec import ModelSpec, TinyModelSpec, TrainSpec, TrialConfig, validate
from sweeper.synthetic import dataset_dir
from sweeper.training import lr_lambda, param_groups, resolve_precision, train_step
from sweeper.trials import resolve_trial
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import SYNTH, TINY, base_doc

# 4 of 8 synthetic classes x 12 images = 48 training images: 3 steps per epoch at batch 16.
TIMING = {"time_s", "samples_per_s", "ended_at", "wall_time_s", "data_wait_frac"}
# Warmup then cosine, per-tower learning rates, clipping and decay: resume must restore all.
RICH = {"epochs": 2, "lr": 1e-3, "lr_text": 2e-3, "warmup_steps": 2, "schedule": "cosine",
        "max_grad_norm": 1.0, "weight_decay": 0.01}


def make_cfg(tmp_path: Path, variant: str = "siglip", seed: int = 0,
             eval: dict | None = None, **train: Any) -> TrialConfig:
    doc = base_doc(tmp_path)
    doc["train"] = {"lr": 1e-3, **train}
    if "budget" not in train and "epochs" not in train:
        doc["train"]["epochs"] = 1
    if eval:
        doc["eval"] = eval
    return resolve_trial(validate(doc), {"variant": variant, "text_source": "templates",
                                         "batch_size": 16, "n_train_classes": 4, "seed": seed})


def run(cfg: TrialConfig, trial_dir: Path, cache_dir: Path, keep: Path | None = None,
        resume_from: Path | None = None) -> tuple[dict, list[dict], dict[int, Path]]:
    """(final, reports, {step: copy of the reported checkpoint dir})."""
    reports: list[dict] = []
    ckpts: dict[int, Path] = {}

    def report(metrics: dict, ckpt: Path | None) -> None:
        reports.append(dict(metrics))
        if ckpt is not None and keep is not None:
            ckpts[metrics["step"]] = Path(shutil.copytree(ckpt, keep / f"step{metrics['step']}"))

    ctx = WorkerContext(trial_dir=trial_dir, cache_dir=cache_dir, report=report,
                        resume_from=resume_from)
    return run_trial(with_model_path(cfg, cache_dir), ctx), reports, ckpts


def load_model(model: ModelSpec, cache_dir: Path) -> tuple[Any, Any]:
    return load_pretrained(resolve_checkpoint(model, cache_dir))


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def evaluate_model(cfg: TrialConfig, model: Any, processor: Any, cache_dir: Path) -> dict:
    """Evaluate a model afresh on the trial's val set, as the worker does."""
    enc = DualEncoder(model, cfg.loss, cfg.freeze_vision)
    transform = D.ImageTransform.from_processor(processor.image_processor)
    root = dataset_dir(**SYNTH, cache_dir=cache_dir)
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, root)
    max_len = text_max_length(model, processor, cfg.model.max_length)
    loader = val_loader(td.val_samples, td.val_names, transform, processor.tokenizer,
                        max_len, 0, 1, cfg.eval.batch_size, 0)
    return Evaluator(enc, loader, td.val_names, td.eval_templates, td.seen,
                     processor.tokenizer, max_len, batch_size=cfg.eval.batch_size)()


VAL_KEYS = ("val_top1", "val_top5", "val_top1_seen", "val_top1_unseen")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):
    return load_pretrained(resolve_checkpoint(ModelSpec(tiny=TinyModelSpec(**TINY)), cache_dir))


# --------------------------------------------------------------------------- optimisation


def test_param_groups_decay_and_tower_learning_rates(tiny) -> None:
    model, _ = tiny
    train = TrainSpec(lr=1e-3, lr_text=2e-3, lr_vision=3e-3, lr_logit=4e-3, weight_decay=0.1)
    enc = DualEncoder(model, "sigmoid", freeze_vision=False)
    groups = param_groups(enc, train)
    named = dict(enc.named_parameters())
    listed = [n for g in groups for n in g["names"]]
    assert sorted(listed) == sorted(named)  # every trainable parameter exactly once
    lr_of = {"text": 2e-3, "vision": 3e-3, "logit": 4e-3}
    for g in groups:
        assert g["lr"] == lr_of[g["tower"]]
        for n in g["names"]:
            no_decay = n.endswith("bias") or "norm" in n or "logit_" in n or named[n].ndim < 2
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), n
            assert g["tower"] == ("logit" if "logit_" in n
                                  else "vision" if "vision" in n else "text"), n
    group_of = {id(p): g for g in groups for p in g["params"]}
    for p in (enc.logit_scale, enc.logit_bias):
        assert (group_of[id(p)]["tower"], group_of[id(p)]["weight_decay"]) == ("logit", 0.0)
    assert {g["tower"] for g in groups} == {"text", "vision", "logit"}
    # The groups are what AdamW gets, lr per group intact.
    opt = torch.optim.AdamW(groups, lr=train.lr)
    assert sorted({g["lr"] for g in opt.param_groups}) == [2e-3, 3e-3, 4e-3]
    # Unset tower rates fall back to train.lr; a frozen tower and the softmax loss's unused
    # bias are left out of the optimizer.
    frozen = DualEncoder(model, "softmax", freeze_vision=True)
    try:
        groups = param_groups(frozen, TrainSpec(lr=5e-4))
        ids = {id(p) for g in groups for p in g["params"]}
        assert {g["tower"] for g in groups} == {"text", "logit"}
        assert all(g["lr"] == 5e-4 for g in groups)
        assert id(frozen.logit_bias) not in ids and id(frozen.logit_scale) in ids
    finally:  # the tiny model is shared by the module's tests
        for p in model.parameters():
            p.requires_grad_(True)


def test_schedule_factors() -> None:
    cos = lr_lambda(SimpleNamespace(warmup_steps=4, schedule="cosine"), 12)
    assert [cos(s) for s in (0, 1, 3, 4)] == [0.25, 0.5, 1.0, 1.0]
    assert cos(8) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0)
    assert cos(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 8)))
    const = lr_lambda(SimpleNamespace(warmup_steps=2, schedule="constant"), 12)
    assert [const(s) for s in (0, 1, 2, 11)] == [0.5, 1.0, 1.0, 1.0]
    plain = lr_lambda(SimpleNamespace(warmup_steps=0, schedule="cosine"), 10)
    assert plain(0) == 1.0 and plain(5) == pytest.approx(0.5)


def test_train_step_clips_the_global_gradient_norm() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.full((4,), 10.0))
            self.b = nn.Parameter(torch.full((3,), -10.0))

        def forward(self, pixel_values, input_ids, attention_mask=None, image_embeds=None):
            return self.w, self.b, self.w.sum(), self.b.sum()

    def loss_fn(img, txt, scale, bias, labels):
        return 1000 * ((img ** 2).sum() + (txt ** 2).sum())

    batch = {"pixel_values": None, "input_ids": None, "labels": None}
    for clip, expected in ((0.5, 0.5), (None, 2000 * math.sqrt(4 * 100 + 3 * 100))):
        toy = Toy()
        opt = torch.optim.SGD([{"params": [toy.w]}, {"params": [toy.b]}], lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        train_step(toy, batch, opt, sched, loss_fn, clip, contextlib.nullcontext)
        norm = torch.cat([toy.w.grad, toy.b.grad]).norm().item()
        assert norm == pytest.approx(expected, rel=1e-5)


def test_precision_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_bf16_on_cpu_when_asked(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_cfg(tmp_path, budget={"steps": 2}, precision="bf16")
    final, reports, _ = run(cfg, tmp_path / "trial", cache_dir)
    assert final["status"] == "terminated" and math.isfinite(reports[-1]["train_loss"])
    assert TrialSink(tmp_path / "trial").status()["precision"] == "bf16"


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget, steps, samples, epochs, report_steps", [
    ({"epochs": 2}, 6, 96, 2.0, [0, 3, 6]),
    ({"steps": 4}, 4, 64, 4 / 3, [0, 3, 4]),
    ({"samples": 40}, 3, 48, 1.0, [0, 3]),  # ceil(40 / 16) steps
])
def test_budget_stopping_point(tmp_path: Path, cache_dir: Path, budget: dict, steps: int,
                               samples: int, epochs: float, report_steps: list[int]) -> None:
    cfg = make_cfg(tmp_path, variant="siglit", budget=budget)
    final, reports, _ = run(cfg, tmp_path / "trial", cache_dir)
    assert [r["step"] for r in reports] == report_steps
    assert (final["steps"], final["samples_seen"]) == (steps, samples)
    assert final["epochs"] == pytest.approx(epochs)
    last = reports[-1]
    assert (last["step"], last["samples_seen"]) == (steps, samples)
    assert last["epoch"] == pytest.approx(epochs)
    status = TrialSink(tmp_path / "trial").status()
    assert (status["steps"], status["samples_seen"]) == (steps, samples)
    assert status["epochs"] == pytest.approx(epochs) and status["total_steps"] == steps


# --------------------------------------------------------------------------- evaluation


def test_zero_shot_metrics_hand_computed() -> None:
    # Class embeddings are the identity: an image's logits are its own coordinates.
    cls = torch.eye(7)
    img = torch.tensor([
        [1.0, .5, .4, .3, .2, .1, 0],    # class 0: top-1 right
        [.05, 1, .9, .8, .7, .6, 0],     # class 0: wrong, and 6th: out of the top 5
        [1, .9, 0, 0, 0, 0, 0],          # class 1: wrong, 2nd: in the top 5
        [0, 0, 1, 0, 0, 0, 0],           # class 2: right
        [.1, .2, .3, .4, .5, .6, 0],     # class 3 (unseen): wrong, 3rd
        [.5, .4, .3, .2, .1, .9, 0],     # class 4 (unseen): wrong, 6th
        [0, 0, 0, 0, 0, 1, 0],           # class 5 (unseen): right
    ])                                   # class 6 (unseen): no val image
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    seen = [True, True, True, False, False, False, False]
    m = zero_shot_metrics(img, labels, cls, seen, 1)
    assert m["val_top1"] == pytest.approx(3 / 7)
    assert m["val_top5"] == pytest.approx(5 / 7)
    assert m["val_top1_seen"] == pytest.approx(2 / 4)  # over images, not classes
    assert m["val_top1_unseen"] == pytest.approx(1 / 3)
    assert m["per_class"] == [0.5, 0.0, 1.0, 0.0, 0.0, 1.0, None]
    # Nothing unseen: no unseen accuracy rather than a made-up 0.
    assert zero_shot_metrics(img, labels, cls, [True] * 7, 1)["val_top1_unseen"] is None


def test_step0_is_the_untouched_model_and_seen_unseen_match_per_class(
        tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_cfg(tmp_path, eval={"batch_size": 20}, **RICH)
    final, reports, _ = run(cfg, tmp_path / "trial", cache_dir)
    first = reports[0]
    assert (first["step"], first["samples_seen"], first["epoch"]) == (0, 0, 0)
    assert first["train_loss"] is None and first["samples_per_s"] is None
    fresh = evaluate_model(cfg, *load_model(cfg.model, cache_dir), cache_dir)
    assert {k: first[k] for k in VAL_KEYS} == {k: fresh[k] for k in VAL_KEYS}
    assert final["zero_shot_top1"] == first["val_top1"]
    # The seen/unseen split agrees with per_class.jsonl and the trial's training classes
    # (6 val images per class, so image-weighted means are class means).
    sink = TrialSink(tmp_path / "trial")
    train_classes = set(sink.status()["train_classes"])
    per_class = read_jsonl(sink.per_class_path)
    assert [r["step"] for r in per_class] == [r["step"] for r in reports]
    assert per_class[0]["accuracy"] == dict(zip(sink.status()["eval_classes"],
                                                fresh["per_class"], strict=True))
    for row, rep in zip(per_class, reports, strict=True):
        acc = row["accuracy"]
        seen = [a for w, a in acc.items() if w in train_classes]
        unseen = [a for w, a in acc.items() if w not in train_classes]
        assert len(seen) == 4 and len(unseen) == 4
        assert rep["val_top1_seen"] == pytest.approx(sum(seen) / 4)
        assert rep["val_top1_unseen"] == pytest.approx(sum(unseen) / 4)
        assert rep["val_top1"] == pytest.approx(sum(acc.values()) / 8)
    # Every report carries the documented metrics; logit_scale is the temperature exp(t).
    keys = {"epoch", "step", "samples_seen", "train_loss", "lr", "logit_scale", "logit_bias",
            *VAL_KEYS, "samples_per_s", "data_wait_frac", "time_s", "best_val_top1",
            "best_step"}
    assert all(keys <= set(r) for r in reports)
    waits = [r["data_wait_frac"] for r in reports]
    assert waits[0] is None and all(0 <= w <= 1 for w in waits[1:])
    model, _ = load_model(cfg.model, cache_dir)
    assert first["logit_scale"] == pytest.approx(model.logit_scale.exp().item())
    assert first["logit_bias"] == pytest.approx(model.logit_bias.item())
    best = max(r["val_top1"] for r in reports)
    assert final["best_val_top1"] == best == reports[-1]["best_val_top1"]
    assert final["best_step"] == next(r["step"] for r in reports if r["val_top1"] == best)


@pytest.mark.parametrize("variant, evaluations_per_trial", [("siglit", 1), ("siglip", 3)])
def test_frozen_vision_embeds_val_images_once(tmp_path: Path, cache_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch, variant: str,
                                              evaluations_per_trial: int) -> None:
    calls = {"eval": 0, "train": 0}
    encode_image = DualEncoder.encode_image

    def counting(self: DualEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
        calls["train" if self.training else "eval"] += 1
        return encode_image(self, pixel_values)

    monkeypatch.setattr(DualEncoder, "encode_image", counting)
    cfg = make_cfg(tmp_path, variant=variant, epochs=2, eval={"batch_size": 16})
    # The tower itself, not the shared feature cache (tests/test_cache.py covers that).
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_features": False})})
    _, reports, _ = run(cfg, tmp_path / "trial", cache_dir)
    assert len(reports) == 3 and calls["train"] == 6
    assert calls["eval"] == 3 * evaluations_per_trial  # 48 val images / 16 per batch


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_reload_and_final_model(tmp_path: Path, cache_dir: Path) -> None:
    from transformers import AutoModel, AutoProcessor

    cfg = make_cfg(tmp_path, epochs=2, lr=3e-3, save_final=True)
    final, reports, ckpts = run(cfg, tmp_path / "trial", cache_dir, keep=tmp_path / "ck")
    # Every evaluation after step 0 (whose weights are the pretrained ones, saved already).
    assert [r["step"] for r in reports] == [0, 3, 6] and sorted(ckpts) == [3, 6]
    # Each checkpoint, the best included, loads into a fresh model from the same
    # pretrained and gives the accuracy reported with it.
    best = max(reports, key=lambda r: r["val_top1"])
    assert (best["step"], best["val_top1"]) == (final["best_step"], final["best_val_top1"])
    for rep in reports[1:]:
        model, processor = load_model(cfg.model, cache_dir)
        enc = DualEncoder(model, cfg.loss, cfg.freeze_vision)
        state = load_checkpoint(ckpts[rep["step"]], enc)
        assert state["step"] == rep["step"]
        again = evaluate_model(cfg, model, processor, cache_dir)
        assert {k: again[k] for k in VAL_KEYS} == {k: rep[k] for k in VAL_KEYS}
    # The final model is a plain Hugging Face checkpoint with the final accuracy.
    out = tmp_path / "trial" / "final_model"
    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    again = evaluate_model(cfg, model, processor, cache_dir)
    assert {k: again[k] for k in VAL_KEYS} == {k: reports[-1][k] for k in VAL_KEYS}
    assert reports[-1]["val_top1"] != reports[0]["val_top1"] or \
        reports[-1]["train_loss"] != reports[1]["train_loss"]  # it did train


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, cache_dir: Path,
                                                tiny) -> None:
    cfg = make_cfg(tmp_path, budget={"steps": 1})
    _, _, ckpts = run(cfg, tmp_path / "trial", cache_dir, keep=tmp_path / "ck")
    ck = torch.load(ckpts[1] / "state.pt", weights_only=True)
    ck["model"]["model.not_a_weight"] = torch.zeros(1)
    torch.save(ck, ckpts[1] / "state.pt")
    with pytest.raises(ValueError, match="not_a_weight"):
        load_checkpoint(ckpts[1], DualEncoder(load_model(cfg.model, cache_dir)[0]))


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_metrics(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_cfg(tmp_path, **RICH)
    a = run(cfg, tmp_path / "a", cache_dir)
    b = run(cfg, tmp_path / "b", cache_dir)
    assert untimed(a[0]) == untimed(b[0])
    assert [untimed(r) for r in a[1]] == [untimed(r) for r in b[1]]
    assert (tmp_path / "a" / "per_class.jsonl").read_bytes() == \
        (tmp_path / "b" / "per_class.jsonl").read_bytes()
    other = run(make_cfg(tmp_path, seed=1, **RICH), tmp_path / "c", cache_dir)
    assert [r["train_loss"] for r in other[1]] != [r["train_loss"] for r in a[1]]


# --------------------------------------------------------------------------- divergence


def test_non_finite_loss_ends_the_trial_as_diverged(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_cfg(tmp_path, epochs=3, lr=1e30, save_final=True)
    final, reports, _ = run(cfg, tmp_path / "trial", cache_dir)  # no exception
    assert final["status"] == "diverged" and "non-finite loss" in final["error"]
    assert 1 <= final["steps"] <= 2 < 9  # stopped at once, not at the budget
    status = json.loads((tmp_path / "trial" / "status.json").read_text())
    assert status["status"] == "diverged" and status["steps"] == final["steps"]
    assert reports[-1]["diverged"] is True and reports[-1]["step"] == final["steps"]
    assert TrialSink(tmp_path / "trial").history()[-1]["diverged"] is True
    assert not (tmp_path / "trial" / "final_model").exists()


# --------------------------------------------------------------------------- resume


def test_resume_mid_epoch_gives_the_uninterrupted_run(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_cfg(tmp_path, eval={"every_steps": 2}, **RICH)
    full, reports, ckpts = run(cfg, tmp_path / "a", cache_dir, keep=tmp_path / "ck")
    assert [r["step"] for r in reports] == [0, 2, 4, 6]
    # Warmup 2 then cosine to 0 at step 6; lr is the factor of the next update.
    assert [r["lr"] for r in reports] == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])
    # The second run finds the first's files (history up to step 6) and the step-2
    # checkpoint, two-thirds into the first epoch.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed, again, _ = run(cfg, tmp_path / "b", cache_dir, resume_from=ckpts[2])
    assert [r["step"] for r in again] == [4, 6]
    assert [untimed(r) for r in again] == [untimed(r) for r in reports[2:]]
    assert untimed(resumed) == untimed(full)
    a, b = TrialSink(tmp_path / "a"), TrialSink(tmp_path / "b")
    assert [untimed(r) for r in b.history()] == [untimed(r) for r in a.history()]
    assert read_jsonl(b.per_class_path) == read_jsonl(a.per_class_path)
    assert b.status()["restarts"] == 1 and b.status()["status"] == "terminated"


# --------------------------------------------------------------------------- global batch


@pytest.mark.parametrize("n, batch, world", [(50, 12, 3), (64, 16, 4), (10, 16, 4)])
def test_global_batch_sampler_splits_every_global_batch(n: int, batch: int,
                                                        world: int) -> None:
    for epoch in (0, 1):
        global_batches = D.GlobalBatchSampler(n, batch, 0, world, seed=3,
                                              epoch=epoch).global_batches()
        ranks = [list(D.GlobalBatchSampler(n, batch, r, world, seed=3, epoch=epoch))
                 for r in range(world)]
        steps = D.steps_per_epoch(n, batch, world)
        assert [len(r) for r in ranks] == [steps] * world  # same step count on every rank
        for s, gb in enumerate(global_batches):
            slices = [[i for i, _ in ranks[r][s]] for r in range(world)]
            assert len({len(x) for x in slices}) == 1  # batch_size / world each
            assert sorted(i for x in slices for i in x) == sorted(gb)  # union == global batch
            assert all(e == epoch for r in range(world) for _, e in ranks[r][s])
        # Full global batches; a set smaller than one batch is one batch trimmed to a
        # multiple of the workers.
        size = batch if n >= batch else n // world * world
        assert all(len(gb) == size for gb in global_batches)
        assert len(global_batches) == steps
    # A resumed epoch skips the batches already done, on every rank alike.
    full = list(D.GlobalBatchSampler(n, batch, 1, world, seed=3, epoch=1))
    assert list(D.GlobalBatchSampler(n, batch, 1, world, seed=3, epoch=1,
                                     skip_batches=1)) == full[1:]
