"""The model families sweeper fine-tunes, and what each one does differently.

A checkpoint's family is its `config.json` `model_type` (plus, for `siglip`, its tokenizer:
a Gemma tokenizer marks a SigLIP 2 FixRes checkpoint). Everything that differs between the
families is a field of `Family`, read by the model wrapper (`sweeper.models`), the image
preprocessing (`sweeper.data.transform`) and the refusals before a sweep
(`sweeper.preflight`); no other module tests a model type. Imports nothing of sweeper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# What an image batch may carry for the vision tower, by Hugging Face's names: fixed-size
# images are `pixel_values` [b, 3, H, W]; NaFlex images are patch sequences `pixel_values`
# [b, P, p*p*3] with `pixel_attention_mask` [b, P] (1: a real patch) and `spatial_shapes`
# [b, 2] (the image's height and width in patches).
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class ModelError(ValueError):
    """A model that cannot be loaded or is not supported (one line, naming
    `model.pretrained`)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True)
class Family:
    """How sweeper treats one kind of two-tower checkpoint.

    `text_mask`: the text tower gets the tokenizer's attention mask (CLIP pools its
    end-of-text token and masks padding); SigLIP and SigLIP 2 were trained without one and
    pool the last position, padding included, so they get none. `naflex`: images are
    patch sequences under a patch budget (`model.max_num_patches`), not fixed-size images.
    `lowercase`: text is lower-cased before tokenizing (SigLIP 2 was trained on
    lower-cased text). The sigmoid bias is the checkpoint's `logit_bias` where it has one
    (SigLIP, SigLIP 2), else a new one at -10 (`models.DualEncoder`)."""

    model_type: str
    label: str
    text_mask: bool
    naflex: bool = False
    lowercase: bool = False


FAMILIES: dict[str, Family] = {
    "siglip": Family("siglip", "SigLIP", text_mask=False),
    "siglip2": Family("siglip2", "SigLIP 2 NaFlex", text_mask=False, naflex=True,
                      lowercase=True),
    "clip": Family("clip", "CLIP", text_mask=True),
    "metaclip_2": Family("metaclip_2", "MetaCLIP 2", text_mask=True),
}
# A `siglip` checkpoint with a Gemma tokenizer (as the hub ships it, or as Hugging Face's
# `Siglip2Tokenizer`): SigLIP 2 at a fixed resolution.
SIGLIP2_FIXRES = replace(FAMILIES["siglip"], label="SigLIP 2 FixRes", lowercase=True)


def supported() -> str:
    """The supported model types, for messages."""
    return ", ".join(f"{t} ({f.label}{' / SigLIP 2 FixRes' if t == 'siglip' else ''})"
                     for t, f in FAMILIES.items())


def family_of(model_type: str | None, tokenizer_class: str | None = None) -> Family | None:
    """The family of a checkpoint of `model_type` whose tokenizer is of class
    `tokenizer_class` (as `tokenizer_config.json` or the loaded tokenizer names it), or None
    when sweeper does not support that model type."""
    fam = FAMILIES.get(model_type or "")
    gemma = any(name in (tokenizer_class or "") for name in ("Gemma", "Siglip2"))
    if fam is not None and fam.model_type == "siglip" and gemma:
        return SIGLIP2_FIXRES
    return fam


def lowercases(tokenizer: Any) -> bool:
    """Whether `tokenizer` lower-cases its input itself (a fast tokenizer's normalizer, or a
    slow tokenizer's `do_lower_case`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None)
    if norm is not None:
        return norm.normalize_str("A") == "a"
    return bool(getattr(tokenizer, "do_lower_case", False))


def prepare_tokenizer(tokenizer: Any, family: Family | None) -> Any:
    """`tokenizer` made to preprocess text as the family was trained: for SigLIP 2, a
    lower-casing step in front of its normalizer when it has none (the hub's FixRes
    checkpoints ship a plain Gemma tokenizer; Hugging Face's `Siglip2Tokenizer` adds the
    same step). The tokenizer is changed in place, so a saved final model keeps it."""
    if family is None or not family.lowercase or lowercases(tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"model.pretrained: the {family.label} tokenizer "
                         f"{type(tokenizer).__name__} has no normalizer to lower-case with")
    from tokenizers import normalizers

    steps = [normalizers.Lowercase()]
    if backend.normalizer is not None:
        steps.append(backend.normalizer)
    backend.normalizer = normalizers.Sequence(steps)
    return tokenizer
