"""The `data` section of the spec tree (`sweeper.spec`): where the images, class names and
captions come from, and how they are read. The formats' own keys are validated against the
one table of formats (`sweeper.data.formats.FORMATS`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from sweeper.spec_base import FilesystemOptions, Float, Int
from sweeper.spec_base import Strict as _Strict


class SyntheticSpec(_Strict):
    """Generated ImageNet-style dataset (shape x colour classes, captions with distractors)."""

    n_classes: Int = Field(20, ge=2, le=64)
    train_per_class: Int = Field(40, ge=1, le=100_000)
    val_per_class: Int = Field(20, ge=1, le=100_000)
    image_size: Int = Field(32, ge=8, le=1024)
    seed: Int = 0


def formats() -> dict[str, Any]:
    """The table of data formats, by `data.format` name."""
    from sweeper.data.formats import FORMATS  # loads the data package: only to validate

    return FORMATS


class DataSpec(_Strict):
    """Where the images, class names and captions come from."""

    synthetic: SyntheticSpec | None = None
    root: str | None = None  # a path or a URI (s3://bucket/prefix, gs://...: sweeper.storage)
    format: str = "folder"  # a name of sweeper.data.formats.FORMATS
    filesystem: FilesystemOptions = None  # of root, class_names, captions (as storage's)
    class_names: str | None = None
    captions: str | None = None
    # webdataset: brace-expanded shard lists under root (default train/*.tar, val/*.tar),
    # the size over which a member is skipped, the shuffle buffer per DataLoader worker
    train_shards: str | None = Field(None, min_length=1)
    val_shards: str | None = Field(None, min_length=1)
    max_member_mb: Float = Field(64.0, gt=0, le=65_536)
    shuffle_buffer: Int = Field(1000, ge=1, le=1_000_000)
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)
    eval_templates: list[str] | None = None
    class_order: Literal["random", "sorted"] = "random"
    train_classes: list[str] | None = None  # explicit class subset (wnids); overrides the draw
    eval_classes: list[str] | None = None
    # DataLoader processes per trial worker; auto: the CPUs the worker reserves
    # (scaling.resources_per_worker.CPU) less one, at least 1
    num_workers: Annotated[Int, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    cache_images: bool = False  # decode images once to uint8 at the model's resolution
    cache_dir: str | None = None  # where the caches live (default: <storage>/.cache)
    # A frozen vision tower's image embeddings computed once, shared by every trial
    cache_features: bool = True
    augment: Literal["none", "flip"] = "none"  # flip: seeded horizontal flip (train)

    @field_validator("templates", "eval_templates", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # one template, or a list of them

    @field_validator("templates", "eval_templates")
    @classmethod
    def _has_slot(cls, v: list[str] | None) -> list[str] | None:
        for i, t in enumerate(v or []):
            if "{}" not in t:
                raise ValueError(f"template [{i}] {t!r} has no '{{}}' slot for the class name")
            try:  # what every trial does with it; other braces must be doubled ({{ }})
                t.format("x")
            except (IndexError, KeyError, ValueError) as e:
                raise ValueError(f"template [{i}] {t!r} cannot be filled with a class name "
                                 f"({type(e).__name__}: {e}); write literal braces as "
                                 "{{ and }}") from None
        return v

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in formats():
            raise ValueError(f"{v!r} is not one of {', '.join(formats())}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.synthetic is None) == (self.root is None):
            raise ValueError("give exactly one of data.synthetic or data.root")
        for name, f in formats().items():  # keys only another format reads, not left as is
            for key in sorted(f.keys - formats()[self.format].keys):
                if getattr(self, key) != DataSpec.model_fields[key].default:
                    raise ValueError(f"{key} is read by data.format {name} only, not "
                                     f"{self.format}")
        return self
