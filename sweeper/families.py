"""The model families sweeper fine-tunes: what a family is, one entry each.

A checkpoint's family is its `config.json` `model_type` (plus, for `siglip`, its tokenizer:
a Gemma tokenizer marks a SigLIP 2 FixRes checkpoint). Everything that differs between the
families is a field of `Family`: where its two towers sit in the Hugging Face model (their
modules, their encoder blocks), its temperature and bias (whether the checkpoint has a
bias, their inits), its default loss, the builder of its offline tiny preset, the modules
its LoRA target presets adapt, and how its text and images are preprocessed. The model
wrapper (`sweeper.models`), the parameter groups (`sweeper.training`), the adapters
(`sweeper.adapters`), the image preprocessing (`sweeper.data.transform`) and the refusals
before a sweep (`sweeper.preflight`) read these fields; no other module tests a model type
or a tower's module name. A new family is one entry in `FAMILIES` (and, for an offline
preset, its builder in `sweeper.presets`). Imports nothing of sweeper but the builders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sweeper import presets

# What an image batch may carry for the vision tower, by Hugging Face's names: fixed-size
# images are `pixel_values` [b, 3, H, W]; NaFlex images are patch sequences `pixel_values`
# [b, P, p*p*3] with `pixel_attention_mask` [b, P] (1: a real patch) and `spatial_shapes`
# [b, 2] (the image's height and width in patches).
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
TOWERS = ("text", "vision")

# The SigLIP paper's temperature and bias inits (big_vision's `inits`): log 10 and -10.
SIGLIP_INIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0

# Linear layers of a Hugging Face encoder block (CLIP, SigLIP, SigLIP 2 name them alike),
# relative to the block: what the LoRA target presets adapt.
HF_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.out_proj")
HF_MLP = ("mlp.fc1", "mlp.fc2")
HF_LORA_PRESETS = {"attention": HF_ATTENTION, "all-linear": HF_ATTENTION + HF_MLP}


class ModelError(ValueError):
    """A model that cannot be loaded or is not supported (one line, naming
    `model.pretrained`)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


@dataclass(frozen=True)
class Tower:
    """Where one tower sits in the Hugging Face model, by module path: `root` holds its
    embeddings and encoder (`text_model`), `extra` are modules outside it whose parameters
    belong to it (CLIP's `text_projection`), and `blocks` is the ModuleList of its encoder
    blocks under `root` (what LoRA presets adapt and a sharded run wraps one by one)."""

    root: str
    extra: tuple[str, ...] = ()
    blocks: str = "encoder.layers"

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.root, *self.extra)

    def owns(self, path: str) -> bool:
        """Whether the parameter or module at `path` (relative to the model) is this
        tower's."""
        return any(path == p or path.startswith(f"{p}.") for p in self.paths)


@dataclass(frozen=True)
class Family:
    """How sweeper treats one kind of two-tower checkpoint.

    Towers: `text` and `vision` (`Tower`: module paths in the Hugging Face model), encoded
    by the model's `text_features` / `image_features` methods. Temperature and bias: the
    model's parameters `scale_param` (a log-temperature) and `bias_param`;
    `checkpoint_bias` says the checkpoint has a trained bias (SigLIP, SigLIP 2), else the
    sigmoid loss gets a new one at `init_bias` (`models.DualEncoder`). `init_scale` /
    `init_bias`: what the tiny preset starts from (None: the model class's own init).
    `default_loss`: the loss the family was trained with (the preset is pretrained with
    it). `preset` / `builder`: the offline tiny preset's name (`model.pretrained`) and
    builder (`sweeper.presets`), if the family has one. `lora_presets`: the named LoRA
    targets, block-relative module names (`Tower.blocks`); they never name a module whose
    weights the forward reads directly (`sweeper.adapters`).

    Preprocessing: `text_mask`: the text tower gets the tokenizer's attention mask (CLIP
    pools its end-of-text token and masks padding); SigLIP and SigLIP 2 were trained
    without one and pool the last position, padding included, so they get none. `naflex`:
    images are patch sequences under a patch budget (`model.max_num_patches`), not
    fixed-size images. `lowercase`: text is lower-cased before tokenizing (SigLIP 2 was
    trained on lower-cased text)."""

    model_type: str
    label: str
    text_mask: bool
    default_loss: str
    checkpoint_bias: bool
    naflex: bool = False
    lowercase: bool = False
    text: Tower = Tower("text_model")
    vision: Tower = Tower("vision_model")
    text_features: str = "get_text_features"
    image_features: str = "get_image_features"
    scale_param: str = "logit_scale"
    bias_param: str = "logit_bias"
    init_scale: float | None = None
    init_bias: float = SIGLIP_INIT_BIAS
    preset: str | None = None
    builder: Callable[[Any, list[str]], tuple[Any, Any]] | None = field(
        default=None, compare=False)
    lora_presets: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(HF_LORA_PRESETS), hash=False)

    def tower(self, name: str) -> Tower:
        """The tower `name` ("text" or "vision")."""
        return {"text": self.text, "vision": self.vision}[name]

    def tower_of(self, path: str) -> str | None:
        """"text" or "vision" for a parameter or module path of the model (`text_model...`),
        None for one of neither tower (the temperature and bias)."""
        return next((t for t in TOWERS if self.tower(t).owns(path)), None)

    def tower_modules(self, model: Any, name: str) -> list[Any]:
        """The modules of `model` that make up tower `name`."""
        return [model.get_submodule(p) for p in self.tower(name).paths]

    def blocks(self, model: Any, name: str) -> Any:
        """The encoder blocks (a ModuleList) of tower `name` of `model`."""
        t = self.tower(name)
        return model.get_submodule(f"{t.root}.{t.blocks}")

    def build(self, tiny: Any, vocab: list[str]) -> tuple[Any, Any]:
        """A freshly initialised tiny model of this family (shape `tiny`, a
        `spec.TinyModelSpec`) and its processor, with the family's temperature and bias
        inits (SigLIP's log 10 and -10: Hugging Face's fresh SiglipModel sets both to 0,
        from which a small model learns nothing in a few epochs)."""
        if self.builder is None:
            raise ModelError(f"model.pretrained: {self.label} has no offline preset")
        import torch

        model, processor = self.builder(tiny, vocab)
        with torch.no_grad():
            if self.init_scale is not None:
                getattr(model, self.scale_param).fill_(self.init_scale)
            if self.checkpoint_bias:
                getattr(model, self.bias_param).fill_(self.init_bias)
        return model, processor


_SIGLIP = dict(text_mask=False, default_loss="sigmoid", checkpoint_bias=True,
               init_scale=SIGLIP_INIT_SCALE)
_CLIP = dict(text_mask=True, default_loss="softmax", checkpoint_bias=False,
             text=Tower("text_model", ("text_projection",)),
             vision=Tower("vision_model", ("visual_projection",)))

FAMILIES: dict[str, Family] = {
    "siglip": Family("siglip", "SigLIP", **_SIGLIP, preset="tiny", builder=presets.siglip),
    "siglip2": Family("siglip2", "SigLIP 2 NaFlex", **_SIGLIP, naflex=True, lowercase=True,
                      preset="tiny-siglip2", builder=presets.siglip2),
    "clip": Family("clip", "CLIP", **_CLIP, preset="tiny-clip", builder=presets.clip),
    "metaclip_2": Family("metaclip_2", "MetaCLIP 2", **_CLIP),
}
# A `siglip` checkpoint with a Gemma tokenizer (as the hub ships it, or as Hugging Face's
# `Siglip2Tokenizer`): SigLIP 2 at a fixed resolution.
SIGLIP2_FIXRES = replace(FAMILIES["siglip"], label="SigLIP 2 FixRes", lowercase=True,
                         preset=None, builder=None)
# `model.pretrained` -> model type of the offline presets.
PRESETS = {f.preset: t for t, f in FAMILIES.items() if f.preset}


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


def family_of_model(model: Any) -> Family:
    """The family of a loaded Hugging Face model (by its config's `model_type`; a SigLIP 2
    FixRes model is a `siglip` one, towers and all)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        raise ModelError(f"model.pretrained: a {model_type!r} model ({type(model).__name__}) "
                         f"is not a two-tower model sweeper supports; supported model types: "
                         f"{supported()}")
    return fam
