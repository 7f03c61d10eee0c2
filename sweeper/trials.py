"""A trial's config: its point (one value per axis, `sweeper.search`) applied to the spec
(the variant with its own axes, its overrides, then the dotted axes), resolved into the
`TrialConfig` it runs.
"""

from __future__ import annotations

from typing import Any

from sweeper import search
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
                  model_paths: dict[str, str] | None = None,
                  trial_id: str | None = None) -> TrialConfig:
    """Apply a point (the variant with its own axes, its overrides, then the dotted axes)
    to the spec; `model_paths` ({model spec JSON: checkpoint directory}, from
    `sweeper.prepare`) gives `model_path`. `trial_id`: the trial's name (default: the name
    of a grid point, `search.trial_name`)."""
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
        if key not in search.NAMED_AXES and not key.startswith("variants."):
            apply_override(sections, key.split("."), value)
    model = ModelSpec.model_validate(sections["model"])
    return TrialConfig(
        trial_id=trial_id or search.trial_name(point),
        experiment=spec.name,
        loss=var.loss,
        freeze_vision=var.freeze_vision,
        # The named axes are the trial's own keys.
        **{k: point[k] for k in search.NAMED_AXES},
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
    """Every trial of a sweep whose trials are known up front (a grid search), resolved,
    in the order Tune runs them; [] for a sampling search (its trials are proposed as the
    sweep runs)."""
    return [resolve_trial(spec, p, model_paths) for p in search.points(spec) or []]


def covering_configs(spec: SweepSpec, select: Any,
                     model_paths: dict[str, str] | None = None) -> list[TrialConfig] | None:
    """Trial configs that take every combination of the values of the axes `select` picks
    (`search.covering_points`): what a question about those axes alone needs. None when a
    picked axis is drawn from a range too large to list."""
    pts = search.covering_points(spec, select)
    return None if pts is None else [resolve_trial(spec, p, model_paths) for p in pts]


def model_axis(key: str) -> bool:
    """Axes the model a trial starts from depends on: its variant and `model.*` keys."""
    return key == "variant" or key.startswith("model.")


def sweep_models(spec: SweepSpec) -> list[ModelSpec]:
    """The distinct model specs the sweep's trials start from (variants and grid axes may
    override `model`; a model axis always lists its values, so they are all known)."""
    models: dict[str, ModelSpec] = {}
    for t in covering_configs(spec, model_axis) or []:
        models.setdefault(model_key(t.model), t.model)
    return list(models.values())
