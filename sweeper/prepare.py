"""What is built once per sweep, before any trial launches: every model the trials start
from resolved to a local checkpoint directory (the offline presets pretrained, hub models
downloaded into the Hugging Face cache), and the synthetic dataset generated.

The resolved directories travel in each trial's config (`TrialConfig.model_path`), so a
worker only ever loads a directory: it never builds, downloads or pretrains a model. With
`storage` on a bucket the presets built here are uploaded to `<storage>/.cache/models/`,
and a node that does not have one copies it into its own cache (`node_local_model`).
Never imports Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweeper import data as D
from sweeper.models import PRESETS, hub_snapshot, local_checkpoint
from sweeper.spec import ModelSpec, SweepSpec, TrialConfig
from sweeper.storage import Location, publish_dir, pull_dir
from sweeper.synthetic import default_cache_dir
from sweeper.trials import model_key, sweep_models

MODEL_MARKER = "config.json"  # the file a checkpoint folder is complete with


def resolve_checkpoint(model_spec: ModelSpec, cache_dir: str | Path | None = None) -> str:
    """The local checkpoint directory of `model.pretrained`: a preset pretrained on first
    use (cached by its config), a model directory as given, or a hub model's snapshot in the
    Hugging Face cache (downloaded if absent). Raises `ModelError` (one line)."""
    name = model_spec.pretrained
    if name in PRESETS:
        # Imported here: it loads transformers, which the processes that import this module
        # through sweeper.orchestration (Tune's trial actors, Train's controllers, to
        # unpickle the train function) never need.
        from sweeper.pretrain import ensure_tiny

        return str(ensure_tiny(model_spec.tiny, cache_dir, arch=PRESETS[name]))
    path = local_checkpoint(name)
    return path if Path(path).is_dir() else hub_snapshot(path)


def model_paths(spec: SweepSpec, cache_dir: str | Path | None = None,
                announce: bool = False) -> dict[str, str]:
    """{model_key: checkpoint directory} for every model the sweep's trials start from."""
    out = {}
    for m in sweep_models(spec):
        if announce and m.pretrained in PRESETS:
            print(f"Preparing the {m.pretrained} pretrained model (cached after the first "
                  "run) ...", flush=True)
        out[model_key(m)] = resolve_checkpoint(m, cache_dir)
    return out


def prepare_inputs(spec: SweepSpec, cache_dir: str | Path | None = None,
                   announce: bool = True) -> dict[str, str]:
    """Build what every trial reads, once: the models (see `model_paths`, returned) and the
    synthetic dataset."""
    paths = model_paths(spec, cache_dir, announce)
    if spec.data.synthetic is not None:
        D.data_root(spec.data, cache_dir)
    return paths


def with_model_path(cfg: TrialConfig, cache_dir: str | Path | None = None,
                    **updates: Any) -> TrialConfig:
    """`cfg` with its `model_path` resolved (and any other field updated)."""
    path = resolve_checkpoint(cfg.model, cache_dir)
    return cfg.model_copy(update={"model_path": path, **updates})


def _published(storage: Location, path: str | Path) -> Location:
    return storage / ".cache" / "models" / Path(path).name


def publish_models(spec: SweepSpec, model_paths: dict[str, str], storage: Location) -> None:
    """Upload the preset models the sweep built (`model_paths`) to
    `<storage>/.cache/models/<name>/`, unless they are there already."""
    for m in sweep_models(spec):
        if m.pretrained not in PRESETS:
            continue
        local = Path(model_paths[model_key(m)])
        if not (_published(storage, local) / MODEL_MARKER).is_file():
            publish_dir(local, _published(storage, local), MODEL_MARKER)


def node_local_model(cfg: TrialConfig, storage: Location,
                     cache_dir: str | Path | None = None) -> TrialConfig:
    """`cfg` with a `model_path` this node has: the one resolved before the sweep, else
    (a preset built on another node) the copy in this node's cache, fetched from
    `<storage>/.cache/models/` if absent. Unchanged when neither exists (the worker then
    says which model is missing)."""
    if not cfg.model_path or Path(cfg.model_path).is_dir() or cfg.model.pretrained not in PRESETS:
        return cfg
    base = (Path(cache_dir) if cache_dir else default_cache_dir()).expanduser().resolve()
    local = base / "models" / Path(cfg.model_path).name
    if (local / MODEL_MARKER).is_file() or pull_dir(_published(storage, cfg.model_path),
                                                    local, MODEL_MARKER):
        return cfg.model_copy(update={"model_path": str(local)})
    return cfg
