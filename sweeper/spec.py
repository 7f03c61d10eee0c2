"""The search-space file: one typed, frozen spec tree, validated before Ray starts.

`load_spec(path, overrides)` parses YAML with `yaml.safe_load` (no Python object tags),
applies `--set key.path=value` overrides, and validates everything, including the
cross-field rules that need the whole tree (variants named in the grid exist, batch
sizes split evenly over the workers, enough classes for `n_train_classes`). Every refusal
is a `SpecError` whose message is one line starting with the offending key path.

An axis of `grid:` is a list or a distribution; `sweeper.search` owns what they mean (the
search algorithm, the trials, their names), `sweeper.trials` resolves a trial's config.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WrapSerializer,
    WrapValidator,
    field_validator,
    model_validator,
)

from sweeper import search
from sweeper.search import Distribution, SearchName, keyed_values, setting_values
from sweeper.spec_base import FilesystemOptions, Float, Int, SpecError
from sweeper.spec_base import Strict as _Strict
from sweeper.spec_data import DataSpec, SyntheticSpec, formats
from sweeper.variants import (  # re-exported: part of the spec tree
    LORA_PRESETS,
    LossName,
    PeftSpec,
    VariantSpec,
    variant_axis,
)

__all__ = ["LORA_PRESETS", "DataSpec", "Float", "Int", "PeftSpec", "SpecError",
           "SyntheticSpec", "VariantSpec", "variant_axis"]

TextSource = Literal["templates", "captions", "mixed"]
# Bounds that keep every answer of the CLI (a dry run, a refusal) to a few seconds.
MAX_TRIALS = 10_000
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_VALUES = 100_000  # scalars and containers after YAML aliases are expanded
MAX_SPEC_DEPTH = 32
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


T = TypeVar("T")
# A named grid axis: a list of values of its type, or a distribution over them.
GridAxis = Annotated[list[T], Field(min_length=1), WrapValidator(search.named_axis),
                     WrapSerializer(search.serialize_axis)]


class TinyModelSpec(_Strict):
    """Shape of the offline `tiny` preset (a small SigLIP pretrained on synthetic data)."""

    hidden_size: Int = Field(64, ge=8, le=1024)
    num_layers: Int = Field(2, ge=1, le=24)
    num_heads: Int = Field(4, ge=1, le=64)
    patch_size: Int = Field(8, ge=1, le=64)
    image_size: Int = Field(32, ge=8, le=512)
    max_length: Int = Field(16, ge=4, le=512)
    pretrain_epochs: Int = Field(15, ge=0, le=1000)
    pretrain_per_class: Int = Field(40, ge=1, le=10_000)
    seed: Int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by "
                             f"num_heads {self.num_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} exceeds image_size "
                             f"{self.image_size}")
        return self


class ModelSpec(_Strict):
    """Which checkpoint every trial starts from."""

    pretrained: str = Field("tiny", min_length=1)
    trust_remote_code: bool = False
    tiny: TinyModelSpec = TinyModelSpec()
    max_length: Int | None = Field(None, ge=1)  # text padding length; default: model's own
    max_num_patches: Int | None = Field(None, ge=1, le=65_536)  # NaFlex; default: processor's


class BudgetSpec(_Strict):
    """Exactly one of epochs, steps or samples."""

    epochs: Int | None = Field(None, ge=1)
    steps: Int | None = Field(None, ge=1)
    samples: Int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetSpec:
        given = [k for k in ("epochs", "steps", "samples") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of epochs, steps, samples (got {given or 'none'})")
        return self


class TrainSpec(_Strict):
    """Optimisation of one trial."""

    epochs: Int | None = Field(None, ge=1)  # shorthand for budget: {epochs: N}
    budget: BudgetSpec | None = None
    lr: Float = Field(1e-4, gt=0)
    lr_text: Float | None = Field(None, gt=0)
    lr_vision: Float | None = Field(None, gt=0)
    lr_logit: Float | None = Field(None, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    warmup_steps: Int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: Float | None = Field(None, gt=0)
    # auto: bf16 autocast on GPUs with native bf16 (compute capability >= 8), else fp32 (the
    # CPU, V100, T4); bf16: autocast on any device; fp32 (TF32 matmuls on Ampere and newer)
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    same_class_pairs: Literal["negative", "positive", "ignore"] = "negative"
    save_final: bool = False
    log_every_steps: Int = Field(50, ge=1)
    compile: bool = False
    # Per worker: encode in slices of this many samples, loss over the whole global batch
    micro_batch_size: Int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False  # Hugging Face's, on the towers that train

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
    """When and how the evaluation runs; `retrieval` on captioned val images: auto/true/false."""

    every_steps: Int | None = Field(None, ge=1)  # default: every epoch
    batch_size: Int = Field(256, ge=1)
    retrieval: Literal["auto"] | bool = "auto"


class CheckpointSpec(_Strict):
    """What Ray Train keeps of a trial's checkpoints, and how they reach the storage."""

    keep: Int = Field(1, ge=1)  # best checkpoints by val_top1 left once a trial finished
    # async: the copy to the storage runs in a thread while training goes on; auto: async
    # where the storage is remote (a network filesystem), sync on a local disk
    upload: Literal["auto", "sync", "async"] = "auto"


class GridSpec(BaseModel):
    """Axes of the sweep: the named ones (`sweeper.search.NAMED_AXES`) and dotted spec
    paths (`train.lr: [1e-4, 3e-5]`); each a list of values or a distribution
    (`{loguniform: [1.0e-6, 1.0e-4]}`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    variant: GridAxis[str]
    text_source: GridAxis[TextSource] = Field(default_factory=lambda: ["templates"])
    batch_size: GridAxis[Int]
    n_train_classes: GridAxis[Int]
    seed: GridAxis[Int] = Field(default_factory=lambda: [0])

    @field_validator("batch_size", "n_train_classes")
    @classmethod
    def _positive(cls, v: list[int] | Distribution) -> list[int] | Distribution:
        if isinstance(v, Distribution):
            if min(v.probe_values()) < 1:
                raise ValueError(f"{v} draws {min(v.probe_values())}; must be >= 1")
            return v
        for i, x in enumerate(v):
            if x < 1:
                raise ValueError(f"[{i}] must be >= 1, got {x}")
        return v


class ScalingSpec(_Strict):
    """Resources of every trial (Ray Train ScalingConfig) and Tune's concurrency."""

    num_workers: Int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, Float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_concurrent_trials: Int = Field(1, ge=1)
    max_failures: Int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint
    # A trial whose workers cannot be placed fails after two waits this long (no hang).
    worker_start_timeout_s: Float = Field(120.0, gt=0)


class TuneSpec(_Strict):
    """Tune's trial scheduler. `asha` stops trials early on `val_top1`, comparing trials at
    the same number of reports (Tune's training_iteration: one per evaluation)."""

    scheduler: Literal["fifo", "asha"] = "fifo"
    grace_period: Int = Field(1, ge=1)
    reduction_factor: Float = Field(2.0, gt=1)
    max_t: Int = Field(100, ge=1)  # asha: a trial is stopped after this many reports
    # A trial starts in the Tune actor (process) of a finished one instead of a new one
    # (Tune's reuse_actors; fifo only), its imports and report queue kept: the quickstart's
    # wall time 0.89x on its 8 trials (bench/sweep_overhead.py).
    reuse_actors: bool = True
    # How the trials are chosen (sweeper.search.ALGORITHMS): grid (every list value), random
    # (num_samples draws of the distributions, crossed with the grid axes), optuna (TPE).
    search: SearchName = "grid"
    num_samples: Int = Field(1, ge=1)
    search_seed: Int | None = 0  # null: unseeded


class SweepSpec(_Strict):
    """The whole search space, as written in the YAML file."""

    name: str = Field(pattern=NAME, max_length=100)
    storage: str = "./results"  # a path, or a URI: s3://bucket/prefix, gs://..., hdfs://...
    # The pyarrow filesystem of `storage`, from options: {type: s3|gcs|hdfs|local|fsspec,
    # ...} (sweeper.storage); default: the one pyarrow resolves from the URI.
    storage_filesystem: FilesystemOptions = None
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

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, VariantSpec]) -> dict[str, VariantSpec]:
        # A variant's name starts every trial's folder name: no path separators.
        for name in v:
            if not re.fullmatch(NAME, name) or len(name) > 60:
                raise ValueError(f"variant name {name[:60]!r} must be letters, digits, '_', "
                                 "'.', '-' (starting with a letter or digit, at most 60)")
        return v


class TrialConfig(_Strict):
    """Everything one trial needs, resolved: the spec with its variant and axes applied."""

    trial_id: str
    experiment: str
    variant: str
    loss: LossName
    freeze_vision: bool
    text_source: TextSource
    batch_size: Int
    n_train_classes: Int
    seed: Int
    axes: dict[str, Any]  # the grid point, as the user wrote its axes
    # The local checkpoint directory `model.pretrained` was resolved to before the sweep
    # (sweeper.prepare); None in a config that was never prepared.
    model_path: str | None = None
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec
    checkpoint: CheckpointSpec
    scaling: ScalingSpec
    peft: PeftSpec | None = None  # the variant's, `towers` resolved



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


def apply_override(doc: dict[str, Any], keys: list[str], value: Any) -> None:
    node = doc
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{'.'.join(keys[: i + 1])}: is not a mapping, cannot set {keys[-1]}")
        node = child
    node[keys[-1]] = value


def _check_size(doc: Any, source: str) -> None:
    """Refuse a document that expands (YAML aliases repeat a node without copying it) to
    more than MAX_SPEC_VALUES values or nests deeper than MAX_SPEC_DEPTH: validating it
    would take minutes, or never end."""
    stack, n = [(doc, 0)], 0
    while stack:
        node, depth = stack.pop()
        n += 1
        if n > MAX_SPEC_VALUES:
            raise SpecError(f"{source}: the search space expands to more than "
                            f"{MAX_SPEC_VALUES} values (YAML aliases?)")
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"{source}: the search space nests deeper than {MAX_SPEC_DEPTH} "
                            "levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for kv in node.items() for v in kv)
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def parse_yaml(text: str, source: str = "<spec>") -> dict[str, Any]:
    """Parse YAML with the safe loader only; refuse anything but a mapping at the top, and
    documents too large to validate quickly."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: {len(text)} characters; a search space is at most "
                        f"{MAX_SPEC_BYTES}")
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(f"{source}: the search space nests too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{source}:{where}: invalid YAML: {problem}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: the search space must be a YAML mapping")
    _check_size(doc, source)
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
        apply_override(doc, *_parse_override(item))
    _check_size(doc, str(p))
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
    for key, values in (spec.grid.model_extra or {}).items():
        _check_extra_axis(spec, key, values)
    for key, v in keyed_values(spec, "variant"):
        if v not in spec.variants:
            raise SpecError(
                f"{key}: variant {v!r} is not defined in variants "
                f"(defined: {', '.join(sorted(spec.variants))})"
            )
    nw = spec.scaling.num_workers
    for key, b in keyed_values(spec, "batch_size"):
        if b % nw:
            raise SpecError(f"{key}: {b} must be divisible by scaling.num_workers={nw}")
    n_cls = n_dataset_classes(spec)
    if n_cls is not None:
        for key, k in keyed_values(spec, "n_train_classes"):
            if k > n_cls:
                raise SpecError(f"{key}: {k} exceeds the dataset's {n_cls} classes")
    sources = {v for _, v in keyed_values(spec, "text_source")}
    needs_captions = "captions" in sources or "mixed" in sources
    d = spec.data
    no_manifest = (d.root is not None and d.captions is None
                   and not formats()[d.format].captions_inside)
    if needs_captions and no_manifest:
        raise SpecError("data.captions: text_source 'captions' needs a captions manifest")
    retrieval = [k for k, v in setting_values(spec, "eval.retrieval") if v is True]
    if no_manifest and retrieval:
        raise SpecError(f"{retrieval[0]}: true needs captions of val images (data.captions)")
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
    try:
        search.check(spec, MAX_TRIALS)
    except ValueError as e:
        raise SpecError(str(e)) from None
    _check_micro_batches(spec)
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


def _check_micro_batches(spec: SweepSpec) -> None:
    """`train.micro_batch_size` (of train, a variant, or a grid axis, which wins) must divide
    every per-worker batch `batch_size / num_workers`."""
    nw = spec.scaling.num_workers
    axis = "train.micro_batch_size" in (spec.grid.model_extra or {})
    batches = keyed_values(spec, "batch_size")
    for v in dict.fromkeys(x for _, x in keyed_values(spec, "variant")):
        over = spec.variants[v].train
        micros = (keyed_values(spec, "train.micro_batch_size") if axis else
                  [(f"variants.{v}.train.micro_batch_size", over["micro_batch_size"])]
                  if "micro_batch_size" in over else
                  [("train.micro_batch_size", spec.train.micro_batch_size)])
        for key, m in micros:
            for bkey, b in batches:
                if m is not None and (b // nw) % int(m):
                    raise SpecError(f"{key}: {m} does not divide the per-worker batch "
                                    f"{bkey}={b} / scaling.num_workers={nw} = {b // nw}")


def _check_feature_cache(spec: SweepSpec) -> None:
    """A frozen tower's cached features are of the unaugmented images: a variant that
    freezes the vision tower with `data.cache_features` on cannot also augment."""
    frozen = [v for v in dict.fromkeys(x for _, x in keyed_values(spec, "variant"))
              if spec.variants[v].freeze_vision]
    caches = [v for _, v in setting_values(spec, "data.cache_features")]
    if not frozen or not any(caches):
        return
    for key, aug in setting_values(spec, "data.augment"):
        if aug != "none":
            raise SpecError(
                f"{key}: {aug!r} cannot be combined with data.cache_features on variant "
                f"{frozen[0]!r} (freeze_vision: its image features are computed once, "
                "unaugmented); set data.cache_features: false or data.augment: none")


def _axis_probes(path: str, raw: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """The parsed axis `raw` and every value it may take that validation tries, each with
    where it is written: a list's values; a distribution's choices, or its ends and a
    middle value."""
    try:
        axis = search.parse_axis(raw)
    except ValueError as e:
        raise SpecError(f"{path}: {e}") from None
    if isinstance(axis, list):
        return axis, [(f"{path}[{i}]", v) for i, v in enumerate(axis)]
    if axis.kind == "choice":
        return axis, [(f"{path}.choice[{i}]", v) for i, v in enumerate(axis.args)]
    return axis, [(f"{path}: {axis} draws {v:g}", v) for v in axis.probe_values()]


def _check_variant_axis(spec: SweepSpec, key: str, raw: Any) -> None:
    """A grid axis over a key of one variant (`variants.siglip-lora.peft.r`): it changes
    that variant's trials only, so the grid must run that variant alone (beside another
    one it would repeat the other's trials unchanged, once per value)."""
    path = _loc_to_path(("grid", key))
    found = variant_axis(spec.variants, key)
    if found is None:
        raise SpecError(f"{path}: names no key of a defined variant (defined: "
                        f"{', '.join(sorted(spec.variants))})")
    name, sub = found
    _, probes = _axis_probes(path, raw)
    variants = search.values(spec, "variant") or []
    others = [v for v in dict.fromkeys(variants) if v != name]
    if name not in variants:
        raise SpecError(f"{path}: variant {name!r} is not in grid.variant")
    if others:
        raise SpecError(f"{path}: changes variant {name!r} only, but grid.variant also runs "
                        f"{others[0]!r}, whose trials it would repeat unchanged once per "
                        f"value; define one variant per value instead ({name}-a, {name}-b, "
                        f"...) or sweep {name!r} alone")
    for where, v in probes:
        doc = spec.model_dump(exclude_unset=True)
        doc["grid"] = {k: val for k, val in doc["grid"].items() if "." not in k}
        apply_override(doc["variants"][name], sub, v)
        try:
            one = SweepSpec.model_validate(doc)
            _check_micro_batches(one)
            _check_feature_cache(one)
        except ValidationError as e:
            raise SpecError(f"{where}: {_validation_error(e)}") from None
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None


def _check_extra_axis(spec: SweepSpec, key: str, raw: Any) -> None:
    """A dotted axis addresses a spec key, and every value it may take (a list's values; a
    distribution's choices, or its ends and a middle value) is valid there."""
    path = _loc_to_path(("grid", key))
    parts = str(key).split(".")
    if parts[0] == "variants":
        _check_variant_axis(spec, key, raw)
        return
    if len(parts) < 2 or parts[0] not in search.SECTIONS:
        raise SpecError(
            f"{path}: unknown axis (use variant, text_source, batch_size, n_train_classes, "
            "seed, or a dotted path such as train.lr or variants.<name>.peft.r)"
        )
    axis, probes = _axis_probes(path, raw)
    if parts[0] == "model" and isinstance(axis, Distribution) and axis.finite_values() is None:
        raise SpecError(f"{path}: {axis} is drawn from a range; a model axis takes a list or "
                        "a choice (every model is prepared before the sweep)")
    doc = spec.model_dump(exclude_unset=True)
    doc["grid"] = {k: val for k, val in doc["grid"].items() if "." not in k}
    for where, v in probes:
        apply_override(doc, parts, v)
        try:
            SweepSpec.model_validate(doc)
        except ValidationError as e:
            first = e.errors()[0]
            loc = _loc_to_path(tuple(first["loc"]))
            msg = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                msg = "unknown key"
            raise SpecError(f"{where}: {loc}: {msg}".splitlines()[0]) from None


def spec_fingerprint(spec: SweepSpec) -> str:
    """Hash of what defines the experiment's results (not where they are stored)."""
    doc = spec.model_dump(mode="json",
                          exclude={"storage": True, "storage_filesystem": True,
                                   "scaling": {"max_concurrent_trials"}})
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
