"""The micro-batched step (`sweeper.training.micro_batch_step`) against the one-pass step.

- gradient parity, to 1e-5 relative in float32, at 1 process (in-process) and at 2 and 3
  gloo processes under DDP (one spawn each), for both losses, every `same_class_pairs`
  mode, a frozen vision tower and cached image features; plain gradient accumulation (a
  loss per micro-batch) lands elsewhere, so the comparison has teeth;
- towers with dropout: the second pass restores each micro-batch's RNG state, so the
  gradients are those of one graph over the same masks (and not without the restore);
- Hugging Face's gradient checkpointing: the same gradients, fewer saved activations;
- a whole trial with micro-batches (and with checkpointing) reports the one-pass history.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sweeper import training
from sweeper.models import DualEncoder, build_tiny, build_tiny_clip
from sweeper.spec import TinyModelSpec
from sweeper.synthetic import vocabulary
from sweeper.training import (
    enable_gradient_checkpointing,
    loss_fn_for,
    micro_batch_step,
    step_for,
    train_step,
    wrap_ddp,
)
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import TINY
from tests.test_variants import checkpoints, trial_cfg  # noqa: F401 (a fixture)

NULL = contextlib.nullcontext
GLOBAL_BATCH, MICRO = 12, 2  # per worker: 12, 6, 4 samples = 6, 3, 2 micro-batches
RTOL = 1e-5
# (loss, freeze_vision, same_class_pairs, cached image features)
CASES = [(loss, False, pairs, False) for loss in ("sigmoid", "softmax")
         for pairs in ("negative", "positive", "ignore")] + [
    ("sigmoid", True, "negative", False), ("softmax", True, "ignore", False),
    ("sigmoid", True, "positive", True), ("softmax", True, "negative", True)]
IDS = [f"{lo}-{'frozen' if fr else 'full'}-{p}{'-features' if fe else ''}"
       for lo, fr, p, fe in CASES]


@functools.cache
def _fresh(loss: str) -> torch.nn.Module:
    build = build_tiny if loss == "sigmoid" else build_tiny_clip
    return build(TinyModelSpec(**TINY), vocabulary())[0]


def make_encoder(loss: str, frozen: bool, dropout: float = 0.0) -> DualEncoder:
    """The same fresh tiny SigLIP (sigmoid) or CLIP (softmax) in every process."""
    model = copy.deepcopy(_fresh(loss))
    if dropout:  # the tiny presets have none; attention dropout draws from the CPU RNG
        for m in model.modules():
            if type(m).__name__.endswith("Attention"):
                m.dropout = dropout
    return DualEncoder(model, loss, frozen).train()


def make_batch(enc: DualEncoder, features: bool, n: int = GLOBAL_BATCH) -> dict[str, Any]:
    """Random images and texts of varied length, classes repeated within and across ranks;
    with `features`, the frozen tower's embeddings instead of the pixels (the SigLiT
    feature cache)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 20, (n, 16), generator=g)
    mask = (torch.arange(16)[None] < torch.randint(4, 17, (n, 1), generator=g)).long()
    batch = {"pixel_values": torch.randn(n, 3, 16, 16, generator=g),
             "input_ids": ids * mask, "attention_mask": mask, "labels": torch.arange(n) // 3}
    if features:
        with torch.no_grad():
            batch["image_embeds"] = enc.encode_image(batch.pop("pixel_values"))
        batch["pixel_values"] = None
    return batch


def rows(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    b = batch["labels"].shape[0] // world
    return {k: None if v is None else v[rank * b:(rank + 1) * b] for k, v in batch.items()}


def grads_after(step: Any, loss: str, frozen: bool, pairs: str, features: bool,
                group: Any = None, checkpointing: bool = False, **kw: Any
                ) -> tuple[float, dict[str, torch.Tensor]]:
    """One step from the fresh model on this rank's rows of the global batch (DDP over
    `group` when given): the loss share and every parameter's gradient (averaged over the
    ranks, as the update uses)."""
    enc = make_encoder(loss, frozen)
    if checkpointing:
        enable_gradient_checkpointing(enc.model)
    model: torch.nn.Module = enc
    rank, world = 0, 1
    if group is not None:  # DDP as the worker sets it up (gradients as bucket views)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        model = wrap_ddp(enc, torch.device("cpu"), world, group)
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)  # the step's own update leaves the weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = rows(make_batch(enc, features), rank, world)
    share = step(model, batch, opt, sched, loss_fn_for(loss, pairs, group), None, NULL, **kw)
    return share.item(), {n: p.grad.clone() for n, p in enc.named_parameters()
                          if p.grad is not None}


@functools.cache
def one_process(case: tuple) -> tuple[float, dict[str, torch.Tensor]]:
    """The reference: `train_step` in one process over the whole global batch."""
    return grads_after(train_step, *case)


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                      what: str) -> None:
    """Every tensor to RTOL of its own size, or of the largest gradient for tensors whose
    true gradient is zero (a key bias under a softmax: rounding noise either way)."""
    assert got.keys() == want.keys(), what
    scale = max(g.abs().max().item() for g in want.values())
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=RTOL, atol=RTOL * scale, msg=f"{what} {n}")
    flat = torch.cat([g.flatten() for g in want.values()])
    diff = torch.cat([(got[n] - g).flatten() for n, g in want.items()])
    assert diff.norm() <= RTOL * flat.norm(), what


# --------------------------------------------------------------------------- 1 process


@pytest.mark.parametrize(("loss", "frozen", "pairs", "features"), CASES, ids=IDS)
def test_one_process_micro_batches_equal_one_pass(loss: str, frozen: bool, pairs: str,
                                                  features: bool) -> None:
    share, want = one_process((loss, frozen, pairs, features))
    got_share, got = grads_after(micro_batch_step, loss, frozen, pairs, features,
                                 micro_batch_size=MICRO)
    assert got_share == pytest.approx(share, rel=1e-6)
    assert_same_grads(got, want, "micro-batched")
    trained = {n for n in want if "vision" not in n}
    assert trained and (frozen or any("vision" in n for n in want))


def _accumulated(enc: DualEncoder, batch: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
    """Plain gradient accumulation: each micro-batch's own loss, averaged."""
    n = batch["labels"].shape[0] // MICRO
    for i in range(n):
        mb = {k: None if v is None else v[i * MICRO:(i + 1) * MICRO] for k, v in batch.items()}
        img, txt, scale, bias = enc(mb["pixel_values"], mb["input_ids"], mb["attention_mask"])
        (loss_fn(img, txt, scale, bias, mb["labels"]) / n).backward()
    return {name: p.grad for name, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_plain_accumulation_is_another_experiment(loss: str) -> None:
    _, want = one_process((loss, False, "negative", False))
    enc = make_encoder(loss, False)
    local = _accumulated(enc, make_batch(enc, False), loss_fn_for(loss, "negative"))
    gap = max(((local[n] - g).norm() / g.norm()).item() for n, g in want.items()
              if "k_proj.bias" not in n)
    assert gap > 100 * RTOL, gap


def test_one_micro_batch_is_the_one_pass_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(training, "_forward",
                        lambda *a, _f=training._forward: calls.append(1) or _f(*a))
    _, want = grads_after(train_step, "sigmoid", False, "negative", False)
    assert len(calls) == 1
    _, got = grads_after(micro_batch_step, "sigmoid", False, "negative", False,
                         micro_batch_size=GLOBAL_BATCH)
    assert len(calls) == 2  # one forward: no second pass
    for n, g in want.items():
        assert torch.equal(got[n], g), n


def test_step_for_picks_the_step() -> None:
    from sweeper.spec import TrainSpec

    assert step_for(TrainSpec()) is train_step
    step = step_for(TrainSpec(micro_batch_size=4))
    assert step.func is micro_batch_step and step.keywords == {"micro_batch_size": 4}


# --------------------------------------------------------------------------- dropout


def _one_graph_over_micro_batches(enc: DualEncoder, batch: dict[str, Any],
                                  loss_fn: Any) -> dict[str, torch.Tensor]:
    """The exact gradient of the micro-batched step's masks: every micro-batch encoded
    with its graph, in order from the same RNG state, one loss over all of them."""
    outs = [enc(batch["pixel_values"][i:i + MICRO], batch["input_ids"][i:i + MICRO],
                batch["attention_mask"][i:i + MICRO])
            for i in range(0, GLOBAL_BATCH, MICRO)]
    img, txt = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    loss_fn(img, txt, outs[0][2], outs[0][3], batch["labels"]).backward()
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def _micro_with_dropout(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    enc = make_encoder("sigmoid", False, dropout=0.3)
    opt = torch.optim.SGD(enc.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = make_batch(enc, False)
    torch.manual_seed(seed)
    micro_batch_step(enc, batch, opt, sched, loss_fn_for("sigmoid"), None, NULL, MICRO)
    return ({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None},
            torch.get_rng_state())


def test_dropout_masks_are_replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    def reference(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        enc = make_encoder("sigmoid", False, dropout=0.3)
        batch = make_batch(enc, False)
        torch.manual_seed(seed)
        return _one_graph_over_micro_batches(enc, batch, loss_fn_for("sigmoid")), \
            torch.get_rng_state()

    want, rng_after = reference(1)
    got, rng = _micro_with_dropout(1)
    assert_same_grads(got, want, "dropout")
    # The generator continues where the first passes left it, as after one graph.
    assert torch.equal(rng, rng_after)

    # Teeth: dropout is on (another seed, other gradients), and without the restore the
    # second pass draws other masks than the first.
    other, _ = reference(2)
    assert max(((other[n] - g).norm() / g.norm()).item() for n, g in want.items()) > 1e-2
    monkeypatch.setattr(training._RngState, "restored", lambda self: NULL())
    unrestored, _ = _micro_with_dropout(1)
    assert max(((unrestored[n] - g).norm() / g.norm()).item()
               for n, g in want.items()) > 100 * RTOL


# --------------------------------------------------------------------------- checkpointing


def _saved_numel(enc: DualEncoder, batch: dict[str, Any]) -> int:
    numels: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    return sum(numels)


@pytest.mark.parametrize(("loss", "frozen"), [("sigmoid", False), ("softmax", True)])
def test_gradient_checkpointing_same_gradients_fewer_activations(loss: str,
                                                                 frozen: bool) -> None:
    _, want = one_process((loss, frozen, "negative", False))
    plain, enc = make_encoder(loss, frozen), make_encoder(loss, frozen)
    enable_gradient_checkpointing(enc.model)
    batch = make_batch(enc, False)
    assert _saved_numel(enc, batch) < _saved_numel(plain, batch) / 2
    for step, kw in ((train_step, {}), (micro_batch_step, {"micro_batch_size": MICRO})):
        _, got = grads_after(step, loss, frozen, "negative", False, checkpointing=True, **kw)
        assert_same_grads(got, want, f"checkpointed {step.__name__}")


def test_gradient_checkpointing_refuses_a_model_without_it() -> None:
    with pytest.raises(ValueError, match=r"^train\.gradient_checkpointing: Linear does not"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- 2 and 3 processes

# Every mode of both losses, a frozen tower, cached features (each also at 1 process above).
DDP_CASES = [CASES[i] for i in (0, 2, 3, 4, 7, 8, 9)]
WORLD = 3


def _dist_worker(rank: int, init_file: str, out: str) -> None:
    """All cases over the 3 processes, then over the first two (a subgroup)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        pair = dist.new_group([0, 1])
        results: dict = {2: {}, 3: {}}
        for world, group in ((3, dist.group.WORLD), (2, pair)):
            if rank >= world:
                continue
            for case in DDP_CASES:
                results[world][case] = {
                    "one": grads_after(train_step, *case, group=group),
                    "micro": grads_after(micro_batch_step, *case, group=group,
                                         micro_batch_size=MICRO)}
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One spawn of 3 gloo processes runs every case at W=3 and W=2, one pass and
    micro-batched."""
    out = tmp_path_factory.mktemp("micro-ddp")
    mp.spawn(_dist_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", DDP_CASES, ids=[IDS[CASES.index(c)] for c in DDP_CASES])
def test_ddp_micro_batches_equal_one_pass(case: tuple, world: int, ranks: list[dict]) -> None:
    share, want = one_process(case)
    got = [r[world][case] for r in ranks[:world]]
    for r, g in enumerate(got):
        assert_same_grads(g["micro"][1], g["one"][1], f"W={world} rank {r} micro vs one pass")
        assert_same_grads(g["micro"][1], want, f"W={world} rank {r} vs one process")
    # The mean of the ranks' shares is the global loss, micro-batched too.
    assert sum(g["micro"][0] for g in got) / world == pytest.approx(share, rel=1e-5)


# --------------------------------------------------------------------------- whole trials


@pytest.mark.parametrize(("arch", "variant"), [("siglip", "siglip"), ("clip", "lit")])
def test_trial_history_is_the_same_micro_batched(arch: str, variant: str,
                                                 checkpoints: dict[str, Path],  # noqa: F811
                                                 cache_dir: Path, tmp_path: Path) -> None:
    """SigLIP trains both towers; LiT on CLIP reads the frozen tower's cached features."""
    runs = {"one": {}, "micro": {"micro_batch_size": 4}}
    if variant == "siglip":
        runs["micro+ckpt"] = {"micro_batch_size": 4, "gradient_checkpointing": True}
    history: dict[str, list[dict]] = {}
    for name, train in runs.items():
        cfg = trial_cfg(tmp_path / name, checkpoints[arch], variant, epochs=2, lr=1e-3,
                        **train)
        reports: list[dict] = []
        final = run_trial(cfg, WorkerContext(trial_dir=tmp_path / name / "trial",
                                             cache_dir=cache_dir,
                                             report=lambda m, ck, r=reports: r.append(m)))
        assert final["status"] == "terminated"
        history[name] = reports
    one = history.pop("one")
    assert [r["step"] for r in one] == [0, 3, 6]
    assert math.isfinite(one[-1]["train_loss"])
    for name, reports in history.items():
        assert [r["step"] for r in reports] == [0, 3, 6], name
        for a, b in zip(reports, one, strict=True):
            for key in ("train_loss", "logit_scale", "logit_bias", "val_top1", "val_top5"):
                if b[key] is None:
                    assert a[key] is None, (name, key)
                else:
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, key)
