"""Shared pieces of the benchmarks in `bench/`: a small model shaped like SigLIP-B/16, the
synthetic data, trial configs, in-process trials and the `name: value` output.

The model: vision 224 px / patch 16 (196 tokens), text padded to 64 tokens, both towers
128 wide with 2 layers and 4 heads (SigLIP-B/16 is 768 wide, 12 layers: the same token
counts, so the same vision/text FLOP ratio), randomly initialised, saved once with
`save_pretrained` and loaded by the trials through `from_pretrained` like any checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_TINY = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "patch_size": 16,
              "image_size": 224, "max_length": 64}


def emit(name: str, value: Any) -> None:
    """One `name: value` line (floats with 4 significant digits), flushed at once."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{name}: {value}", flush=True)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def one_thread() -> None:
    """One intra-op thread, as a Ray Train worker with 1 CPU gets (OMP_NUM_THREADS=1). On
    a small shared machine this also keeps timings stable: two threads stall at every
    parallel region whenever another process holds the other core."""
    import torch

    torch.set_num_threads(1)


def cache_dir() -> Path:
    """The sweeper cache the benchmarks use ($SWEEPER_CACHE or ~/.cache/sweeper)."""
    from sweeper.synthetic import default_cache_dir

    d = default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


def bench_model_dir(tiny: dict[str, Any] | None = None) -> Path:
    """A randomly initialised SigLIP of the bench shape, saved once (file-locked)."""
    from sweeper.models import build_tiny
    from sweeper.spec import TinyModelSpec
    from sweeper.synthetic import vocabulary

    spec = TinyModelSpec(**(tiny or BENCH_TINY))
    key = "-".join(f"{k[0]}{v}" for k, v in sorted(spec.model_dump().items()))
    out = cache_dir() / "models" / f"bench-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
            model, processor = build_tiny(spec, vocabulary())
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            os.replace(tmp, out)
    return out


def synthetic(n_classes: int, per_class: int, val_per_class: int,
              image_size: int = 256) -> dict[str, Any]:
    """A synthetic dataset spec (PNG images of `image_size` px, resized to 224 by the
    model's processor: decoding and resizing cost what they cost on real data)."""
    from sweeper.synthetic import dataset_dir

    dataset_dir(n_classes, per_class, val_per_class, image_size, 0, cache_dir())
    return {"n_classes": n_classes, "train_per_class": per_class,
            "val_per_class": val_per_class, "image_size": image_size, "seed": 0}


def spec_doc(model_dir: Path | str, synth: dict[str, Any], storage: Path | str,
             **sections: Any) -> dict[str, Any]:
    """A search space over the bench model and data; `sections` update its top keys."""
    doc: dict[str, Any] = {
        "name": "bench",
        "storage": str(storage),
        "model": {"pretrained": str(model_dir)},
        "variants": {"siglip": {"loss": "sigmoid", "freeze_vision": False},
                     "siglit": {"loss": "sigmoid", "freeze_vision": True}},
        # Decoding in the training process unless a bench says otherwise (they time the
        # step and the data path apart; hot_loop.py times the defaults).
        "data": {"synthetic": synth, "templates": ["a photo of a {}."], "num_workers": 0},
        "train": {"epochs": 2, "lr": 1e-4},
        "eval": {"batch_size": 64},
        "grid": {"variant": ["siglit"], "text_source": ["templates"], "batch_size": [32],
                 "n_train_classes": [synth["n_classes"]], "seed": [0]},
        "scaling": {"num_workers": 1, "max_concurrent_trials": 1},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    return doc


def resolved_trials(spec: Any, cache: str | Path | None = None) -> list[Any]:
    """Every trial of a grid sweep with its model resolved (what in-process runs use)."""
    from sweeper.prepare import prepare_inputs
    from sweeper.trials import trial_configs

    return trial_configs(spec, prepare_inputs(spec, cache, announce=False))


def trial_config(doc: dict[str, Any]) -> Any:
    """The (first) trial of a search-space document, its model resolved."""
    from sweeper.spec import validate

    return resolved_trials(validate(doc), cache_dir())[0]


def run_in_process(cfg: Any, trial_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a trial through `worker.run_trial` in this process; (final status, history)."""
    from sweeper.sink import TrialSink
    from sweeper.worker import WorkerContext, run_trial

    shutil.rmtree(trial_dir, ignore_errors=True)
    ctx = WorkerContext(trial_dir=trial_dir, cache_dir=cache_dir())
    final = run_trial(cfg, ctx)
    return final, TrialSink(trial_dir).history()


def interval_seconds(history: list[dict[str, Any]]) -> list[float]:
    """Wall time of the training steps between consecutive reports (evaluation excluded):
    samples drawn in the interval / the worker's reported samples_per_s."""
    out, prev = [], 0
    for row in history:
        sps = row.get("samples_per_s")
        if row.get("step", 0) > 0 and sps:
            out.append((row["samples_seen"] - prev) / sps)
        prev = row.get("samples_seen", prev)
    return out


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def write_json(path: Path | str | None, obj: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))
