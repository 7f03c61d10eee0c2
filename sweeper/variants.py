"""A variant of the search space (`variants:` in the spec): its loss, whether the vision
tower is frozen, its overrides of `model` and `train`, and parameter-efficient fine-tuning
(`peft`: LoRA adapters through Hugging Face peft, `sweeper.adapters`); and how a grid axis
names one of its keys (`variants.<name>.<key>`). Part of the spec tree (`sweeper.spec`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sweeper.spec_base import Float, Int, Strict

LossName = Literal["sigmoid", "softmax"]
# The LoRA target presets every family defines (`families.Family.lora_presets`).
LORA_PRESETS = ("attention", "all-linear")


class PeftSpec(Strict):
    """Parameter-efficient fine-tuning of a variant through Hugging Face peft: LoRA
    adapters (rank `r`, scale `alpha / r`, `dropout` on their input) on the linear layers
    `target_modules` of the towers `towers`; every other weight of the model is frozen
    (the temperature and the sigmoid bias train as in full fine-tuning).
    `target_modules`: a preset of the model's family (`attention`: the q, k, v and output
    projections of every encoder block; `all-linear`: those and the MLP's two layers), or
    module names matched as peft matches them (a full path, or its last components).
    `towers`: default both, or the text tower alone when the vision tower is frozen."""

    method: Literal["lora"] = "lora"
    r: Int = Field(8, ge=1, le=4096)
    alpha: Float = Field(16.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "attention"
    towers: list[Literal["text", "vision"]] | None = None

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v not in LORA_PRESETS:
            raise ValueError(f"{v[:60]!r} is not a preset ({', '.join(LORA_PRESETS)}); name "
                             "other modules in a list")
        if isinstance(v, list):
            if not v:
                raise ValueError("give a preset (attention, all-linear) or at least one "
                                 "module name")
            for i, name in enumerate(v):
                if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", name):
                    raise ValueError(f"[{i}] {name[:60]!r} is not a module name (dotted "
                                     "path of letters, digits and '_')")
        return v

    @field_validator("towers")
    @classmethod
    def _towers(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("name each tower once, at least one")
        return v

    def for_variant(self, freeze_vision: bool) -> PeftSpec:
        """This spec with `towers` resolved: the text tower, and the vision tower unless
        it is frozen."""
        if self.towers is not None:
            return self
        return self.model_copy(update={"towers": ["text"] if freeze_vision
                                       else ["text", "vision"]})


class VariantSpec(Strict):
    """A named model variant: the loss, whether the vision tower is frozen, overrides, and
    optionally parameter-efficient fine-tuning (`peft`) instead of training every weight."""

    loss: LossName = "sigmoid"
    freeze_vision: bool = False
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    peft: PeftSpec | None = None

    @model_validator(mode="after")
    def _adapted_towers(self) -> VariantSpec:
        # sweeper always trains the text tower, and the vision tower exactly when it is not
        # frozen (a frozen one runs without gradients, its features cached): a tower's
        # adapters follow that.
        towers = self.peft.for_variant(self.freeze_vision).towers if self.peft else None
        if towers is not None and "text" not in towers:
            raise ValueError("peft.towers: must include text (the text tower always trains)")
        if towers is not None and ("vision" in towers) == self.freeze_vision:
            raise ValueError("peft.towers: vision is frozen (freeze_vision: true) and takes no "
                             "adapters" if self.freeze_vision else
                             "peft.towers: without vision, the vision tower would not train; "
                             "set freeze_vision: true for that (its features are then cached)")
        return self


def variant_axis(variants: Any, key: str) -> tuple[str, list[str]] | None:
    """(variant, key path inside it) of a grid axis `variants.<name>.<key...>` over the
    defined `variants` (names may hold dots: the longest that fits wins), else None."""
    rest = str(key).removeprefix("variants.")
    if rest == key:
        return None
    fits = [v for v in variants if rest.startswith(f"{v}.") and len(rest) > len(v) + 1]
    if not fits:
        return None
    name = max(fits, key=len)
    return name, rest[len(name) + 1:].split(".")
