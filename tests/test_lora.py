"""LoRA as a variant (`peft:`, Hugging Face peft) and the family seam it stands on.

- every family entry covers its model: each parameter in a tower (or the temperature and
  bias), the encoder blocks where the LoRA presets look for them;
- every adapter a preset places on the tiny SigLIP, SigLIP 2 and CLIP gets a non-zero
  gradient on its B matrix in the first step (and none under SigLIP's pooling head,
  whose `out_proj` peft would adapt without training it: shown, and refused up front);
- weights outside the adapters (and the bias under the softmax loss) bit-identical after
  training; micro-batched and checkpointed steps equal one pass; bf16 keeps the adapters
  and their optimizer state in float32;
- a whole trial: small checkpoints (adapters, temperature, bias), a merged `final_model/`
  that plain transformers loads and that evaluates to the trial's final accuracy, the
  adapter beside it in peft's format; resume mid-trial continues the same history; 2
  gloo workers report what 1 does; SigLiT with LoRA on the text tower reads cached
  features; trials.parquet and the report name the settings;
- the spec: a variant's keys as grid axes, the refusals (peft missing, bad targets).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image

from sweeper import adapters
from sweeper import data as D
from sweeper.checkpoint import FINAL_ADAPTER, checkpoint_nbytes
from sweeper.families import FAMILIES
from sweeper.models import DualEncoder, load_pretrained
from sweeper.prepare import with_model_path
from sweeper.recipe import setup_trial
from sweeper.run import main
from sweeper.sink import TrialSink
from sweeper.spec import (
    LORA_PRESETS,
    PeftSpec,
    SpecError,
    TinyModelSpec,
    TrialConfig,
    validate,
)
from sweeper.synthetic import vocabulary
from sweeper.training import (
    enable_gradient_checkpointing,
    loss_fn_for,
    micro_batch_step,
    resolve_precision,
    train_step,
)
from sweeper.trials import resolve_trial, trial_configs
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import TINY, base_doc
from tests.test_siglip2 import _dry_run
from tests.test_training import run, untimed
from tests.test_variants import assert_two_ranks_report_one

pytest.importorskip("peft")

ARCHS = ("siglip", "siglip2", "clip")
_null = contextlib.nullcontext


@functools.cache
def _fresh(arch: str) -> tuple[Any, Any]:
    return FAMILIES[arch].build(TinyModelSpec(**TINY), vocabulary())


def lora_encoder(arch: str, loss: str = "sigmoid", frozen: bool = False,
                 **peft: Any) -> DualEncoder:
    """A fresh tiny model of `arch` with LoRA adapters, in the two-tower wrapper."""
    model = copy.deepcopy(_fresh(arch)[0])
    spec = PeftSpec(**{"r": 4, **peft}).for_variant(frozen)
    torch.manual_seed(0)  # peft draws the A matrices: the same in every encoder built here
    adapters.wrap(model, spec, "variants.lora.peft")
    return DualEncoder(model, loss, frozen).train()


def batch_for(arch: str, n: int = 8, seed: int = 0) -> dict[str, Any]:
    """Random images (two aspect ratios) and texts, preprocessed and collated as training
    does (NaFlex patches for SigLIP 2), labels all distinct."""
    processor = _fresh(arch)[1]
    tf = D.image_transform(processor.image_processor)
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "circle", "square", "a", "photo", "of"]
    items = []
    for i in range(n):
        img = torch.randint(0, 256, (16, 16 + 8 * (i % 2), 3), generator=g, dtype=torch.uint8)
        text = " ".join(words[j] for j in torch.randint(len(words), (2 + i % 4,), generator=g))
        items.append({**tf.inputs(tf.resize_uint8(Image.fromarray(img.numpy()))),
                      "label": i, "text": text,
                      "index": i, "skipped": 0})
    return D.Collate(processor.tokenizer, 16)(items)


def _opt(enc: torch.nn.Module, lr: float = 1e-2, kind: Any = torch.optim.AdamW, **kw: Any):
    opt = kind([p for p in enc.parameters() if p.requires_grad], lr=lr, **kw)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


# --------------------------------------------------------------------------- the family seam


@pytest.mark.parametrize("arch", ARCHS)
def test_family_entry_covers_its_model(arch: str) -> None:
    family = FAMILIES[arch]
    model = copy.deepcopy(_fresh(arch)[0])
    enc = DualEncoder(model, family.default_loss)
    towers = {enc.tower_of(n) for n, _ in enc.named_parameters()}  # raises on a stray one
    assert towers == {"text", "vision", "logit"}
    assert set(family.lora_presets) == set(LORA_PRESETS)
    for t in ("text", "vision"):
        assert len(family.blocks(model, t)) == TINY["num_layers"]
    assert [n for n, _ in model.named_parameters() if family.tower_of(n) is None] == \
        [n for n in (family.scale_param, family.bias_param) if hasattr(model, n)]
    # Full fine-tuning trains every weight (a softmax loss's bias aside), each counted once.
    n = sum(p.numel() for p in {id(p): p for p in enc.parameters()}.values())
    frozen_bias = enc.logit_bias.numel() if family.default_loss == "softmax" else 0
    assert enc.param_counts() == (n - frozen_bias, n)


# --------------------------------------------------------------------------- gradients

PRESET_CASES = [(a, p) for a in ARCHS for p in LORA_PRESETS]


@pytest.mark.parametrize(("arch", "preset"), PRESET_CASES,
                         ids=[f"{a}-{p}" for a, p in PRESET_CASES])
def test_every_preset_adapter_gets_a_gradient_on_B(arch: str, preset: str) -> None:
    enc = lora_encoder(arch, target_modules=preset)
    opt, sched = _opt(enc)
    train_step(enc, batch_for(arch), opt, sched, loss_fn_for("sigmoid"), None, _null)
    b = {n: p for n, p in enc.named_parameters() if "lora_B" in n}
    a = {n: p for n, p in enc.named_parameters() if "lora_A" in n}
    per_block = len(FAMILIES[arch].lora_presets[preset])
    assert len(b) == len(a) == 2 * TINY["num_layers"] * per_block
    no_grad = [n for n, p in b.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    # B starts at zero, so A's first gradient is zero: B is what shows an adapter trains.
    assert all(p.grad is None or not p.grad.any() for p in a.values())
    assert not any(".head." in n for n in b)


def test_the_pooling_head_trap_is_real_and_refused() -> None:
    """peft adapts the MultiheadAttention's `out_proj` when asked (its name matches), and
    that adapter gets no gradient: the model's forward never calls it. sweeper refuses to
    place it, naming it; the encoder's `self_attn.out_proj` is fine."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(_fresh("siglip")[0])
    get_peft_model(model, LoraConfig(r=4, target_modules=["out_proj"]))
    enc = DualEncoder(model, "sigmoid")
    opt, sched = _opt(enc)
    train_step(enc, batch_for("siglip"), opt, sched, loss_fn_for("sigmoid"), None, _null)
    grads = {n: p.grad for n, p in enc.named_parameters() if "lora_B" in n}
    head = "model.vision_model.head.attention.out_proj.lora_B.default.weight"
    assert grads[head] is None  # the trap: it would never train
    assert all(g is not None and g.any() for n, g in grads.items() if n != head)

    fresh = copy.deepcopy(_fresh("siglip")[0])
    family = FAMILIES["siglip"]

    def targets(names: Any, towers: tuple[str, ...] = ("text", "vision")) -> list[str]:
        spec = PeftSpec(target_modules=names, towers=list(towers))
        return adapters.target_modules(fresh, family, spec, "variants.x.peft")

    with pytest.raises(SpecError, match=r"target_modules\[0\]: 'out_proj' names "
                       r"vision_model\.head\.attention\.out_proj, inside the torch\.nn\."
                       r"MultiheadAttention vision_model\.head\.attention"):
        targets(["out_proj"])
    with pytest.raises(SpecError, match=r"\[1\]: 'vision_model.head.attention' names .* "
                                        r"a MultiheadAttention"):
        targets(["q_proj", "vision_model.head.attention"])
    with pytest.raises(SpecError, match=r"\[0\]: 'qkv' names no module of the text and "
                                        r"vision towers of SigLIP"):
        targets(["qkv"])
    assert len(targets(["self_attn.out_proj"])) == 2 * TINY["num_layers"]
    assert targets(["out_proj"], ("text",)) == ["text_model.encoder.layers.0.self_attn.out_proj"]
    assert adapters.bypassed_modules(fresh) == {
        "vision_model.head.attention.out_proj": "vision_model.head.attention"}


# --------------------------------------------------------------------------- steps


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_weights_outside_the_adapters_stay_bit_identical(loss: str) -> None:
    enc = lora_encoder("siglip", loss, target_modules="all-linear")
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt, sched = _opt(enc, weight_decay=0.1)
    for seed in range(3):
        train_step(enc, batch_for("siglip", seed=seed), opt, sched, loss_fn_for(loss), 1.0,
                   _null)
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if "lora_" in n}
    assert moved == lora | {"model.logit_scale"} | ({"logit_bias"} if loss == "sigmoid"
                                                    else set())
    assert {n for n, p in enc.named_parameters() if p.requires_grad} >= moved


@pytest.mark.parametrize("frozen", [False, True])
def test_micro_batches_and_checkpointing_equal_one_pass(frozen: bool) -> None:
    grads = []
    for step, ckpt in ((train_step, False),
                       (functools.partial(micro_batch_step, micro_batch_size=4), False),
                       (functools.partial(micro_batch_step, micro_batch_size=4), True)):
        enc = lora_encoder("siglip", frozen=frozen)
        if ckpt:
            enable_gradient_checkpointing(enc.model)
        opt, sched = _opt(enc, lr=0.0, kind=torch.optim.SGD)
        step(enc, batch_for("siglip", n=12), opt, sched, loss_fn_for("sigmoid"), None, _null)
        grads.append({n: p.grad for n, p in enc.named_parameters() if p.grad is not None})
    assert any("vision" in n for n in grads[0]) != frozen
    scale = max(g.abs().max().item() for g in grads[0].values())
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n, g in grads[0].items():
            torch.testing.assert_close(other[n], g, rtol=1e-5, atol=1e-5 * scale, msg=n)


def test_bf16_keeps_adapters_and_their_optimizer_state_in_float32() -> None:
    enc = lora_encoder("siglip")
    opt, sched = _opt(enc)
    device = torch.device("cpu")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    assert resolve_precision("bf16", device) == "bf16"
    loss = train_step(enc, batch_for("siglip"), opt, sched, loss_fn_for("sigmoid"), None,
                      autocast)
    assert torch.isfinite(loss)
    trained = [p for p in enc.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    assert all(v.dtype == torch.float32 for p in trained
               for v in opt.state[p].values() if v.ndim)


# --------------------------------------------------------------------------- whole trials

# 4 classes x 12 images = 48 training images: 3 steps per epoch at batch 16.
LORA = {"r": 4, "alpha": 8, "target_modules": "attention"}


def lora_cfg(tmp_path: Path, variant: str = "lora", **train: Any) -> TrialConfig:
    doc = base_doc(tmp_path)
    doc["variants"] = {"lora": {"peft": LORA},
                       "siglit-lora": {"freeze_vision": True, "peft": LORA},
                       "siglip": {}}
    doc["train"].update({"lr": 3e-3, **train})
    return resolve_trial(validate(doc), {"variant": variant, "text_source": "templates",
                                         "batch_size": 16, "n_train_classes": 4, "seed": 0})


@pytest.fixture(scope="module")
def lora_trial(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Any]:
    """One LoRA trial on the pretrained tiny preset: 2 epochs, evaluated every 2 steps,
    its checkpoints kept, its final model saved; laid out as an experiment folder."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = with_model_path(lora_cfg(tmp, epochs=2, save_final=True), cache_dir)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every_steps": 2})})
    trial_dir = tmp / "exp" / "trials" / cfg.trial_id
    TrialSink(trial_dir).write_config(cfg.model_dump(mode="json"))
    final, reports, ckpts = run(cfg, trial_dir, cache_dir, keep=tmp / "ck")
    return {"cfg": cfg, "dir": trial_dir, "final": final, "reports": reports,
            "ckpts": ckpts, "tmp": tmp}


def test_lora_trial_saves_small_checkpoints(lora_trial: dict[str, Any]) -> None:
    t = lora_trial
    assert t["final"]["status"] == "terminated"
    assert [r["step"] for r in t["reports"]] == [0, 2, 4, 6]
    saved = torch.load(t["ckpts"][6] / "state.pt", weights_only=True)["model"]
    assert saved and all("lora_" in k or k in ("model.logit_scale", "logit_bias")
                         for k in saved), sorted(saved)
    status = TrialSink(t["dir"]).status()
    model, _ = load_pretrained(t["cfg"].model_path)
    full = DualEncoder(model, "sigmoid")
    n_full = sum(p.numel() for p in full.parameters())
    assert status["total_params"] > n_full  # the adapters come on top
    assert status["trainable_params"] == sum(v.numel() for v in saved.values())
    written = sum(f.stat().st_size for f in t["ckpts"][6].iterdir())
    full_bytes = sum(checkpoint_nbytes(full).values())
    assert written < 0.2 * full_bytes, (written, full_bytes)


def test_merged_final_model_loads_plainly_and_scores_the_final_accuracy(
        lora_trial: dict[str, Any], cache_dir: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    t = lora_trial
    final_dir = t["dir"] / "final_model"
    plain, info = AutoModel.from_pretrained(final_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    # The merged model, evaluated as any checkpoint: the trial's last evaluation.
    cfg = t["cfg"].model_copy(update={"peft": None, "model_path": str(final_dir)})
    parts = setup_trial(cfg, WorkerContext(trial_dir=t["tmp"] / "eval", cache_dir=cache_dir))
    merged = parts.model.state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in plain.state_dict().items())
    m = parts.evaluate()
    last = t["reports"][-1]
    assert m["val_top1"] == last["val_top1"] and m["val_top5"] == last["val_top5"]
    assert last["val_top1"] != t["reports"][0]["val_top1"] or \
        last["train_loss"] != t["reports"][1]["train_loss"]  # it trained
    # The adapter beside it, in peft's format, on the pretrained model: the same weights.
    adapter_dir = t["dir"] / FINAL_ADAPTER
    base, _ = load_pretrained(t["cfg"].model_path)
    again = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    for k, v in again.state_dict().items():
        if "logit_" not in k:
            torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6, msg=k)
    logit = load_file(adapter_dir / adapters.LOGIT_FILE)
    assert logit["logit_scale"].item() == merged["logit_scale"].item()


def test_lora_trial_resumes_mid_trial_with_the_same_history(
        lora_trial: dict[str, Any], cache_dir: Path, tmp_path: Path) -> None:
    t = lora_trial
    again_dir = tmp_path / "again"
    shutil.copytree(t["dir"], again_dir)
    shutil.rmtree(again_dir / "final_model")
    resumed, reports, _ = run(t["cfg"], again_dir, cache_dir, resume_from=t["ckpts"][2])
    assert [r["step"] for r in reports] == [4, 6]
    assert [untimed(r) for r in reports] == [untimed(r) for r in t["reports"][2:]]
    assert untimed(resumed) == untimed(t["final"])


def test_trials_parquet_and_report_name_the_lora_settings(lora_trial: dict[str, Any]) -> None:
    from analysis.collect import read_experiment, trials_table
    from analysis.report import write_report

    exp = lora_trial["dir"].parent.parent
    row = trials_table(read_experiment(exp)).to_pylist()[0]
    status = TrialSink(lora_trial["dir"]).status()
    assert row["peft_method"] == "lora" and row["lora_r"] == 4 and row["lora_alpha"] == 8.0
    assert row["lora_targets"] == "attention" and row["lora_towers"] == "text,vision"
    assert row["trainable_params"] == status["trainable_params"] < row["total_params"]
    write_report(exp)
    report = (exp / "report.md").read_text()
    assert "LoRA (Hugging Face peft) in variant `lora`: rank 4, alpha 8, targets `attention` " \
           "on the text and vision tower(s)" in report


def test_siglit_lora_adapts_the_text_tower_on_cached_features(tmp_path: Path,
                                                              cache_dir: Path) -> None:
    cfg = lora_cfg(tmp_path, "siglit-lora")
    assert cfg.peft.towers == ["text"]
    final, _, _ = run(cfg, tmp_path / "trial", cache_dir)
    status = TrialSink(tmp_path / "trial").status()
    assert final["status"] == "terminated" and status["inputs"] == "features"
    ckpt_cfg = with_model_path(cfg, cache_dir)
    parts = setup_trial(ckpt_cfg, WorkerContext(trial_dir=tmp_path / "p", cache_dir=cache_dir))
    trained = {n for n, p in parts.enc.named_parameters() if p.requires_grad}
    assert trained and all("text_model" in n or "logit_" in n for n in trained)
    assert status["trainable_params"] == sum(
        p.numel() for p in parts.enc.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- 2 processes

WORLD = 2


def _dist_worker(rank: int, init_file: str, out: str, cfg_json: str, cache_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        reports: list[dict] = []
        run_trial(TrialConfig.model_validate_json(cfg_json),
                  WorkerContext(rank=rank, world_size=WORLD, trial_dir=Path(out) / "trial",
                                cache_dir=Path(cache_dir),
                                report=lambda m, ck: reports.append(m)))
        torch.save(reports, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_workers_report_what_one_does(lora_trial: dict[str, Any], cache_dir: Path,
                                          tmp_path: Path) -> None:
    """The module's trial again on 2 gloo processes, each drawing half of every global
    batch: the same history as the one process's."""
    cfg = lora_trial["cfg"]
    cfg = cfg.model_copy(update={
        "scaling": cfg.scaling.model_copy(update={"num_workers": WORLD}),
        "train": cfg.train.model_copy(update={"save_final": False})})
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path), cfg.model_dump_json(),
                                 str(cache_dir)), nprocs=WORLD, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
                    for r in range(WORLD))
    one = lora_trial["reports"]
    assert [r["step"] for r in rank0] == [r["step"] for r in one] == [0, 2, 4, 6]
    assert_two_ranks_report_one(rank0, rank1, one)


# --------------------------------------------------------------------------- the spec


def _doc(tmp_path: Path, **peft: Any) -> dict:
    doc = base_doc(tmp_path)
    doc["variants"] = {"siglip": {}, "siglip-lora": {"peft": {**LORA, **peft}}}
    doc["grid"]["variant"] = ["siglip", "siglip-lora"]
    return doc


def test_a_variants_keys_are_grid_axes(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    doc["grid"]["variant"] = ["siglip-lora"]
    doc["grid"]["variants.siglip-lora.peft.r"] = [4, 8, 16]
    doc["grid"]["variants.siglip-lora.peft.target_modules"] = ["attention", "all-linear"]
    trials = trial_configs(validate(doc))
    assert len(trials) == 6 and len({t.trial_id for t in trials}) == 6
    assert sorted((t.peft.r, t.peft.target_modules) for t in trials) == sorted(
        (r, p) for r in (4, 8, 16) for p in ("attention", "all-linear"))
    assert all(t.peft.alpha == 8 and t.peft.towers == ["text", "vision"] for t in trials)
    assert "r16" in {t.trial_id.split("-")[-2] for t in trials}


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["grid"].update({"variants.siglip-lora.peft.r": [4, 8]}),
     "grid.variants.siglip-lora.peft.r: changes variant 'siglip-lora' only, but grid.variant "
     "also runs 'siglip'"),
    (lambda d: d["grid"].update({"variant": ["siglip-lora"],
                                 "variants.siglip-lora.peft.r": [4, 0]}),
     "grid.variants.siglip-lora.peft.r[1]: variants.siglip-lora.peft.r: Input should be "
     "greater than or equal to 1"),
    (lambda d: d["grid"].update({"variants.nope.peft.r": [4]}),
     "grid.variants.nope.peft.r: names no key of a defined variant"),
    (lambda d: d["variants"]["siglip-lora"]["peft"].update({"target_modules": "mlp"}),
     "variants.siglip-lora.peft.target_modules: 'mlp' is not a preset (attention, "
     "all-linear)"),
    (lambda d: d["variants"]["siglip-lora"].update({"freeze_vision": True}) or
     d["variants"]["siglip-lora"]["peft"].update({"towers": ["text", "vision"]}),
     "variants.siglip-lora: peft.towers: vision is frozen"),
    (lambda d: d["variants"]["siglip-lora"]["peft"].update({"method": "ia3"}),
     "variants.siglip-lora.peft.method: Input should be 'lora'"),
])
def test_bad_peft_specs_are_refused(change: Any, message: str, tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    change(doc)
    with pytest.raises(SpecError) as e:
        validate(doc)
    assert str(e.value).startswith(message), str(e.value)


def test_dry_run_refuses_peft_missing_and_a_bypassed_target(tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    doc = _doc(tmp_path, target_modules=["q_proj", "out_proj"])
    err = _dry_run(tmp_path, capsys, doc)
    assert err.startswith("variants.siglip-lora.peft.target_modules[1]: 'out_proj' names "
                          "vision_model.head.attention.out_proj"), err
    monkeypatch.setattr(adapters, "installed", lambda: False)
    err = _dry_run(tmp_path, capsys, doc)
    assert err == ('variants.siglip-lora.peft: needs Hugging Face peft, which is not '
                   'installed (pip install -e ".[peft]", or pip install peft)')
    doc["grid"]["variant"] = ["siglip"]  # a peft variant the sweep does not run: fine
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main([str(p), "--dry-run"]) == 0
