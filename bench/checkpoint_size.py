"""Bytes a trial writes per checkpoint, for SigLIP-B/16 and SigLIP so400m shapes.

A checkpoint (`sweeper.checkpoint`) is `state.pt` (the trainable weights in float32, the
scheduler, loop and RNG states) plus `optimizer.pt` (AdamW's two float32 moments per
trainable weight). Every checkpoint is written whole; once a newer one is persisted the
older ones lose `optimizer.pt` (a resume starts from the latest) and, when the trial
ends, only the best `checkpoint.keep` are left. The sizes are counted on the meta device
(`checkpoint_nbytes`: nothing is allocated or written), for SigLIP (both towers train)
and SigLiT (the frozen vision tower is not saved), and checked against a real
`save_checkpoint` of the small bench model (`checkpoint_size_check`: written bytes /
counted bytes, 1 up to the pickle's few KiB).

Shapes: SigLIP-B/16 (`google/siglip-base-patch16-224`: 768 wide, 12 layers, MLP 3072,
224 px / 16, 64 tokens, vocabulary 32000) and so400m (`google/siglip-so400m-patch14-384`:
1152 wide, 27 layers, 16 heads, MLP 4304, 384 px / 14, 64 tokens, vocabulary 32000).

Run: `python bench/checkpoint_size.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SHAPES = {
    "b16": {"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072, "image": 224, "patch": 16},
    "so400m": {"hidden": 1152, "layers": 27, "heads": 16, "mlp": 4304, "image": 384,
               "patch": 14},
}


def meta_model(shape: dict[str, int]) -> Any:
    import torch
    from transformers import SiglipConfig, SiglipModel

    tower = {"hidden_size": shape["hidden"], "intermediate_size": shape["mlp"],
             "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"]}
    config = SiglipConfig(
        text_config={"vocab_size": 32000, "max_position_embeddings": 64, **tower},
        vision_config={"image_size": shape["image"], "patch_size": shape["patch"], **tower})
    with torch.device("meta"):
        return SiglipModel(config)


def real_check() -> float:
    """Written bytes / counted bytes of one checkpoint of the small bench model."""
    import torch

    from sweeper.checkpoint import checkpoint_nbytes, save_checkpoint
    from sweeper.models import DualEncoder, load_pretrained

    model, _ = load_pretrained(common.bench_model_dir())
    enc = DualEncoder(model)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-4)
    for p in enc.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the moments exist
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with tempfile.TemporaryDirectory() as d:
        written = sum(save_checkpoint(Path(d), enc, opt, sched, {"step": 1}).values())
    return written / sum(checkpoint_nbytes(enc).values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="(no effect: it is quick)")
    ap.parse_args(argv)
    from sweeper.checkpoint import checkpoint_nbytes
    from sweeper.models import DualEncoder

    for name, shape in SHAPES.items():
        for variant, frozen in (("siglip", False), ("siglit", True)):
            enc = DualEncoder(meta_model(shape), "sigmoid", freeze_vision=frozen)
            nb = checkpoint_nbytes(enc)
            tag = f"ckpt_{name}_{variant}"
            common.emit(f"{tag}_params_m", sum(p.numel() for p in enc.parameters()) / 1e6)
            common.emit(f"{tag}_written_gb", (nb["weights"] + nb["optimizer"]) / 1e9)
            common.emit(f"{tag}_weights_gb", nb["weights"] / 1e9)  # what an older one keeps
    common.emit("checkpoint_size_check", real_check())
    return 0


if __name__ == "__main__":
    sys.exit(main())
