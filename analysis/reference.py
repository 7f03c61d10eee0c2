"""The course report's figures, as `docs/studies.md` gives them.

Every study is a one-axis table of zero-shot val top-1 (in percent, as printed in the
report) for one model kind, with the other axes fixed. `lookup` answers "which study
does this table of ours reproduce?", so that `analysis.report` can put the reference
figure in a column beside each of our cells.

Assumptions made in transcribing (the report does not state them):

- the batch-size and train-classes studies used templated text (`text_source =
  templates`): the report's collapse at one class is explained by identical templated
  texts, and its captions-vs-templates study is separate;
- the text-source study names neither batch size nor class count, so it matches a
  text-source table of ours at any batch size and class count.

The SigLiT setting batch 64 / 10 classes was measured twice (80.30% in the
train-classes study, 80.74% in the batch-size study); each study keeps its own figure.

A figure only stands beside ours when our trials are the same study: the reference's
model (`same_model`: its hub id, or a local directory of the same architecture), real
data (not the synthetic set), and the study's axes with the others at its values
(`lookup`). `why_not` says in words which of these a sweep misses.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The checkpoint every study of the course report fine-tuned.
MODEL = "google/siglip-base-patch16-224"
# What "the course report" is, in the words the sweep report uses wherever it names it.
SOURCE = ("the course report (a report for a course on multimodal representations that "
          "fine-tuned SigLIP and SigLiT on ImageNet; its studies and figures: "
          "`docs/studies.md`)")
# What "the same architecture" means for a local directory: its config.json says so.
_ARCHITECTURE = {"model_type": "siglip", "hidden_size": 768, "patch_size": 16, "image_size": 224}

SIGLIP = "siglip"  # sigmoid loss, both towers trained
SIGLIT = "siglit"  # sigmoid loss, vision tower frozen (locked-image tuning)


@dataclass(frozen=True)
class Study:
    """One reference table: `val_top1_pct[axis value]` with `fixed` axes held constant."""

    model: str
    axis: str
    fixed: Mapping[str, Any]
    val_top1_pct: Mapping[Any, float]
    title: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


STUDIES: tuple[Study, ...] = (
    Study(
        model=SIGLIP,
        axis="text_source",
        fixed={},
        val_top1_pct={"captions": 69.67, "templates": 87.27},
        title="Text source (SigLIP, full fine-tuning)",
    ),
    Study(
        model=SIGLIP,
        axis="batch_size",
        fixed={"n_train_classes": 10, "text_source": "templates"},
        val_top1_pct={128: 86.95, 64: 89.82, 32: 89.19, 16: 91.05, 8: 93.44, 4: 95.16},
        title="SigLIP, full fine-tuning: batch size at 10 classes",
    ),
    Study(
        model=SIGLIP,
        axis="n_train_classes",
        fixed={"batch_size": 64, "text_source": "templates"},
        val_top1_pct={
            # 10 classes at batch 64 comes from the batch-size table of the same study.
            10: 89.82,
            9: 85.99,
            8: 84.73,
            7: 83.22,
            6: 77.91,
            5: 86.51,
            4: 85.33,
            3: 72.43,
            2: 80.60,
            1: 1.82,
        },
        title="SigLIP, full fine-tuning: train classes at batch 64",
    ),
    Study(
        model=SIGLIT,
        axis="n_train_classes",
        fixed={"batch_size": 64, "text_source": "templates"},
        val_top1_pct={
            10: 80.30,
            9: 80.74,
            8: 80.36,
            7: 75.78,
            6: 72.57,
            5: 79.53,
            4: 77.11,
            3: 68.29,
            2: 79.82,
            1: 2.34,
        },
        title="SigLiT (vision tower frozen): train classes at batch 64",
    ),
    Study(
        model=SIGLIT,
        axis="batch_size",
        fixed={"n_train_classes": 10, "text_source": "templates"},
        val_top1_pct={128: 81.54, 64: 80.74, 32: 83.02, 16: 82.70, 8: 85.56, 4: 81.80},
        title="SigLiT (vision tower frozen): batch size at 10 classes",
    ),
)


def model_kind(loss: Any, freeze_vision: Any) -> str | None:
    """The reference model a variant reproduces, from its loss and frozen vision tower.

    Variants are named by the user, so the match goes by what the variant does, not by
    its name. Softmax variants (CLIP, LiT), and variants whose settings are unknown, have no
    reference figures.
    """
    if loss != "sigmoid" or not isinstance(freeze_vision, bool):
        return None
    return SIGLIT if freeze_vision else SIGLIP


def _same(a: Any, b: Any) -> bool:
    # Axis values come back from Parquet as numpy scalars or floats (64.0 for 64).
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def lookup(model: str | None, axis: str, fixed: Mapping[str, Any]) -> Study | None:
    """The study of `model` that varies `axis` with the same fixed values as our table.

    `fixed` holds the values our table keeps constant; a study's fixed key that our
    table does not mention at all cannot be checked and does not match.
    """
    if model is None:
        return None
    for study in STUDIES:
        if study.model != model or study.axis != axis:
            continue
        if all(k in fixed and _same(fixed[k], v) for k, v in study.fixed.items()):
            return study
    return None


def figure(study: Study, value: Any) -> float | None:
    """The study's val top-1 (percent) at axis `value`, or None when it was not measured."""
    for key, pct in study.val_top1_pct.items():
        if _same(key, value):
            return pct
    return None


@functools.lru_cache(maxsize=256)
def _local_architecture(directory: str) -> dict[str, Any] | None:
    """model_type and the vision tower's hidden size, patch and image size, as the
    directory's config.json states them (None when it cannot be read)."""
    try:
        config = json.loads((Path(directory).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    vision = config.get("vision_config")
    vision = vision if isinstance(vision, dict) else {}
    return {
        "model_type": config.get("model_type"),
        **{k: vision.get(k) for k in ("hidden_size", "patch_size", "image_size")},
    }


def same_model(pretrained: Any) -> bool:
    """True when `pretrained` (a trial's `model.pretrained`) is the reference's model.

    That is the hub id `google/siglip-base-patch16-224` (case aside), or a local directory
    (read from where the analysis runs; one it cannot read does not count) whose config.json
    has `model_type: siglip` and a vision tower with hidden size 768, patch 16 and image
    size 224, all stated explicitly (a config that leaves them to the library's defaults
    does not count). Presets such as `tiny` and other hub ids do not.
    """
    if not isinstance(pretrained, str) or not pretrained:
        return False
    if pretrained.strip().rstrip("/").lower() == MODEL:
        return True
    return _local_architecture(pretrained) == _ARCHITECTURE


def same_setting(pretrained: Iterable[Any], synthetic: Iterable[Any]) -> bool:
    """True when every trial (its `model.pretrained`, and whether its data is synthetic)
    runs the reference's model on real data; unknown data does not count as real."""
    models, data = set(pretrained), list(synthetic)
    return (
        bool(models) and bool(data)
        and all(same_model(p) for p in models) and all(s is False for s in data)
    )


def why_not(pretrained: Iterable[Any], synthetic: Iterable[Any]) -> str:
    """One line saying why no reference figure applies to a sweep with these trials."""
    models = sorted({str(p) for p in pretrained if p is not None})
    data = list(synthetic)
    model_ok = bool(models) and all(same_model(p) for p in models)
    data_ok = bool(data) and all(s is False for s in data)
    if not (model_ok and data_ok):
        if model_ok:
            ours = "the same model"
        else:
            ours = ", ".join(f"`{m}`" for m in models[:3]) + (" ..." if len(models) > 3 else "")
        if data_ok:
            where = "real data"
        elif any(s is True for s in data):
            where = "synthetic data"
        else:
            where = "data of unknown origin"
        return (
            f"No reference figures apply: {SOURCE} fine-tuned `{MODEL}` on real ImageNet "
            f"images; this sweep fine-tunes {ours or 'an unknown model'} on {where}."
        )
    return (
        "No reference figures apply: no table of this sweep reproduces one of the studies of "
        f"{SOURCE}: a sigmoid-loss variant against batch size, training classes or text "
        "source, the other axes at the study's values."
    )
