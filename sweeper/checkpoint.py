"""Trial checkpoints (what a resume needs to continue exactly) and the final model.

A checkpoint is one `state.pt`: the trainable weights, optimizer, scheduler, loop state
and RNG states. The final model is Hugging Face's `save_pretrained` output. Never imports
Ray: the worker loop hands the checkpoint folder to `ctx.report`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sweeper.models import DualEncoder


def _trainable_state(enc: DualEncoder) -> dict[str, torch.Tensor]:
    """What changes during training: a frozen vision tower is not saved again."""
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in enc.state_dict().items()
            if k in names or not enc.freeze_vision}


def save_checkpoint(path: Path, enc: DualEncoder, optimizer: Any, scheduler: Any,
                    state: dict[str, Any]) -> None:
    """`path/state.pt`: the trainable weights (all of them unless the vision tower is
    frozen), optimizer, scheduler, the loop state and the RNG states."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"model": _trainable_state(enc), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": state, "rng": rng},
               path / "state.pt")


def load_checkpoint(path: Path, enc: DualEncoder, optimizer: Any = None,
                    scheduler: Any = None, restore_rng: bool = False) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint` into `enc` (built from the same
    pretrained model), and the optimizer, scheduler and RNG states when given; returns the
    loop state (`step`, `epoch`, `batch_in_epoch`, `samples_seen`, `best_val_top1`, ...)."""
    ck = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    # A frozen tower is not saved (it is the pretrained one): missing keys are expected,
    # unexpected ones mean another model.
    unexpected = enc.load_state_dict(ck["model"], strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: checkpoint of another model (unexpected key "
                         f"{unexpected[0]!r})")
    if optimizer is not None:
        optimizer.load_state_dict(ck["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ck["scheduler"])
    rng = ck.get("rng") or {}
    if restore_rng and "torch" in rng:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return ck["state"]


def save_final_model(out: Path, model: Any, processor: Any) -> None:
    """`save_pretrained` of the model and processor into `out` (loadable with
    `AutoModel`/`AutoProcessor.from_pretrained`), written beside it and renamed into place
    so that a reader never sees half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
