"""The four variants (SigLIP, SigLiT, CLIP, LiT) on SigLIP and CLIP checkpoints.

- the frozen vision tower: no gradient, not in the optimizer, eval mode, no autograd graph,
  weights bit-identical after a whole trial while the text tower moved;
- the bias: the sigmoid loss trains it (a new one, at -10, on a CLIP checkpoint, which the
  trial checkpoints and `save_pretrained` carry); the softmax loss leaves it alone;
- CLIP's text tower gets its attention mask, SigLIP's does not;
- with 2 gloo processes, one DDP `train_step` on each half of a batch updates the weights
  as one process does on the whole batch, and a whole 2-process `run_trial` reports what the
  1-process one does;
- (slow) a 2-worker Ray Train sweep over the sigmoid and softmax variants, through the CLI.

The checkpoints are freshly initialised tiny SigLIP and CLIP models saved with
`save_pretrained` into a folder and loaded through `model.pretrained: <folder>` and
`AutoModel`/`AutoProcessor.from_pretrained`, exactly as a hub checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from sweeper.checkpoint import load_checkpoint
from sweeper.models import DualEncoder, build_tiny, build_tiny_clip, load_pretrained
from sweeper.spec import TinyModelSpec, TrainSpec, TrialConfig, validate
from sweeper.synthetic import vocabulary
from sweeper.training import make_loss_fn, param_groups, train_step, wrap_ddp
from sweeper.trials import resolve_trial
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import TINY, base_doc
from tests.test_e2e import run_cli

VARIANTS = {"siglip": {"loss": "sigmoid", "freeze_vision": False},
            "siglit": {"loss": "sigmoid", "freeze_vision": True},
            "clip": {"loss": "softmax", "freeze_vision": False},
            "lit": {"loss": "softmax", "freeze_vision": True}}
ARCHS = ("siglip", "clip")
CASES = [(a, v) for a in ARCHS for v in VARIANTS]
NULL = contextlib.nullcontext


def _is_vision(name: str) -> bool:
    return "vision" in name or "visual" in name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fresh tiny SigLIP and CLIP checkpoints, saved like hub models."""
    out = {}
    tiny = TinyModelSpec(**TINY)
    for arch, build in (("siglip", build_tiny), ("clip", build_tiny_clip)):
        d = tmp_path_factory.mktemp(f"ckpt-{arch}")
        model, processor = build(tiny, vocabulary())
        model.save_pretrained(d)
        processor.save_pretrained(d)
        out[arch] = d
    return out


def trial_cfg(tmp_path: Path, pretrained: Path, variant: str, *, batch_size: int = 16,
              num_workers: int = 1, **train: object) -> TrialConfig:
    doc = base_doc(tmp_path)
    doc["model"] = {"pretrained": str(pretrained)}
    doc["variants"] = VARIANTS
    doc["train"].update(train)
    doc["scaling"]["num_workers"] = num_workers
    spec = validate(doc)
    return resolve_trial(spec, {"variant": variant, "text_source": "templates",
                                "batch_size": batch_size, "n_train_classes": 4, "seed": 0})


def make_batch(processor, n: int, seed: int = 0, repeat_labels: bool = False) -> dict:
    """Random images and texts of varied length (so the padding and its mask matter)."""
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "circle", "square", "small", "a", "photo", "of"]
    texts = [" ".join(words[j] for j in torch.randint(len(words), (2 + i % 5,), generator=g))
             for i in range(n)]
    tok = processor.tokenizer(texts, padding="max_length", max_length=16, truncation=True,
                              return_tensors="pt")
    labels = torch.arange(n) // 2 if repeat_labels else torch.arange(n)
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g),
            "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
            "labels": labels}


def half(batch: dict, rank: int, world_size: int) -> dict:
    b = batch["labels"].shape[0] // world_size
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


# --------------------------------------------------------------------------- checkpoints


def test_clip_checkpoint_loads_like_a_hub_checkpoint(checkpoints: dict[str, Path]) -> None:
    from PIL import Image

    from sweeper import data as D
    from sweeper.models import text_max_length

    model, processor = load_pretrained(str(checkpoints["clip"]))
    assert type(model).__name__ == "CLIPModel"
    assert type(processor).__name__ == "CLIPProcessor"
    assert getattr(model, "logit_bias", None) is None  # a hub CLIP has no bias
    ids = processor.tokenizer("a red circle .", padding="max_length", max_length=8)
    # start-of-text, words, end-of-text (the pooled token), then masked padding
    assert ids["input_ids"][0] == 2 and ids["input_ids"][5] == 3 and ids["input_ids"][6:] == [0, 0]
    assert ids["attention_mask"] == [1] * 6 + [0] * 2
    assert text_max_length(model, processor) == TINY.get("max_length", 16)
    ip = processor.image_processor
    assert dict(ip.size)["shortest_edge"] == 16 and ip.do_center_crop
    # Shortest edge to 16 (the long one truncated to 26, as HF does), then the centre 16 x 16.
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (24, 40, 3), generator=g, dtype=torch.uint8)
    img = Image.fromarray(pixels.numpy())
    ours = D.ImageTransform.from_processor(ip)(img)
    theirs = ip(images=img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_text_tower_gets_the_attention_mask_on_clip_only(checkpoints: dict[str, Path]) -> None:
    for arch, wants_mask in (("siglip", False), ("clip", True)):
        model, processor = load_pretrained(str(checkpoints[arch]))
        enc = DualEncoder(model, "softmax")
        seen: list[set[str]] = []
        original = model.get_text_features

        def spy(*args, _orig=original, _seen=seen, **kwargs):
            _seen.append(set(kwargs))
            return _orig(*args, **kwargs)

        model.get_text_features = spy
        batch = make_batch(processor, 4)
        enc(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        assert seen and all(("attention_mask" in s) == wants_mask for s in seen), (arch, seen)


def test_sigmoid_bias_on_a_clip_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model, processor = load_pretrained(str(checkpoints["clip"]))
    enc = DualEncoder(model, "softmax")
    # The softmax loss ignores the bias: a frozen placeholder, not added to the model.
    assert not enc.logit_bias.requires_grad and getattr(model, "logit_bias", None) is None
    assert all(p is not enc.logit_bias for g in param_groups(enc, TrainSpec())
               for p in g["params"])

    enc = DualEncoder(model, "sigmoid")
    assert enc.logit_bias is model.logit_bias and enc.logit_bias.requires_grad
    assert enc.logit_bias.item() == -10.0
    groups = param_groups(enc, TrainSpec())
    assert any(p is enc.logit_bias for g in groups if g["tower"] == "logit" for p in g["params"])
    with torch.no_grad():
        enc.logit_bias.fill_(-7.5)
    model.save_pretrained(tmp_path / "ft")
    processor.save_pretrained(tmp_path / "ft")
    again, _ = load_pretrained(str(tmp_path / "ft"))
    assert again.logit_bias.item() == -7.5
    assert DualEncoder(again, "sigmoid").logit_bias.item() == -7.5


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_variant_steps(arch: str, variant: str, checkpoints: dict[str, Path],
                       tmp_path: Path) -> None:
    """Two optimizer steps of each variant: what moves, what stays, what is in the graph."""
    loss, frozen = VARIANTS[variant]["loss"], VARIANTS[variant]["freeze_vision"]
    cfg = trial_cfg(tmp_path, checkpoints[arch], variant, lr=1e-3)
    model, processor = load_pretrained(cfg.model.pretrained)
    enc = DualEncoder(model, loss, frozen)
    vision = {n for n, _ in enc.named_parameters() if _is_vision(n)}
    assert vision and all(p.requires_grad != frozen
                          for n, p in enc.named_parameters() if n in vision)
    groups = param_groups(enc, cfg.train)
    in_opt = {n for g in groups for n in g["names"]}
    assert (in_opt & vision == set()) == frozen
    assert {"vision"} & {g["tower"] for g in groups} == (set() if frozen else {"vision"})
    assert ("logit_bias" in in_opt) == (loss == "sigmoid")

    enc.train()
    towers = dict(enc.model.named_children())
    assert all(m.training != (frozen and _is_vision(n))
               for name, t in towers.items() for n, m in t.named_modules(prefix=name))
    batch = make_batch(processor, 8)
    img, txt, _, _ = enc(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert (img.grad_fn is None) == frozen and txt.grad_fn is not None

    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    losses = [train_step(enc, batch, opt, sched, make_loss_fn(cfg, None), 1.0, NULL).item()
              for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    text = {n for n in before if n not in vision and "logit_" not in n}
    assert text <= moved
    assert (vision & moved == set()) if frozen else vision <= moved
    assert ("logit_bias" in moved) == (loss == "sigmoid")
    assert "model.logit_scale" in moved
    if frozen:
        assert all(p.grad is None for n, p in enc.named_parameters() if n in vision)


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_variant_trial_in_process(arch: str, variant: str, checkpoints: dict[str, Path],
                                  cache_dir: Path, tmp_path: Path) -> None:
    """A whole trial per variant: the final model against the pretrained one, and the last
    checkpoint restored into a fresh model gives the final weights back."""
    loss, frozen = VARIANTS[variant]["loss"], VARIANTS[variant]["freeze_vision"]
    cfg = trial_cfg(tmp_path, checkpoints[arch], variant, epochs=1, save_final=True)
    last_ckpt = tmp_path / "last_ckpt"
    reports: list[dict] = []

    def report(metrics: dict, ckpt: Path | None) -> None:
        reports.append(metrics)
        if ckpt is not None:  # the worker deletes it once reported, as Ray would copy it
            shutil.rmtree(last_ckpt, ignore_errors=True)
            shutil.copytree(ckpt, last_ckpt)

    ctx = WorkerContext(trial_dir=tmp_path / "trial", cache_dir=cache_dir, report=report)
    final = run_trial(cfg, ctx)
    assert final["status"] == "terminated" and [r["step"] for r in reports] == [0, 3]
    assert math.isfinite(reports[-1]["train_loss"]) and reports[-1]["train_loss"] > 0

    pre = load_file(checkpoints[arch] / "model.safetensors")
    post = load_file(tmp_path / "trial" / "final_model" / "model.safetensors")
    vision = {k for k in pre if _is_vision(k)}
    text = {k for k in pre if not _is_vision(k) and "logit_" not in k}
    changed = {k for k in pre if not torch.equal(pre[k], post[k])}
    assert text <= changed
    if frozen:
        assert vision & changed == set()  # bit-identical
    else:
        assert vision <= changed
    saved = torch.load(last_ckpt / "state.pt", weights_only=True)["model"]
    assert any(_is_vision(k) for k in saved) != frozen  # a frozen tower is not saved again

    bias = reports[-1]["logit_bias"]
    if loss == "sigmoid":
        assert "logit_bias" in post and post["logit_bias"].item() != -10.0
        assert post["logit_bias"].item() == pytest.approx(bias)
        assert saved["logit_bias"].item() == post["logit_bias"].item()
    elif arch == "siglip":
        assert torch.equal(post["logit_bias"], pre["logit_bias"])
    else:
        assert "logit_bias" not in post and bias == -10.0
    assert reports[-1]["logit_scale"] != reports[0]["logit_scale"]

    model, _ = load_pretrained(cfg.model.pretrained)
    enc = DualEncoder(model, loss, frozen)
    load_checkpoint(last_ckpt, enc)
    restored = model.state_dict()
    assert set(restored) == set(post)
    for k, v in post.items():
        assert torch.equal(restored[k], v), k


# --------------------------------------------------------------------------- 2 processes

WORLD = 2
# (arch, variant, train.same_class_pairs) of the DDP step comparison
DDP_CASES = [(a, v, "negative") for a, v in CASES] + [
    ("siglip", "siglip", "positive"), ("clip", "clip", "positive"),
    ("siglip", "siglit", "ignore"), ("clip", "lit", "ignore")]
# (arch, variant) of the whole-trial comparison
TRIAL_CASES = [("clip", "siglip"), ("siglip", "lit")]
SGD_LR = 0.5
ATOL = 1e-5  # float32 reductions in another order; a wrong loss is off by >= 1e-3 here


def _sgd_step(cfg: TrialConfig, enc: torch.nn.Module, model: torch.nn.Module,
              batch: dict) -> float:
    """One plain-SGD `train_step` (the update is -lr * gradient, nothing hides a wrong one)."""
    opt = torch.optim.SGD(param_groups(model, cfg.train), lr=SGD_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return train_step(enc, batch, opt, sched, make_loss_fn(cfg, None), None, NULL).item()


def _ddp_cfg(tmp: Path, dirs: dict[str, Path], arch: str, variant: str, pairs: str,
             num_workers: int) -> TrialConfig:
    return trial_cfg(tmp, dirs[arch], variant, num_workers=num_workers, lr=SGD_LR,
                     same_class_pairs=pairs)


def _dist_worker(rank: int, init_file: str, out: str, dirs: dict[str, Path],
                 cache_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    tmp = Path(out) / f"rank{rank}"
    results: dict = {"steps": {}, "trials": {}}
    try:
        for arch, variant, pairs in DDP_CASES:
            cfg = _ddp_cfg(tmp, dirs, arch, variant, pairs, WORLD)
            model, processor = load_pretrained(cfg.model.pretrained)
            enc = DualEncoder(model, cfg.loss, cfg.freeze_vision)
            ddp = wrap_ddp(enc, torch.device("cpu"), WORLD)  # as the worker tunes it
            batch = half(make_batch(processor, 8, repeat_labels=pairs != "negative"), rank, WORLD)
            share = _sgd_step(cfg, ddp, enc, batch)
            params = {n: p.detach().clone() for n, p in enc.named_parameters()}
            results["steps"][(arch, variant, pairs)] = {"share": share, "params": params}
        for arch, variant in TRIAL_CASES:
            cfg = trial_cfg(tmp, dirs[arch], variant, num_workers=WORLD, epochs=2, lr=1e-3)
            reports: list[dict] = []
            ctx = WorkerContext(rank=rank, world_size=WORLD, trial_dir=tmp / f"{arch}-{variant}",
                                cache_dir=Path(cache_dir),
                                report=lambda m, ck, r=reports: r.append(m))
            run_trial(cfg, ctx)
            results["trials"][(arch, variant)] = reports
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(checkpoints: dict[str, Path], cache_dir: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One spawn of 2 gloo processes runs every DDP step case and the 2-process trials."""
    from sweeper.synthetic import dataset_dir
    from tests.conftest import SYNTH

    dataset_dir(**SYNTH, cache_dir=cache_dir)  # generated once, before the processes start
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_dist_worker, args=(str(out / "init"), str(out), checkpoints, str(cache_dir)),
             nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize(("arch", "variant", "pairs"), DDP_CASES,
                         ids=[f"{a}-{v}-{p}" for a, v, p in DDP_CASES])
def test_ddp_step_equals_one_process_on_the_whole_batch(
        arch: str, variant: str, pairs: str, checkpoints: dict[str, Path],
        two_process_results: list[dict], tmp_path: Path) -> None:
    cfg = _ddp_cfg(tmp_path, checkpoints, arch, variant, pairs, 1)
    model, processor = load_pretrained(cfg.model.pretrained)
    enc = DualEncoder(model, cfg.loss, cfg.freeze_vision)
    start = {n: p.detach().clone() for n, p in enc.named_parameters()}
    batch = make_batch(processor, 8, repeat_labels=pairs != "negative")
    loss = _sgd_step(cfg, enc, enc, batch)
    want = {n: p.detach().clone() for n, p in enc.named_parameters()}

    got = [r["steps"][(arch, variant, pairs)] for r in two_process_results]
    # The mean of the ranks' shares is the global loss.
    assert sum(g["share"] for g in got) / WORLD == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for g in got:
        for n, p in want.items():
            torch.testing.assert_close(g["params"][n], p, rtol=0, atol=ATOL, msg=n)

    # Control: two independent 1-process steps on the halves (a loss over the local batch
    # only, averaged as DDP would) land elsewhere, so the comparison above has teeth. (The
    # gap is smallest for the sigmoid loss at bias -10, where negatives weigh ~ e^-10.)
    local = []
    for r in range(WORLD):
        with torch.no_grad():
            for n, p in enc.named_parameters():
                p.copy_(start[n])
        _sgd_step(cfg, enc, enc, half(batch, r, WORLD))
        local.append({n: p.detach().clone() for n, p in enc.named_parameters()})
    gap = max((sum(lc[n] for lc in local) / WORLD - want[n]).abs().max().item() for n in want)
    assert gap > 10 * ATOL


@pytest.mark.parametrize(("arch", "variant"), TRIAL_CASES,
                         ids=[f"{a}-{v}" for a, v in TRIAL_CASES])
def test_two_process_trial_reports_what_one_process_does(
        arch: str, variant: str, checkpoints: dict[str, Path], cache_dir: Path,
        two_process_results: list[dict], tmp_path: Path) -> None:
    cfg = trial_cfg(tmp_path, checkpoints[arch], variant, epochs=2, lr=1e-3)
    reports: list[dict] = []
    run_trial(cfg, WorkerContext(trial_dir=tmp_path / "trial", cache_dir=cache_dir,
                                 report=lambda m, ck: reports.append(m)))
    rank0, rank1 = (r["trials"][(arch, variant)] for r in two_process_results)
    assert [r["step"] for r in rank0] == [r["step"] for r in reports] == [0, 3, 6]
    assert_two_ranks_report_one(rank0, rank1, reports)


def assert_two_ranks_report_one(rank0: list[dict], rank1: list[dict],
                                one: list[dict]) -> None:
    """The reports of a trial's two ranks against the one-process trial's: the same
    losses, temperature and bias (the ranks agreeing among themselves), accuracies within
    one val image (float32 sums in another order can flip a near tie)."""
    n_val = 8 * 6  # SYNTH: 8 classes x 6 val images
    for two, ref, other in zip(rank0, one, rank1, strict=True):
        for key in ("train_loss", "logit_scale", "logit_bias"):
            if ref[key] is None:
                assert two[key] is None
            else:
                assert two[key] == pytest.approx(ref[key], rel=1e-4), key
                assert other[key] == pytest.approx(two[key], rel=1e-6), key  # ranks agree
        for key in ("val_top1", "val_top5"):
            assert abs(two[key] - ref[key]) <= 1 / n_val + 1e-9, key
        assert two["samples_seen"] == ref["samples_seen"]


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_two_worker_sweep_sigmoid_and_softmax(tmp_path: Path, cache_dir: Path) -> None:
    """A real Ray Train trial per loss with 2 workers (gloo), the global-batch losses over
    Ray Train's process group, through the command line."""
    doc = base_doc(tmp_path, name="two-workers")
    doc["variants"] = {"siglip": VARIANTS["siglip"], "clip": VARIANTS["clip"]}
    doc["grid"]["variant"] = ["siglip", "clip"]
    # 2 cores: two workers of 0.9 CPU and the 0.01-CPU driver fit, one trial at a time.
    doc["scaling"] = {"num_workers": 2, "resources_per_worker": {"CPU": 0.9},
                      "max_concurrent_trials": 1}
    doc["train"]["epochs"] = 2
    spec = tmp_path / "two-workers.yaml"
    spec.write_text(yaml.safe_dump(doc))
    r = run_cli(spec, cache_dir, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "results" / "two-workers"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert sorted(trials["variant"]) == ["clip", "siglip"]
    assert set(trials["status"]) == {"terminated"}
    assert set(trials["loss"]) == {"sigmoid", "softmax"}
    history = pd.read_parquet(exp / "history.parquet")
    for tid in trials["trial_id"]:
        status = json.loads((exp / "trials" / tid / "status.json").read_text())
        assert status["world_size"] == 2
        h = history[history["trial_id"] == tid].sort_values("step")
        assert list(h["step"]) == [0, 3, 6]  # 48 images / global batch 16, over 2 workers
        assert list(h["samples_seen"]) == [0, 48, 96]
        loss = h["train_loss"].iloc[1:]
        assert loss.notna().all() and (loss > 0).all() and loss.map(math.isfinite).all()
        assert h["val_top1"].between(0, 1).all() and h["val_top5"].between(0, 1).all()
        assert (h["val_top5"] >= h["val_top1"]).all()
        bias = h["logit_bias"]
        variant = trials.set_index("trial_id").loc[tid, "variant"]
        # The sigmoid loss trains the bias; the softmax loss leaves it where it was.
        assert (bias.iloc[-1] != bias.iloc[0]) == (variant == "siglip")
