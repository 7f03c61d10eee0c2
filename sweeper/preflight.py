"""The one validator of a run: everything a sweep refuses before its first trial, in the
order a run checks it, shared by `--dry-run` and a real run.

`load_spec` has already refused what the spec alone says is wrong (`sweeper.spec`); this
adds what needs the machine, never Ray: the storage, the loggers' packages, resources (a
local run: this machine's CPUs and GPUs; a cluster run is checked again after joining),
the dataset's layout, the model (present, of a supported two-tower family, with a processor
that makes what it takes, taking the LoRA adapters a variant asks for), and the experiment
folder (a changed spec, a folder that is not
ours). It reads and never writes (but for one probe object, deleted again, that proves a
bucket takes our writes): a dry run leaves no trace, and a refused run loses nothing
already written. Every refusal is one line naming the key or
file (`SpecError`, `DataError`, `ModelError`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from sweeper import data as D
from sweeper import search
from sweeper.experiment import check_storage, plan_experiment
from sweeper.families import (
    FAMILIES,
    PRESETS,
    Family,
    ModelError,
    family_of,
    family_of_model,
    supported,
)
from sweeper.models import IMAGE_BACKEND, check_loadable
from sweeper.resources import check_fits, local_nodes
from sweeper.spec import ModelSpec, SpecError, SweepSpec
from sweeper.trials import covering_configs, model_axis, model_key, sweep_models

# The package each logger of `loggers` needs, as Ray's callbacks import it.
LOGGER_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def cluster_address(address: str | None) -> str | None:
    """The cluster to join (`--address`, else RAY_ADDRESS), or None for a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def check_search(spec: SweepSpec) -> None:
    """Refuse a search algorithm whose package is not installed (`optuna`: an extra)."""
    missing = search.missing_package(spec)
    if missing:
        raise SpecError(missing)


def check_loggers(spec: SweepSpec) -> None:
    """Refuse a logger whose package is not installed."""
    for i, name in enumerate(spec.loggers):
        pkg = LOGGER_PACKAGES.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise SpecError(f"loggers[{i}]: {name} needs the {pkg!r} package, which is not "
                            f"installed (pip install {pkg}), or remove it from loggers")


def check_data(spec: SweepSpec) -> None:
    """Refuse a real dataset whose layout, class names, captions or class lists are bad,
    that cannot be reached (a bucket), or that has fewer classes than a grid point trains
    on (synthetic data is checked by the spec itself)."""
    # Every data section a trial reads: grid axes under `data.` (a format, a root) too.
    datas = {t.data.model_dump_json(): t.data
             for t in covering_configs(spec, lambda k: k.startswith("data.")) or []} \
        if any(k.startswith("data.") for k in spec.grid.model_extra or {}) else {"": spec.data}
    counts = search.keyed_values(spec, "n_train_classes")
    sources = [v for _, v in search.keyed_values(spec, "text_source")]
    for data in datas.values():
        if data.synthetic is not None:
            continue
        train, val = D.check_dataset(data, [k for _, k in counts], sources)
        for key, k in counts:
            if k > len(train.wnids):
                raise SpecError(f"{key}: {k} exceeds the dataset's {len(train.wnids)} classes")
        if not any(s.captions for s in val.samples):
            for key, v in search.setting_values(spec, "eval.retrieval"):
                if v is True:
                    raise D.DataError(f"{key}: true, but no val image of "
                                      f"{data.root} has a caption")


def _json(folder: Path, name: str) -> dict[str, Any]:
    f = folder / name
    try:
        doc = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError):
        raise ModelError(f"model.pretrained: {f} is not valid JSON") from None
    return doc if isinstance(doc, dict) else {}


def check_family(model: ModelSpec) -> Family:
    """The checkpoint's family (`sweeper.families`), refusing one that is not a two-tower
    image-text model sweeper supports (a vision-only ViT, a text-only BERT, a captioning
    model), one whose processor cannot make what its model takes (a NaFlex model with a
    fixed-size image processor and the reverse, images of another size than the model's,
    no tokenizer), and `model.max_num_patches` on a model without a patch budget. Reads the
    checkpoint's config and processor files, never its weights."""
    name = model.pretrained
    folder = check_loadable(model)
    if folder is None:  # a preset: built here, of a known family
        family = FAMILIES[PRESETS[name]]
    else:
        family = _checkpoint_family(name, folder, model.trust_remote_code)
    if model.max_num_patches is not None and not family.naflex:
        raise ModelError(f"model.max_num_patches: {name!r} is a {family.label} checkpoint, "
                         "which takes fixed-size images; only SigLIP 2 NaFlex (siglip2) "
                         "checkpoints take a patch budget")
    return family


def _checkpoint_family(name: str, folder: Path, trust_remote_code: bool) -> Family:
    config = _json(folder, "config.json")
    model_type = config.get("model_type")
    arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
    tok_class = _json(folder, "tokenizer_config.json").get("tokenizer_class")
    family = family_of(model_type, tok_class)
    if family is None:
        raise ModelError(f"model.pretrained: {name!r} is a {model_type!r} checkpoint ({arch}),"
                         " not a two-tower image-text model sweeper supports; supported "
                         f"model types: {supported()}")
    from transformers import AutoImageProcessor

    try:
        ip = AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                backend=IMAGE_BACKEND)  # as training loads it
    except Exception as e:  # a missing or unreadable processor config, in many types
        raise ModelError(f"model.pretrained: {name!r} has no usable image processor "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    what = f"model.pretrained: {name!r} is a {family.label} ({model_type}) checkpoint"
    kind = type(ip).__name__
    vision = config.get("vision_config") or {}
    if family.naflex:
        if not D.is_patch_processor(ip):
            raise ModelError(f"{what}, whose image processor {kind} makes fixed-size images, "
                             "not the patch sequences it takes (pixel_attention_mask, "
                             "spatial_shapes: a Siglip2ImageProcessor)")
        if vision.get("patch_size", ip.patch_size) != ip.patch_size:
            raise ModelError(f"{what}, whose image processor cuts {ip.patch_size}-pixel patches "
                             f"but its vision tower takes {vision['patch_size']}-pixel ones")
    else:
        if D.is_patch_processor(ip):
            raise ModelError(f"{what}, whose image processor {kind} makes NaFlex patch "
                             "sequences, not the fixed-size images it takes")
        try:
            size = D.ImageTransform.from_processor(ip).output_size
        except ValueError as e:
            raise ModelError(f"{what}, whose image processor {kind} is not supported: "
                             f"{e}") from None
        side = vision.get("image_size")
        if size is not None and side is not None and size != (side, side):
            raise ModelError(f"{what}, whose image processor makes {size[0]}x{size[1]} images "
                             f"but its vision tower takes {side}x{side}")
    if not any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        raise ModelError(f"{what} without a tokenizer (no tokenizer_config.json or "
                         "tokenizer.json)")
    return family


def check_models(spec: SweepSpec) -> None:
    """Every model the sweep starts from (`check_family`), and the settings its family
    cannot take: a NaFlex image has no fixed size to cache decoded (`data.cache_images`)
    and is a patch sequence, not an image to mirror (`data.augment: flip`)."""
    families = {model_key(m): check_family(m) for m in sweep_models(spec)}
    if not any(f.naflex for f in families.values()):
        return
    # Every combination of the axes that decide the model and these two settings.
    settings = ("data.cache_images", "data.augment")
    for t in covering_configs(spec, lambda k: model_axis(k) or k in settings) or []:
        if not families[model_key(t.model)].naflex:
            continue
        if t.data.cache_images:
            raise SpecError(f"data.cache_images: trial {t.trial_id} fine-tunes a SigLIP 2 "
                            "NaFlex model, whose images keep their aspect ratio (no one size "
                            "to cache); set data.cache_images: false")
        if t.data.augment == "flip":
            raise SpecError(f"data.augment: flip is not supported for SigLIP 2 NaFlex (trial "
                            f"{t.trial_id}: its images are patch sequences)")


def check_adapters(spec: SweepSpec, models: bool = True) -> None:
    """Refuse a `peft` variant the sweep runs when Hugging Face peft is not installed,
    and (`models`) LoRA targets its model cannot take (`adapters.target_modules`: a name
    matching no module of the adapted towers, a module the forward bypasses, one that is
    not a linear layer), on the model's module tree built on the meta device (no weights
    read or allocated)."""
    from sweeper import adapters

    axes = spec.grid.model_extra or {}
    for v in dict.fromkeys(search.values(spec, "variant") or []):
        if spec.variants[v].peft is not None or any(
                f"{k}.".startswith(f"variants.{v}.peft.") for k in axes):
            adapters.require(f"variants.{v}.peft")
    if not models:
        return
    seen: set[str] = set()
    # Placement depends on the model and the variant's own keys alone.
    for t in covering_configs(spec, lambda k: model_axis(k) or k.startswith("variants.")) or []:
        key = f"variants.{t.variant}.peft"
        job = json.dumps([model_key(t.model), t.peft and t.peft.model_dump(mode="json"), key])
        if t.peft is None or job in seen:
            continue
        seen.add(job)
        skeleton = _skeleton(t.model)
        adapters.target_modules(skeleton, family_of_model(skeleton), t.peft, key)


def _skeleton(model: ModelSpec) -> Any:
    """The Hugging Face model of `model` on the meta device: its modules, no weights."""
    import torch

    folder = check_loadable(model)
    with torch.device("meta"):
        if folder is None:  # a preset: its builder at the preset's shape
            from sweeper.synthetic import vocabulary

            return FAMILIES[PRESETS[model.pretrained]].build(model.tiny, vocabulary())[0]
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=model.trust_remote_code)
        return AutoModel.from_config(config, trust_remote_code=model.trust_remote_code)


def preflight(spec: SweepSpec, address: str | None = None, *, new: bool = False,
              resume: bool = False) -> SweepSpec:
    """Every check a run makes before its first trial; returns the spec of the experiment
    it would open (renamed `name-2`, ... with `new` when the spec changed). Cheap checks
    first: no data is scanned for a sweep that cannot run."""
    check_storage(spec.storage, spec.storage_filesystem)
    check_search(spec)
    check_loggers(spec)
    check_adapters(spec, models=False)  # the extra first: cheap, and what most forget
    if cluster_address(address) is None:
        check_fits(spec, local_nodes())
    spec = plan_experiment(spec, new, resume)
    check_data(spec)
    check_models(spec)
    check_adapters(spec)
    return spec
