"""The trials of a sweep: each grid point applied to the spec (the variant with its own
axes, its overrides, then the dotted axes), resolved into the `TrialConfig` a trial runs, in
Tune's grid order.
"""

from __future__ import annotations

from typing import Any

from sweeper.grid import grid_points, trial_id_for
from sweeper.spec import (
    CheckpointSpec,
    DataSpec,
    EvalSpec,
    ModelSpec,
    SweepSpec,
    TrainSpec,
    TrialConfig,
    VariantSpec,
    apply_override,
    variant_axis,
)


def resolve_trial(spec: SweepSpec, point: dict[str, Any],
                  model_paths: dict[str, str] | None = None) -> TrialConfig:
    """Apply a grid point (the variant with its own axes, its overrides, then the dotted
    axes) to the spec; `model_paths` ({model spec JSON: checkpoint directory}, from
    `sweeper.prepare`) gives `model_path`."""
    var = _variant(spec, point)
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
        if "." in key and not key.startswith("variants."):
            apply_override(sections, key.split("."), value)
    model = ModelSpec.model_validate(sections["model"])
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
        model=model,
        model_path=(model_paths or {}).get(model_key(model)),
        data=DataSpec.model_validate(sections["data"]),
        train=TrainSpec.model_validate(sections["train"]),
        eval=EvalSpec.model_validate(sections["eval"]),
        checkpoint=CheckpointSpec.model_validate(sections["checkpoint"]),
        scaling=spec.scaling,
        peft=var.peft.for_variant(var.freeze_vision) if var.peft else None,
    )


def _variant(spec: SweepSpec, point: dict[str, Any]) -> VariantSpec:
    """The grid point's variant with its own axes (`variants.<name>.<key>`) applied."""
    name = point["variant"]
    var = spec.variants[name]
    doc = var.model_dump(exclude_unset=True)
    changed = False
    for key, value in point.items():
        found = variant_axis(spec.variants, key)
        if found is not None and found[0] == name:
            apply_override(doc, found[1], value)
            changed = True
    return VariantSpec.model_validate(doc) if changed else var


def model_key(model: ModelSpec) -> str:
    """The key of a model spec in a `model_paths` mapping (see `resolve_trial`)."""
    return model.model_dump_json()


def trial_configs(spec: SweepSpec,
                  model_paths: dict[str, str] | None = None) -> list[TrialConfig]:
    """Every trial of the sweep, resolved, in grid order."""
    return [resolve_trial(spec, p, model_paths) for p in grid_points(spec)]


def sweep_models(spec: SweepSpec) -> list[ModelSpec]:
    """The distinct model specs the sweep's trials start from (variants and grid axes may
    override `model`)."""
    models: dict[str, ModelSpec] = {}
    for t in trial_configs(spec):
        models.setdefault(model_key(t.model), t.model)
    return list(models.values())
