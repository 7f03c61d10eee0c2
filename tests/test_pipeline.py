"""Synthetic data, the tiny model round trip, one training step, and a whole trial run
in-process through the worker loop (no Ray)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest
import torch

from sweeper import data as D
from sweeper.losses import sigmoid_loss
from sweeper.models import DualEncoder, load_pretrained
from sweeper.prepare import resolve_checkpoint, with_model_path
from sweeper.sink import TrialSink
from sweeper.spec import ModelSpec, TinyModelSpec, validate
from sweeper.synthetic import class_table, generate
from sweeper.training import train_step
from sweeper.trials import resolve_trial
from sweeper.worker import WorkerContext, run_trial
from tests.conftest import SYNTH, TINY, base_doc


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_synthetic_layout_and_determinism(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", n_classes=4, train_per_class=3, val_per_class=2, image_size=16)
    b = generate(tmp_path / "b", n_classes=4, train_per_class=3, val_per_class=2, image_size=16)
    wnids = [w for w, _ in class_table(4)]
    assert sorted(p.name for p in (a / "train").iterdir()) == wnids
    assert all(len(list((a / "val" / w).glob("*.png"))) == 2 for w in wnids)
    assert json.loads((a / "classes.json").read_text()) == dict(class_table(4))
    lines = (a / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 4 * (3 + 2)
    rec = json.loads(lines[0])
    name = dict(class_table(4))[rec["image"].split("/")[1]]
    # Captions mention the class among other words, unlike a bare template.
    assert all(name in c and len(c.split()) > len(name.split()) + 3 for c in rec["captions"])
    assert _digest(a) == _digest(b)
    c = generate(tmp_path / "c", n_classes=4, train_per_class=3, val_per_class=2,
                 image_size=16, seed=1)
    assert _digest(a) != _digest(c)
    # A second call reuses the finished folder.
    mtime = (a / "classes.json").stat().st_mtime_ns
    generate(tmp_path / "a", n_classes=4, train_per_class=3, val_per_class=2, image_size=16)
    assert (a / "classes.json").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):
    spec = ModelSpec(tiny=TinyModelSpec(**TINY))
    return load_pretrained(resolve_checkpoint(spec, cache_dir))


def test_tiny_round_trip_through_auto_classes(tiny, cache_dir: Path) -> None:
    from transformers import AutoModel, AutoProcessor

    model, processor = tiny
    assert type(model).__name__ == "SiglipModel"
    d = next((cache_dir / "models").glob("tiny-*"))
    again = AutoModel.from_pretrained(d)
    proc = AutoProcessor.from_pretrained(d)
    assert proc.tokenizer("a red circle .")["input_ids"] == \
        processor.tokenizer("a red circle .")["input_ids"]
    assert torch.equal(model.logit_scale, again.logit_scale)
    assert set(json.loads((d / "pretraining.json").read_text())) >= {"final_loss", "steps"}


def test_transform_matches_hf_image_processor(tiny, tmp_path: Path) -> None:
    from PIL import Image

    _, processor = tiny
    img = Image.new("RGB", (37, 23), (200, 10, 60))
    ours = D.ImageTransform.from_processor(processor.image_processor)(img)
    theirs = processor.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_pretrained_tiny_beats_chance_zero_shot(tiny, cache_dir: Path) -> None:
    from sweeper.evaluation import class_text_embeddings, image_embeddings, zero_shot_metrics
    from sweeper.synthetic import dataset_dir

    model, processor = tiny
    root = dataset_dir(**SYNTH, cache_dir=cache_dir)
    tf = D.ImageTransform.from_processor(processor.image_processor)
    _, val = D.open_dataset(root, "folder", root / "classes.json", None).load()
    ds = D.ImageTextDataset(val.samples, val.names, tf, ["{}"], "templates", 0)
    loader = D.make_loader(ds, [[(i, 0) for i in range(len(ds))]],
                           D.Collate(processor.tokenizer, 16), 0)
    enc = DualEncoder(model).eval()
    null = contextlib.nullcontext
    img, labels, _, _ = image_embeddings(enc, loader, torch.device("cpu"), null)
    cls = class_text_embeddings(enc, val.names, ["a photo of a {}."], processor.tokenizer, 16,
                                torch.device("cpu"), null)
    top1 = zero_shot_metrics(img, labels, cls, [True] * len(val.names), 1)["val_top1"]
    assert top1 >= 2.0 / len(val.names)  # at least twice chance, even for this toy size


def test_one_step_decreases_loss(tiny) -> None:
    model, processor = tiny
    enc = DualEncoder(model)
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.randn(8, 3, 16, 16),
        "input_ids": processor.tokenizer([f"a photo of a {c} circle." for c in
                                          ["red", "green", "blue", "yellow"] * 2],
                                         padding="max_length", max_length=16,
                                         return_tensors="pt")["input_ids"],
        "labels": torch.arange(8),
    }
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def loss_fn(i, t, s, b, labels):
        return sigmoid_loss(i, t, s, b)

    first = train_step(enc, batch, opt, sched, loss_fn, 1.0, contextlib.nullcontext).item()
    with torch.no_grad():
        i, t, s, b = enc(batch["pixel_values"], batch["input_ids"])
        after = sigmoid_loss(i, t, s, b).item()
    assert after < first


def run_in_process(tmp_path: Path, cache_dir: Path, **grid_train) -> tuple[dict, list[dict]]:
    doc = base_doc(tmp_path)
    doc["train"].update(grid_train)
    spec = validate(doc)
    cfg = resolve_trial(spec, {"variant": "siglit", "text_source": "templates",
                               "batch_size": 16, "n_train_classes": 4, "seed": 0})
    reports: list[dict] = []
    ctx = WorkerContext(trial_dir=tmp_path / "trial", cache_dir=cache_dir,
                        report=lambda m, ck: reports.append(m))
    return run_trial(with_model_path(cfg, cache_dir), ctx), reports


def test_run_trial_in_process(tmp_path: Path, cache_dir: Path) -> None:
    final, reports = run_in_process(tmp_path, cache_dir, epochs=2)
    assert final["status"] == "terminated"
    assert [r["step"] for r in reports] == [0, 3, 6]  # 48 images / batch 16 = 3 steps/epoch
    assert reports[0]["train_loss"] is None and reports[-1]["train_loss"] > 0
    assert final["zero_shot_top1"] == reports[0]["val_top1"]
    sink = TrialSink(tmp_path / "trial")
    assert [r["step"] for r in sink.history()] == [0, 3, 6]
    status = sink.status()
    assert status["status"] == "terminated" and len(status["train_classes"]) == 4
