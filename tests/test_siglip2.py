"""SigLIP 2 (NaFlex and FixRes), other two-tower families, and the refusal of checkpoints
sweeper does not support.

- NaFlex preprocessing equals Hugging Face's `Siglip2ImageProcessor` (any aspect ratio, any
  patch budget), through the dataset, collate and loader training uses;
- a NaFlex trial hands its vision tower the processor's inputs (patches, mask, spatial
  shapes) under `model.max_num_patches`, in training, zero-shot and retrieval alike, and the
  text tower no attention mask; a frozen NaFlex tower on cached features equals decoding;
- FixRes: the text lower-cased and padded to 64 as the model card says;
- MetaCLIP 2 through the same `DualEncoder`;
- refused before any trial (`--dry-run`, exit 2, one line): a vision-only, a text-only and a
  captioning checkpoint, processors that cannot make what their model takes, settings a
  NaFlex model cannot take, retrieval without val captions;
- (slow) NaFlex and FixRes trials through the CLI on 2 Ray Train workers.

The checkpoints are random tiny models saved with `save_pretrained` (`siglip2_checkpoints`
in conftest).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from sweeper import data as D
from sweeper import families
from sweeper.models import (
    DualEncoder,
    forward_inputs,
    image_inputs,
    load_pretrained,
    text_max_length,
)
from sweeper.run import main
from sweeper.spec import TrialConfig, validate
from sweeper.trials import resolve_trial
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import base_doc

VARIANTS = {"siglip": {"loss": "sigmoid", "freeze_vision": False},
            "siglit": {"loss": "sigmoid", "freeze_vision": True},
            "clip": {"loss": "softmax", "freeze_vision": False},
            "lit": {"loss": "softmax", "freeze_vision": True}}
RETRIEVAL = [f"val_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
SIZES = [(16, 16), (20, 40), (37, 13), (9, 50), (64, 24)]  # (height, width)


def _images(seed: int = 0) -> list[Image.Image]:
    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _cfg(tmp_path: Path, ckpt: Path, variant: str, model: dict | None = None,
         **data: object) -> TrialConfig:
    doc = base_doc(tmp_path)
    doc["model"] = {"pretrained": str(ckpt), **(model or {})}
    doc["variants"] = VARIANTS
    doc["data"].update(data)
    return resolve_trial(validate(doc), {"variant": variant, "text_source": "templates",
                                         "batch_size": 16, "n_train_classes": 4, "seed": 0})


def _run(cfg: TrialConfig, trial_dir: Path, cache_dir: Path) -> tuple[dict, list[dict]]:
    reports: list[dict] = []
    ctx = WorkerContext(trial_dir=trial_dir, cache_dir=cache_dir,
                        report=lambda m, ck: reports.append(m))
    return run_trial(cfg, ctx), reports


# --------------------------------------------------------------------------- NaFlex


def test_naflex_preprocessing_equals_the_hf_processor(siglip2_checkpoints, tmp_path) -> None:
    from transformers import AutoProcessor

    ip = AutoProcessor.from_pretrained(siglip2_checkpoints["naflex"]).image_processor
    assert type(ip).__name__.startswith("Siglip2ImageProcessor")
    images = _images()
    for budget in (None, 9, 16):
        tf = D.image_transform(ip, budget)
        assert isinstance(tf, D.PatchTransform)
        theirs = ip(images=images, return_tensors="pt",
                    max_num_patches=budget or ip.max_num_patches)
        for i, img in enumerate(images):
            ours = tf(img)
            assert set(ours) == set(families.IMAGE_KEYS)
            torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"][i],
                                       rtol=0, atol=1e-5)
            assert torch.equal(ours["pixel_attention_mask"], theirs["pixel_attention_mask"][i])
            assert torch.equal(ours["spatial_shapes"], theirs["spatial_shapes"][i])
    # The budget is used: a 20 x 40 image is 1 x 2 patches in 4, 2 x 4 in 9 or 16.
    assert D.image_transform(ip)(images[1])["spatial_shapes"].tolist() == [1, 2]
    assert D.image_transform(ip, 9)(images[1])["spatial_shapes"].tolist() == [2, 4]

    # The same through the dataset, collate and loader that training uses.
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    samples = [D.Sample(str(tmp_path / f"{i}.png"), 0) for i in range(len(images))]
    ds = D.ImageTextDataset(samples, ["x"], D.image_transform(ip, 9), ["a {}"], "templates", 0)
    tok = AutoProcessor.from_pretrained(siglip2_checkpoints["naflex"]).tokenizer
    batch = next(iter(D.make_loader(ds, [[(i, 0) for i in range(len(samples))]],
                                    D.Collate(tok, 16), 0)))
    theirs = ip(images=[Image.open(s.path) for s in samples], return_tensors="pt",
                max_num_patches=9)
    assert batch["pixel_values"].shape == (len(samples), 9, 8 * 8 * 3)
    torch.testing.assert_close(batch["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(batch["pixel_attention_mask"], theirs["pixel_attention_mask"])
    assert torch.equal(batch["spatial_shapes"], theirs["spatial_shapes"])


def test_naflex_embeddings_are_the_models_own(siglip2_checkpoints) -> None:
    """`DualEncoder` on a collated batch gives the normalised features the model gives the
    processor's own output."""
    from transformers import AutoProcessor

    model, processor = load_pretrained(siglip2_checkpoints["naflex"])
    assert type(model).__name__ == "Siglip2Model"
    enc = DualEncoder(model, "sigmoid").eval()
    tf = D.image_transform(processor.image_processor, 9)
    texts = ["A Red circle", "a green square near the top", "a blue bar"]
    items = [{**tf(img), "label": 0, "text": t, "index": i, "skipped": 0}
             for i, (img, t) in enumerate(zip(_images()[:3], texts, strict=True))]
    batch = D.Collate(processor.tokenizer, text_max_length(model, processor))(items)
    with torch.no_grad():
        img, txt, _, _ = enc(**forward_inputs(batch))
        hf_processor = AutoProcessor.from_pretrained(siglip2_checkpoints["naflex"])
        # (Siglip2Processor's own call would impose its default 16-pixel patches.)
        hf = {**hf_processor.image_processor(images=_images()[:3], max_num_patches=9,
                                             return_tensors="pt"),
              **hf_processor.tokenizer([t.lower() for t in texts], padding="max_length",
                                       max_length=16, return_tensors="pt")}
        want_img = model.get_image_features(
            pixel_values=hf["pixel_values"], pixel_attention_mask=hf["pixel_attention_mask"],
            spatial_shapes=hf["spatial_shapes"]).pooler_output
        want_txt = model.get_text_features(input_ids=hf["input_ids"]).pooler_output
    torch.testing.assert_close(img, torch.nn.functional.normalize(want_img, dim=-1),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, torch.nn.functional.normalize(want_txt, dim=-1),
                               rtol=0, atol=1e-5)
    assert set(image_inputs(batch)) == set(families.IMAGE_KEYS)


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Records the inputs every vision and text tower call of `Siglip2Model` receives."""
    from transformers import Siglip2Model

    seen: dict[str, list] = {"image": [], "text": []}
    image, text = Siglip2Model.get_image_features, Siglip2Model.get_text_features

    def on_image(self, *args, **kwargs):
        seen["image"].append({k: tuple(v.shape) for k, v in kwargs.items()})
        return image(self, *args, **kwargs)

    def on_text(self, *args, **kwargs):
        seen["text"].append(set(kwargs))
        return text(self, *args, **kwargs)

    monkeypatch.setattr(Siglip2Model, "get_image_features", on_image)
    monkeypatch.setattr(Siglip2Model, "get_text_features", on_text)
    return seen


def test_naflex_trial_trains_and_evaluates_on_the_processor_inputs(
        siglip2_checkpoints, cache_dir: Path, tmp_path: Path, spy) -> None:
    cfg = _cfg(tmp_path, siglip2_checkpoints["naflex"], "siglip", {"max_num_patches": 9})
    final, reports = _run(cfg, tmp_path / "trial", cache_dir)
    assert final["status"] == "terminated" and [r["step"] for r in reports] == [0, 3]
    assert math.isfinite(reports[-1]["train_loss"])
    assert reports[-1]["logit_bias"] != reports[0]["logit_bias"]  # its own bias, trained
    # Training (batches of 16) and evaluation (the val set, 48 images, in one batch) alike:
    # 9-patch sequences with their mask and shapes; the text tower never gets a mask.
    shapes = {tuple(sorted(c.items())) for c in spy["image"]}
    assert shapes == {(("pixel_attention_mask", (b, 9)), ("pixel_values", (b, 9, 192)),
                       ("spatial_shapes", (b, 2))) for b in (16, 48)}
    assert spy["text"] and all(s == {"input_ids"} for s in spy["text"])
    for r in reports:
        assert all(0 <= r[k] <= 1 for k in [*RETRIEVAL, "val_mean_per_class_recall"])
    history = [json.loads(x) for x in (tmp_path / "trial" / "history.jsonl").read_text()
               .splitlines()]
    assert [h["val_i2t_r1"] for h in history] == [r["val_i2t_r1"] for r in reports]


def test_naflex_frozen_tower_on_cached_features_equals_decoding(
        siglip2_checkpoints, cache_dir: Path, tmp_path: Path) -> None:
    runs = {}
    for cached in (False, True):
        cfg = _cfg(tmp_path, siglip2_checkpoints["naflex"], "lit", {"max_num_patches": 9},
                   cache_features=cached, cache_dir=str(tmp_path / "store"))
        final, runs[cached] = _run(cfg, tmp_path / f"trial-{cached}", cache_dir)
        assert final["status"] == "terminated"
    metas = [json.loads(p.read_text()) for p in (tmp_path / "store").glob("features/*/meta.json")]
    assert sorted(m["split"] for m in metas) == ["train", "val"]
    assert all(m["transform"]["max_num_patches"] == 9 for m in metas)
    for a, b in zip(runs[False], runs[True], strict=True):
        for k in ("train_loss", "val_top1", "val_mean_per_class_recall", *RETRIEVAL):
            if a[k] is None:
                assert b[k] is None
            else:
                assert b[k] == pytest.approx(a[k], abs=1e-4), k


@pytest.mark.parametrize(("loss", "frozen"), [("sigmoid", False), ("softmax", True)])
def test_naflex_micro_batches_equal_one_pass(loss: str, frozen: bool,
                                             siglip2_checkpoints) -> None:
    """`train.micro_batch_size` on NaFlex batches: the patch mask and spatial shapes are
    sliced with the pixels, and the gradients are the one-pass step's."""
    from sweeper.training import loss_fn_for, micro_batch_step, train_step

    model, processor = load_pretrained(siglip2_checkpoints["naflex"])
    tf = D.image_transform(processor.image_processor, 9)
    texts = ["a red circle", "a green square near the top", "a blue bar", "a big star"]
    items = [{**tf(img), "label": i % 4, "text": texts[i % 4], "index": i, "skipped": 0}
             for i, img in enumerate(_images() + _images(1) + _images(2)[:2])]
    batch = D.Collate(processor.tokenizer, 16)(items)  # 12 samples, 5 aspect ratios
    grads = []
    for step in (train_step, functools.partial(micro_batch_step, micro_batch_size=4)):
        enc = DualEncoder(copy.deepcopy(model), loss, frozen).train()
        params = [p for p in enc.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        step(enc, batch, opt, sched, loss_fn_for(loss), None, _null)
        grads.append({n: p.grad for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("vision" in n for n in grads[0]) != frozen
    # To 1e-5 of each tensor, or of the largest gradient where the true one is ~0 (as in
    # tests/test_microbatch.py: float32 sums in another order).
    scale = max(g.abs().max().item() for g in grads[0].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-5 * scale, msg=n)


def test_tiny_siglip2_preset_is_built_and_pretrained_offline(cache_dir: Path) -> None:
    """`model.pretrained: tiny-siglip2` resolves to a SigLIP 2 NaFlex checkpoint pretrained
    here (a one-epoch recipe of 2 steps: how well the default recipe learns is in
    docs/models.md)."""
    from sweeper.prepare import resolve_checkpoint
    from sweeper.spec import ModelSpec, TinyModelSpec
    from tests.conftest import TINY

    tiny = TinyModelSpec(**{**TINY, "pretrain_epochs": 1, "pretrain_per_class": 2})
    path = Path(resolve_checkpoint(ModelSpec(pretrained="tiny-siglip2", tiny=tiny), cache_dir))
    assert path.name.startswith("siglip2-tiny-")
    stats = json.loads((path / "pretraining.json").read_text())
    assert stats["steps"] == 2 and math.isfinite(stats["final_loss"])
    model, processor = load_pretrained(path)
    assert type(model).__name__ == "Siglip2Model"
    assert D.is_patch_processor(processor.image_processor)
    assert type(processor.tokenizer).__name__ == "Siglip2Tokenizer"
    assert families.lowercases(processor.tokenizer)
    assert model.logit_bias.item() != 0.0  # from the paper's -10, one step on


def _null():
    import contextlib

    return contextlib.nullcontext()


# --------------------------------------------------------------------------- FixRes


def test_fixres_text_is_lowercased_and_padded_to_64(siglip2_checkpoints, monkeypatch) -> None:
    from transformers import AutoTokenizer, SiglipModel

    raw = AutoTokenizer.from_pretrained(siglip2_checkpoints["fixres"])
    assert type(raw).__name__ == "GemmaTokenizer" and not families.lowercases(raw)
    assert raw("A RED Circle")["input_ids"] != raw("a red circle")["input_ids"]

    model, processor = load_pretrained(siglip2_checkpoints["fixres"])
    tok = processor.tokenizer
    assert type(model).__name__ == "SiglipModel"
    assert families.family_of("siglip", type(tok).__name__).label == "SigLIP 2 FixRes"
    assert families.family_of("siglip", "SiglipTokenizer").lowercase is False  # SigLIP 1
    assert tok("A RED Circle")["input_ids"] == tok("a red circle")["input_ids"]
    max_len = text_max_length(model, processor)
    assert max_len == 64
    tf = D.image_transform(processor.image_processor)
    assert isinstance(tf, D.ImageTransform) and tf.output_size == (16, 16)
    items = [{**tf.inputs(np.zeros((16, 16, 3), np.uint8)), "label": 0, "text": t, "index": 0,
              "skipped": 0} for t in ("A Red Circle", "a red circle near the top")]
    batch = D.Collate(tok, max_len)(items)
    ids = batch["input_ids"]
    assert ids.shape == (2, 64)
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    assert words[:4] == ["a", "\u2581red", "\u2581circle", "<eos>"] and set(words[4:]) == {"<pad>"}

    seen: list[set[str]] = []
    original = SiglipModel.get_text_features

    def on_text(self, *args, **kwargs):
        seen.append(set(kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SiglipModel, "get_text_features", on_text)
    DualEncoder(model, "sigmoid")(**forward_inputs(batch))
    assert seen == [{"input_ids"}]  # SigLIP pools the last, padded token: no mask


# --------------------------------------------------------------------------- other families


def test_metaclip2_runs_through_the_same_encoder(monkeypatch) -> None:
    from transformers import MetaClip2Config, MetaClip2Model

    from sweeper.training import loss_fn_for, train_step

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2)
    config = MetaClip2Config(
        text_config=dict(vocab_size=40, max_position_embeddings=8, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, **tower),
        vision_config=dict(image_size=16, patch_size=8, **tower), projection_dim=32)
    torch.manual_seed(0)
    model = MetaClip2Model(config)
    assert families.family_of(model.config.model_type).text_mask
    enc = DualEncoder(model, "sigmoid")  # no bias of its own: a new one at -10
    assert enc.logit_bias.item() == -10.0 and model.logit_bias is enc.logit_bias
    ids = torch.randint(4, 40, (4, 8))
    ids[:, 5], ids[:, 6:] = 3, 0
    mask = (torch.arange(8) < 6).long().expand(4, 8)
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "input_ids": ids,
             "attention_mask": mask, "labels": torch.arange(4)}
    seen: list[set[str]] = []
    original = MetaClip2Model.get_text_features
    monkeypatch.setattr(MetaClip2Model, "get_text_features",
                        lambda self, **kw: (seen.append(set(kw)), original(self, **kw))[1])
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = enc.logit_bias.item()
    loss = train_step(enc, batch, opt, sched, loss_fn_for("sigmoid"), 1.0, _null).item()
    assert math.isfinite(loss) and enc.logit_bias.item() != before
    assert seen == [{"input_ids", "attention_mask"}]


# --------------------------------------------------------------------------- refusals


def _dry_run(tmp_path: Path, capsys, doc: dict) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main([str(p), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "results").exists()
    return lines[0].removeprefix("error: ")


def _doc(tmp_path: Path, pretrained: Path | str, **model: object) -> dict:
    doc = base_doc(tmp_path)
    doc["model"] = {"pretrained": str(pretrained), **model}
    return doc


def _config_only(tmp_path: Path, config) -> Path:
    d = tmp_path / "ckpt"
    config.save_pretrained(d)
    return d


def _not_two_tower():
    from transformers import BertConfig, BlipConfig, SiglipVisionConfig, ViTConfig

    return {"vit": ViTConfig(architectures=["ViTModel"]),
            "bert": BertConfig(architectures=["BertModel"]),
            "blip": BlipConfig(architectures=["BlipForConditionalGeneration"]),
            "siglip_vision_model": SiglipVisionConfig(architectures=["SiglipVisionModel"])}


@pytest.mark.parametrize("model_type", ["vit", "bert", "blip", "siglip_vision_model"])
def test_a_checkpoint_that_is_not_two_tower_is_refused(model_type: str, tmp_path: Path,
                                                      capsys) -> None:
    config = _not_two_tower()[model_type]
    d = _config_only(tmp_path, config)
    msg = _dry_run(tmp_path, capsys, _doc(tmp_path, d))
    arch = config.architectures[0]
    assert msg.startswith(f"model.pretrained: '{d}' is a '{model_type}' checkpoint ({arch}), "
                          "not a two-tower image-text model sweeper supports; supported model "
                          "types: siglip (SigLIP / SigLIP 2 FixRes), siglip2 (SigLIP 2 NaFlex),")


def _mixed(tmp_path: Path, model_dir: Path, processor_dir: Path) -> Path:
    """A checkpoint whose model is `model_dir`'s and whose processor is `processor_dir`'s."""
    d = tmp_path / "mixed"
    shutil.copytree(processor_dir, d)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / f, d / f)
    return d


@pytest.mark.parametrize(("model", "processor", "expect"), [
    ("naflex", "fixres", "is a SigLIP 2 NaFlex (siglip2) checkpoint, whose image processor "
                         "SiglipImageProcessorPil makes fixed-size images, not the patch "
                         "sequences it takes"),
    ("fixres", "naflex", "is a SigLIP 2 FixRes (siglip) checkpoint, whose image processor "
                         "Siglip2ImageProcessorPil makes NaFlex patch sequences, not the "
                         "fixed-size images it takes"),
])
def test_a_processor_that_cannot_feed_its_model_is_refused(
        model: str, processor: str, expect: str, siglip2_checkpoints, tmp_path, capsys) -> None:
    d = _mixed(tmp_path, siglip2_checkpoints[model], siglip2_checkpoints[processor])
    assert _dry_run(tmp_path, capsys, _doc(tmp_path, d)).startswith(
        f"model.pretrained: '{d}' {expect}")


def test_other_processor_mismatches_are_refused(siglip2_checkpoints, tmp_path, capsys) -> None:
    d = tmp_path / "big"
    shutil.copytree(siglip2_checkpoints["fixres"], d)
    cfg = json.loads((d / "processor_config.json").read_text())
    cfg["image_processor"]["size"] = {"height": 24, "width": 24}
    (d / "processor_config.json").write_text(json.dumps(cfg))
    assert _dry_run(tmp_path, capsys, _doc(tmp_path, d)).endswith(
        "whose image processor makes 24x24 images but its vision tower takes 16x16")
    d = tmp_path / "no-tokenizer"
    shutil.copytree(siglip2_checkpoints["naflex"], d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    assert _dry_run(tmp_path, capsys, _doc(tmp_path, d)).endswith(
        "without a tokenizer (no tokenizer_config.json or tokenizer.json)")


def test_naflex_settings_are_refused_where_they_do_not_apply(siglip2_checkpoints, tmp_path,
                                                             capsys) -> None:
    fixres, naflex = siglip2_checkpoints["fixres"], siglip2_checkpoints["naflex"]
    msg = _dry_run(tmp_path, capsys, _doc(tmp_path, fixres, max_num_patches=64))
    assert msg.startswith(f"model.max_num_patches: '{fixres}' is a SigLIP 2 FixRes checkpoint")
    assert _dry_run(tmp_path, capsys, _doc(tmp_path, "tiny", max_num_patches=64)).startswith(
        "model.max_num_patches: 'tiny' is a SigLIP checkpoint")
    doc = _doc(tmp_path, naflex)
    doc["data"]["cache_images"] = True
    assert _dry_run(tmp_path, capsys, doc).startswith(
        "data.cache_images: trial siglip-templates-bs16-k4-s0 fine-tunes a SigLIP 2 NaFlex")
    doc = _doc(tmp_path, naflex)
    doc["data"]["augment"] = "flip"
    assert _dry_run(tmp_path, capsys, doc).startswith("data.augment: flip is not supported")
    # A variant may point at a NaFlex model: its trials are checked, the others' not.
    doc = _doc(tmp_path, "tiny")
    doc["data"]["cache_images"] = True
    doc["variants"]["siglip"]["model"] = {"pretrained": str(naflex)}
    doc["grid"]["variant"] = ["siglit", "siglip"]
    assert _dry_run(tmp_path, capsys, doc).startswith("data.cache_images: trial siglip-")


def test_retrieval_true_without_val_captions_is_refused(tmp_path: Path, capsys) -> None:
    from sweeper.synthetic import generate

    root = generate(tmp_path / "data", n_classes=2, train_per_class=2, val_per_class=2,
                    image_size=16)
    doc = base_doc(tmp_path)
    doc["data"] = {"root": str(root), "class_names": "classes.json"}
    doc["grid"]["n_train_classes"] = [1]
    doc["eval"] = {"retrieval": True}
    assert _dry_run(tmp_path, capsys, doc) == \
        "eval.retrieval: true needs captions of val images (data.captions)"
    lines = (root / "captions.jsonl").read_text().splitlines()
    (root / "train-only.jsonl").write_text(
        "\n".join(x for x in lines if json.loads(x)["image"].startswith("train/")))
    doc["data"]["captions"] = "train-only.jsonl"
    assert _dry_run(tmp_path, capsys, doc) == \
        f"eval.retrieval: true, but no val image of {root} has a caption"
    doc["eval"] = {"retrieval": "auto"}  # auto: no val captions, no retrieval, no refusal
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main([str(p), "--dry-run"]) == 0


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_siglip2_trials_through_the_cli(siglip2_checkpoints, tmp_path: Path,
                                        cache_dir: Path) -> None:
    """NaFlex (full and frozen on cached features) and FixRes trials, each on 2 Ray Train
    workers, through the command line: retrieval in the history, trials and report."""
    from tests.test_e2e import run_cli

    naflex, fixres = str(siglip2_checkpoints["naflex"]), str(siglip2_checkpoints["fixres"])
    doc = base_doc(tmp_path, name="siglip2")
    doc["variants"] = {
        "naflex-siglip": {**VARIANTS["siglip"],
                          "model": {"pretrained": naflex, "max_num_patches": 9}},
        "naflex-siglit": {**VARIANTS["siglit"], "model": {"pretrained": naflex}},
        "fixres-siglip": {**VARIANTS["siglip"], "model": {"pretrained": fixres}},
    }
    doc["grid"]["variant"] = list(doc["variants"])
    doc["scaling"] = {"num_workers": 2, "resources_per_worker": {"CPU": 0.9},
                      "max_concurrent_trials": 1}
    spec = tmp_path / "siglip2.yaml"
    spec.write_text(yaml.safe_dump(doc))
    r = run_cli(spec, cache_dir, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "results" / "siglip2"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert set(trials["status"]) == {"terminated"} and len(trials) == 3
    for col in [*RETRIEVAL, "val_mean_per_class_recall"]:
        assert trials[col].between(0, 1).all(), col
    history = pd.read_parquet(exp / "history.parquet")
    assert history[RETRIEVAL].notna().all().all()
    assert "Image-text retrieval" in (exp / "report.md").read_text()
    status = json.loads((exp / "trials" / "naflex-siglip-templates-bs16-k4-s0" /
                         "status.json").read_text())
    assert status["world_size"] == 2
