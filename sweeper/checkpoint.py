"""Trial checkpoints (what a resume needs to continue exactly) and the final model.

A checkpoint is a folder of two files: `state.pt` (the weights that train, in float32: all
of them in full fine-tuning, the text tower's under a frozen vision tower, with LoRA the
adapters, temperature and bias alone; the scheduler, the loop state and the RNG states)
and `optimizer.pt` (AdamW's two moments per trainable weight: twice the weights' bytes). A
resume needs both; a checkpoint kept only for its weights (the best of a trial) does not
need the second, so the orchestration deletes it from every checkpoint but the latest
(`strip_optimizer`), and prunes a finished trial's checkpoints to the best
`checkpoint.keep` (`prune_plan`). The final model is Hugging Face's `save_pretrained`
output (with LoRA: merged, the adapter beside it). Never imports Ray: the worker loop hands
the checkpoint folder to `ctx.report`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sweeper import adapters
from sweeper.experiment import storage_is_remote
from sweeper.models import DualEncoder

log = logging.getLogger(__name__)

STATE, OPTIMIZER = "state.pt", "optimizer.pt"
FINAL_ADAPTER = "final_adapter"  # beside final_model/: a LoRA trial's adapter, peft's format


def _trainable_state(enc: DualEncoder) -> dict[str, torch.Tensor]:
    """What changes during training: the whole model in full fine-tuning, else the weights
    that train alone (a frozen vision tower is the pretrained one; with LoRA adapters, the
    adapters, the temperature and the bias)."""
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    partial = enc.freeze_vision or any(
        not p.requires_grad for n, p in enc.named_parameters() if enc.tower_of(n) != "logit")
    return {k: v.detach() for k, v in enc.state_dict().items() if k in names or not partial}


def save_checkpoint(path: Path, enc: DualEncoder, optimizer: Any, scheduler: Any,
                    state: dict[str, Any]) -> dict[str, int]:
    """`path/state.pt` (the trainable weights, all of them unless the vision tower is
    frozen, the scheduler, the loop state and the RNG states) and `path/optimizer.pt`;
    returns the bytes written per file."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    weights = {k: v.cpu() for k, v in _trainable_state(enc).items()}
    torch.save({"model": weights, "scheduler": scheduler.state_dict(),
                "state": state, "rng": rng}, path / STATE)
    torch.save(optimizer.state_dict(), path / OPTIMIZER)
    return {f: (path / f).stat().st_size for f in (STATE, OPTIMIZER)}


def checkpoint_nbytes(enc: DualEncoder) -> dict[str, int]:
    """The tensor bytes a checkpoint of `enc` holds, computed without writing it (works on
    the meta device): `weights` (the trainable state in float32) and `optimizer` (AdamW's
    two float32 moments per trainable parameter). The files add a few KiB of pickle."""
    names = set(_trainable_state(enc))
    # keep_vars: the tensors themselves, so that one aliased twice (DualEncoder.logit_bias)
    # counts once, as torch.save stores it once.
    tensors = {id(v): v for k, v in enc.state_dict(keep_vars=True).items() if k in names}
    weights = sum(v.numel() * v.element_size() for v in tensors.values())
    moments = sum(2 * p.numel() * 4 for p in enc.parameters() if p.requires_grad)
    return {"weights": weights, "optimizer": moments}


def load_checkpoint(path: Path, enc: DualEncoder, optimizer: Any = None,
                    scheduler: Any = None, restore_rng: bool = False) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint` into `enc` (built from the same
    pretrained model), and the optimizer, scheduler and RNG states when given; returns the
    loop state (`step`, `epoch`, `batch_in_epoch`, `samples_seen`, `best_val_top1`, ...).
    A checkpoint whose optimizer state was stripped (`strip_optimizer`) restores the
    weights and restarts AdamW's moments, with a warning."""
    path = Path(path)
    ck = torch.load(path / STATE, map_location="cpu", weights_only=True)
    # A frozen tower is not saved (it is the pretrained one): missing keys are expected,
    # unexpected ones mean another model.
    unexpected = enc.load_state_dict(ck["model"], strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: checkpoint of another model (unexpected key "
                         f"{unexpected[0]!r})")
    if optimizer is not None:
        if (path / OPTIMIZER).is_file():
            optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location="cpu",
                                                 weights_only=True))
        elif "optimizer" in ck:  # a checkpoint of one file (sweeper before issue 15)
            optimizer.load_state_dict(ck["optimizer"])
        else:
            log.warning("%s: no optimizer state (kept only in the latest checkpoint); "
                        "AdamW's moments restart from zero", path)
    if scheduler is not None:
        scheduler.load_state_dict(ck["scheduler"])
    rng = ck.get("rng") or {}
    if restore_rng and "torch" in rng:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return ck["state"]


def checkpoint_upload(upload: str, storage: str) -> str:
    """`checkpoint.upload` resolved for checkpoints stored under `storage`: `sync` or
    `async` as written; `auto` is `async` where the storage is remote
    (`experiment.storage_is_remote`: a network or FUSE filesystem, an object store), so
    that a copy over the network never stalls the GPUs, and `sync` on a local disk."""
    if upload != "auto":
        return upload
    return "async" if storage_is_remote(storage) else "sync"


def strip_optimizer(fs: Any, path: str) -> bool:
    """Delete the optimizer state of the checkpoint folder `path` on the pyarrow
    filesystem `fs` (a Ray Train checkpoint's `filesystem` and `path`); whether there was
    one. A checkpoint already deleted is not an error."""
    try:
        fs.delete_file(f"{path.rstrip('/')}/{OPTIMIZER}")
        return True
    except (FileNotFoundError, OSError):
        return False


def prune_plan(entries: list[tuple[Any, dict[str, Any]]], keep: int
               ) -> tuple[list[Any], list[Any]]:
    """(kept, dropped) of a finished trial's checkpoints `(checkpoint, metrics)`: the best
    `keep` by `val_top1` (ties: the earlier step, as `best_step`; no accuracy ranks last)
    are kept, in that order."""
    def rank(e: tuple[Any, dict[str, Any]]) -> tuple[bool, float, int]:
        top1 = e[1].get("val_top1")
        return (top1 is None, -(top1 or 0.0), int(e[1].get("step") or 0))

    ordered = sorted(entries, key=rank)
    return [c for c, _ in ordered[:keep]], [c for c, _ in ordered[keep:]]


def strip_older_optimizers(persisted: list[Any], latest: Any) -> None:
    """Keep the optimizer state in the latest persisted checkpoint only (Ray Train
    checkpoints: `.filesystem`, `.path`): a resume starts from the latest, and the older
    ones Ray keeps (the best by val_top1) are kept for their weights. `persisted` is the
    caller's list of this run's checkpoints seen so far; `latest` lags the last report by
    one while an asynchronous upload is under way."""
    if latest is None or (persisted and persisted[-1].path == latest.path):
        return
    persisted.append(latest)
    for old in persisted[:-1]:
        strip_optimizer(old.filesystem, old.path)
    del persisted[:-1]


def prune_finished(entries: list[tuple[Any, dict[str, Any]]], keep: int) -> int:
    """A finished trial's checkpoints (`(checkpoint, metrics)`, Ray Train's
    `Result.best_checkpoints`) pruned to the best `keep` by val_top1 (Ray keeps the latest
    as well, for a resume that will not come), without their optimizer state; returns how
    many were deleted."""
    kept, dropped = prune_plan(list(entries), keep)
    for ck in dropped:
        with contextlib.suppress(FileNotFoundError, OSError):
            ck.filesystem.delete_dir(ck.path)
    for ck in kept:
        strip_optimizer(ck.filesystem, ck.path)
    return len(dropped)


def save_final_model(out: Path, model: Any, processor: Any, adapted: Any = None) -> None:
    """`save_pretrained` of the model and processor into `out` (loadable with
    `AutoModel`/`AutoProcessor.from_pretrained`), written beside it and renamed into place
    so that a reader never sees half a model. With LoRA adapters (`adapted`, the
    `PeftModel` around `model`), the adapter in peft's format goes to `FINAL_ADAPTER`
    beside `out` first, then `out` holds the model with the adapters merged in
    (`adapters.save`: the adapters are merged into `model` in place)."""
    if adapted is not None:
        model = _write_dir(out.parent / FINAL_ADAPTER, lambda d: adapters.save(adapted, d))
    _write_dir(out, lambda d: (model.save_pretrained(d), processor.save_pretrained(d)))


def _write_dir(out: Path, write: Callable[[Path], Any]) -> Any:
    """`write(folder)` into a new folder beside `out`, then renamed into place; returns
    what `write` returns."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = write(tmp)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
