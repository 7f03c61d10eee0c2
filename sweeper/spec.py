"""The search-space file: one typed, frozen spec tree, validated before Ray starts.

`load_spec(path, overrides)` parses YAML with `yaml.safe_load` (no Python object tags),
applies `--set key.path=value` overrides, and validates everything, including the
cross-field rules that need the whole tree (variants named in the grid exist, batch
sizes split evenly over the workers, enough classes for `n_train_classes`). Every refusal
is a `SpecError` whose message is one line starting with the offending key path.

`trial_configs(spec)` expands the grid into the resolved per-trial configs, in the same
order Ray Tune's `grid_search` produces them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TextSource = Literal["templates", "captions", "mixed"]
LossName = Literal["sigmoid", "softmax"]


class SpecError(ValueError):
    """A refused search space. `str(err)` is one line: `key.path: what is wrong`."""

    def __init__(self, message: str) -> None:
        # Keys and values come from user YAML and may hold newlines: keep the promise of
        # one line whatever they contain.
        super().__init__(" ".join(str(message).splitlines()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class TinyModelSpec(_Strict):
    """Shape of the offline `tiny` preset (a small SigLIP pretrained on synthetic data)."""

    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    patch_size: int = Field(8, ge=1)
    image_size: int = Field(32, ge=8)
    max_length: int = Field(16, ge=4)
    pretrain_epochs: int = Field(15, ge=0)
    pretrain_per_class: int = Field(40, ge=1)
    seed: int = 0


class ModelSpec(_Strict):
    """Which checkpoint every trial starts from."""

    pretrained: str = Field("tiny", min_length=1)
    trust_remote_code: bool = False
    tiny: TinyModelSpec = TinyModelSpec()
    max_length: int | None = Field(None, ge=1)  # text padding length; default: model's own


class BudgetSpec(_Strict):
    """Exactly one of epochs, steps or samples."""

    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetSpec:
        given = [k for k in ("epochs", "steps", "samples") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of epochs, steps, samples (got {given or 'none'})")
        return self


class TrainSpec(_Strict):
    """Optimisation of one trial."""

    epochs: int | None = Field(None, ge=1)  # shorthand for budget: {epochs: N}
    budget: BudgetSpec | None = None
    lr: float = Field(1e-4, gt=0)
    lr_text: float | None = Field(None, gt=0)
    lr_vision: float | None = Field(None, gt=0)
    lr_logit: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float | None = Field(None, gt=0)
    # bf16: autocast (on the CPU too); auto: bf16 on a CUDA device that supports it, else fp32
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    same_class_pairs: Literal["negative", "positive", "ignore"] = "negative"
    save_final: bool = False
    log_every_steps: int = Field(50, ge=1)
    compile: bool = False

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSpec:
        if self.epochs is not None and self.budget is not None:
            raise ValueError("give either epochs or budget, not both")
        return self

    @property
    def resolved_budget(self) -> BudgetSpec:
        if self.budget is not None:
            return self.budget
        return BudgetSpec(epochs=self.epochs or 1)


class EvalSpec(_Strict):
    """When and how the zero-shot evaluation runs."""

    every_steps: int | None = Field(None, ge=1)  # default: every epoch
    batch_size: int = Field(256, ge=1)


class CheckpointSpec(_Strict):
    keep: int = Field(1, ge=1)


class SyntheticSpec(_Strict):
    """Generated ImageNet-style dataset (shape x colour classes, captions with distractors)."""

    n_classes: int = Field(20, ge=2, le=64)
    train_per_class: int = Field(40, ge=1)
    val_per_class: int = Field(20, ge=1)
    image_size: int = Field(32, ge=8)
    seed: int = 0


class DataSpec(_Strict):
    """Where the images, class names and captions come from."""

    synthetic: SyntheticSpec | None = None
    root: str | None = None
    format: Literal["folder", "parquet"] = "folder"
    class_names: str | None = None
    captions: str | None = None
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)
    eval_templates: list[str] | None = None
    class_order: Literal["random", "sorted"] = "random"
    train_classes: list[str] | None = None  # explicit class subset (wnids); overrides the draw
    eval_classes: list[str] | None = None
    num_workers: int = Field(0, ge=0)
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
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.synthetic is None) == (self.root is None):
            raise ValueError("give exactly one of data.synthetic or data.root")
        return self


class VariantSpec(_Strict):
    """A named model variant: the loss, whether the vision tower is frozen, overrides."""

    loss: LossName = "sigmoid"
    freeze_vision: bool = False
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)


class GridSpec(BaseModel):
    """Axes of the sweep. Extra keys are dotted spec paths (`train.lr: [1e-4, 3e-5]`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    variant: list[str] = Field(min_length=1)
    text_source: list[TextSource] = Field(default_factory=lambda: ["templates"], min_length=1)
    batch_size: list[int] = Field(min_length=1)
    n_train_classes: list[int] = Field(min_length=1)
    seed: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("batch_size", "n_train_classes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        for i, x in enumerate(v):
            if x < 1:
                raise ValueError(f"[{i}] must be >= 1, got {x}")
        return v


class ScalingSpec(_Strict):
    """Resources of every trial (Ray Train ScalingConfig) and Tune's concurrency."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_concurrent_trials: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint
    # A trial whose workers cannot be placed fails after two waits this long (no hang).
    worker_start_timeout_s: float = Field(120.0, gt=0)


class TuneSpec(_Strict):
    """Tune's trial scheduler. `asha` stops trials early on `val_top1`, comparing trials at
    the same number of reports (Tune's training_iteration: one per evaluation)."""

    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int = Field(100, ge=1)  # asha: a trial is stopped after this many reports


class SweepSpec(_Strict):
    """The whole search space, as written in the YAML file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str = "./results"
    model: ModelSpec = ModelSpec()
    variants: dict[str, VariantSpec] = Field(min_length=1)
    data: DataSpec
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    grid: GridSpec
    scaling: ScalingSpec = ScalingSpec()
    tune: TuneSpec = TuneSpec()
    loggers: list[Literal["tensorboard", "mlflow", "wandb", "csv", "json"]] = Field(
        default_factory=list
    )


class TrialConfig(_Strict):
    """Everything one trial needs, resolved: the spec with its variant and axes applied."""

    trial_id: str
    experiment: str
    variant: str
    loss: LossName
    freeze_vision: bool
    text_source: TextSource
    batch_size: int
    n_train_classes: int
    seed: int
    axes: dict[str, Any]  # the grid point, as the user wrote its axes
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec
    checkpoint: CheckpointSpec
    scaling: ScalingSpec

    @property
    def per_worker_batch_size(self) -> int:
        return self.batch_size // self.scaling.num_workers


# --------------------------------------------------------------------------- errors


def _loc_to_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "tagged-union")):
            continue
        elif re.fullmatch(r"[A-Za-z_][\w.-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:  # a key that is not a name (`0`, `my key`): quoted so the path stays readable
            out += f"[{str(part)[:40]!r}]"
    return out or "<root>"


def _validation_error(err: ValidationError, prefix: str = "") -> SpecError:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return SpecError(f"{_loc_to_path(tuple(first['loc']), prefix)}: {msg}".splitlines()[0])


# --------------------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise SpecError(f"--set {key}: not a key path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise SpecError(f"{key}: value {raw!r} is not valid YAML ({e.problem})") from None
    return key.split("."), value


def _apply_override(doc: dict[str, Any], keys: list[str], value: Any) -> None:
    node = doc
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{'.'.join(keys[: i + 1])}: is not a mapping, cannot set {keys[-1]}")
        node = child
    node[keys[-1]] = value


def parse_yaml(text: str, source: str = "<spec>") -> dict[str, Any]:
    """Parse YAML with the safe loader only; refuse anything but a mapping at the top."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}:{where}: invalid YAML: {problem}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: the search space must be a YAML mapping")
    return doc


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read, override and validate a search-space file. Raises SpecError (one line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read search space ({type(e).__name__})") from None
    doc = parse_yaml(text, str(p))
    for item in overrides or []:
        _apply_override(doc, *_parse_override(item))
    return validate(doc, base_dir=p.parent)


def validate(doc: dict[str, Any], base_dir: Path | None = None) -> SweepSpec:
    """Validate a parsed document into a SweepSpec, including cross-field rules."""
    if not isinstance(doc, dict):
        raise SpecError("<root>: the search space must be a mapping")
    try:
        spec = SweepSpec.model_validate(doc)
    except ValidationError as e:
        raise _validation_error(e) from None
    except (TypeError, ValueError) as e:  # e.g. unhashable keys from odd YAML
        raise SpecError(f"<root>: {str(e).splitlines()[0]}") from None
    if base_dir is not None:
        spec = _resolve_paths(spec, base_dir)
    _check_cross_fields(spec)
    return spec


def _resolve_paths(spec: SweepSpec, base_dir: Path) -> SweepSpec:
    """Relative data paths are relative to the spec file's folder, like includes."""
    data = spec.data
    upd: dict[str, Any] = {}
    for key in ("root", "class_names", "captions"):
        val = getattr(data, key)
        if val and "://" not in val and not Path(val).expanduser().is_absolute():
            cand = (base_dir / val).resolve()
            if cand.exists() or key == "root":
                upd[key] = str(cand) if cand.exists() else val
    if data.cache_dir and not Path(data.cache_dir).expanduser().is_absolute():
        # Made absolute here: Ray workers run in another working directory.
        upd["cache_dir"] = str((base_dir / data.cache_dir).resolve())
    return spec.model_copy(update={"data": data.model_copy(update=upd)}) if upd else spec


def n_dataset_classes(spec: SweepSpec) -> int | None:
    """Class count known without touching the disk (synthetic data), else None."""
    return spec.data.synthetic.n_classes if spec.data.synthetic else None


def _check_cross_fields(spec: SweepSpec) -> None:
    g = spec.grid
    for i, v in enumerate(g.variant):
        if v not in spec.variants:
            raise SpecError(
                f"grid.variant[{i}]: variant {v!r} is not defined in variants "
                f"(defined: {', '.join(sorted(spec.variants))})"
            )
    nw = spec.scaling.num_workers
    for i, b in enumerate(g.batch_size):
        if b % nw:
            raise SpecError(
                f"grid.batch_size[{i}]: {b} must be divisible by scaling.num_workers={nw}"
            )
    n_cls = n_dataset_classes(spec)
    if n_cls is not None:
        for i, k in enumerate(g.n_train_classes):
            if k > n_cls:
                raise SpecError(
                    f"grid.n_train_classes[{i}]: {k} exceeds the dataset's {n_cls} classes"
                )
    needs_captions = "captions" in g.text_source or "mixed" in g.text_source
    d = spec.data
    if needs_captions and d.root is not None and d.captions is None and d.format != "parquet":
        raise SpecError("data.captions: text_source 'captions' needs a captions manifest")
    for name, var in spec.variants.items():
        for section, model_cls, base in (
            ("model", ModelSpec, spec.model),
            ("train", TrainSpec, spec.train),
        ):
            overrides = getattr(var, section)
            if not overrides:
                continue
            try:
                model_cls.model_validate({**base.model_dump(exclude_unset=True), **overrides})
            except ValidationError as e:
                raise _validation_error(e, _loc_to_path(("variants", name, section))) from None
    for key, values in (g.model_extra or {}).items():
        _check_extra_axis(spec, key, values)
    _check_feature_cache(spec)
    _check_scaling(spec)


def _check_scaling(spec: SweepSpec) -> None:
    """Worker reservations Ray would accept but that cannot work, and ASHA's bounds."""
    t = spec.tune
    if t.scheduler == "asha" and t.grace_period > t.max_t:
        raise SpecError(f"tune.grace_period: {t.grace_period} exceeds tune.max_t={t.max_t}")
    sc = spec.scaling
    res = sc.resources_per_worker or {}
    for k, v in res.items():
        if v < 0 or not math.isfinite(v):
            raise SpecError(f"scaling.resources_per_worker.{k}: must be >= 0, got {v}")
    # A CPU worker that names CPU: 0 and nothing else reserves nothing (a GPU worker
    # always reserves a GPU: one unless it names a share).
    if not sc.use_gpu and "CPU" in res and not any(res.values()):
        raise SpecError("scaling.resources_per_worker: a worker must reserve some resource "
                        "(CPU, GPU or a custom one)")
    if res.get("GPU") and not sc.use_gpu:
        raise SpecError("scaling.resources_per_worker.GPU: reserves GPUs that the workers "
                        "would not use; set scaling.use_gpu: true")
    gpu = res.get("GPU") or 1.0
    if (sc.use_gpu and sc.num_workers > 1 and gpu != int(gpu)
            and sc.placement_strategy != "STRICT_SPREAD"):
        raise SpecError(
            f"scaling.resources_per_worker.GPU: {gpu:g} of a GPU per worker could put two "
            f"of a trial's {sc.num_workers} ranks on one GPU, which NCCL refuses; use whole "
            "GPUs for multi-worker trials, or placement_strategy: STRICT_SPREAD")


def _check_feature_cache(spec: SweepSpec) -> None:
    """A frozen tower's cached features are of the unaugmented images: a variant that
    freezes the vision tower with `data.cache_features` on cannot also augment."""
    frozen = [v for v in dict.fromkeys(spec.grid.variant) if spec.variants[v].freeze_vision]
    extra = spec.grid.model_extra or {}
    caches = extra.get("data.cache_features", [spec.data.cache_features])
    if not frozen or not any(caches):
        return
    if "data.augment" in extra:
        augs = [(f"grid.data.augment[{i}]", a) for i, a in enumerate(extra["data.augment"])]
    else:
        augs = [("data.augment", spec.data.augment)]
    for key, aug in augs:
        if aug != "none":
            raise SpecError(
                f"{key}: {aug!r} cannot be combined with data.cache_features on variant "
                f"{frozen[0]!r} (freeze_vision: its image features are computed once, "
                "unaugmented); set data.cache_features: false or data.augment: none")


def _check_extra_axis(spec: SweepSpec, key: str, values: Any) -> None:
    path = _loc_to_path(("grid", key))
    parts = str(key).split(".")
    if len(parts) < 2 or parts[0] not in ("model", "train", "eval", "data", "checkpoint"):
        raise SpecError(
            f"{path}: unknown axis (use variant, text_source, batch_size, n_train_classes, "
            "seed, or a dotted path such as train.lr)"
        )
    if not isinstance(values, list) or not values:
        raise SpecError(f"{path}: must be a non-empty list of values")
    for i, v in enumerate(values):
        doc = spec.model_dump(exclude_unset=True)
        doc["grid"] = {k: val for k, val in doc["grid"].items() if "." not in k}
        _apply_override(doc, parts, v)
        try:
            SweepSpec.model_validate(doc)
        except ValidationError as e:
            first = e.errors()[0]
            loc = _loc_to_path(tuple(first["loc"]))
            msg = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                msg = "unknown key"
            raise SpecError(f"{path}[{i}]: {loc}: {msg}".splitlines()[0]) from None


# --------------------------------------------------------------------------- grid


def grid_axes(spec: SweepSpec) -> dict[str, list[Any]]:
    """The grid's axes in a fixed order: the named ones, then dotted extras as written."""
    g = spec.grid
    axes: dict[str, list[Any]] = {
        "variant": list(g.variant),
        "text_source": list(g.text_source),
        "batch_size": list(g.batch_size),
        "n_train_classes": list(g.n_train_classes),
        "seed": list(g.seed),
    }
    axes.update({k: list(v) for k, v in (g.model_extra or {}).items()})
    return axes


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(v))


def trial_id_for(point: dict[str, Any]) -> str:
    """Deterministic, readable trial name derived from the grid point."""
    short = {"batch_size": "bs", "n_train_classes": "k", "seed": "s"}
    parts = [str(point["variant"]), str(point["text_source"])]
    parts += [f"{short[k]}{point[k]}" for k in ("batch_size", "n_train_classes", "seed")]
    extras = {k: v for k, v in point.items() if "." in k}
    for k, v in extras.items():
        parts.append(f"{k.split('.')[-1]}{_fmt(v)}")
    name = "-".join(parts)
    if len(name) > 120:  # keep directory names sane; the hash keeps them unique
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:10]
        name = name[:100] + "-" + digest
    return name


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Cartesian product of the axes, in Tune's grid_search order."""
    axes = grid_axes(spec)
    # Tune resolves grid axes in sorted key order, the first varying fastest; mirror it so
    # the dry-run table lists trials in the order the sweep runs them.
    keys = sorted(axes)
    combos = itertools.product(*(axes[k] for k in reversed(keys)))
    points = [dict(zip(reversed(keys), c, strict=True)) for c in combos]
    return [{k: p[k] for k in axes} for p in points]


def resolve_trial(spec: SweepSpec, point: dict[str, Any]) -> TrialConfig:
    """Apply a grid point (variant overrides, then dotted axes) to the spec."""
    var = spec.variants[point["variant"]]
    model = spec.model.model_validate({**spec.model.model_dump(exclude_unset=True), **var.model})
    train = spec.train.model_validate({**spec.train.model_dump(exclude_unset=True), **var.train})
    sections: dict[str, Any] = {
        "model": model.model_dump(exclude_unset=True),
        "train": train.model_dump(exclude_unset=True),
        "eval": spec.eval.model_dump(exclude_unset=True),
        "data": spec.data.model_dump(exclude_unset=True),
        "checkpoint": spec.checkpoint.model_dump(exclude_unset=True),
    }
    for key, value in point.items():
        if "." in key:
            _apply_override(sections, key.split("."), value)
    return TrialConfig(
        trial_id=trial_id_for(point),
        experiment=spec.name,
        variant=point["variant"],
        loss=var.loss,
        freeze_vision=var.freeze_vision,
        text_source=point["text_source"],
        batch_size=int(point["batch_size"]),
        n_train_classes=int(point["n_train_classes"]),
        seed=int(point["seed"]),
        axes=dict(point),
        model=ModelSpec.model_validate(sections["model"]),
        data=DataSpec.model_validate(sections["data"]),
        train=TrainSpec.model_validate(sections["train"]),
        eval=EvalSpec.model_validate(sections["eval"]),
        checkpoint=CheckpointSpec.model_validate(sections["checkpoint"]),
        scaling=spec.scaling,
    )


def trial_configs(spec: SweepSpec) -> list[TrialConfig]:
    """Every trial of the sweep, resolved, in grid order."""
    return [resolve_trial(spec, p) for p in grid_points(spec)]


def spec_fingerprint(spec: SweepSpec) -> str:
    """Hash of what defines the experiment's results (not where they are stored)."""
    doc = spec.model_dump(mode="json",
                          exclude={"storage": True, "scaling": {"max_concurrent_trials"}})
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
