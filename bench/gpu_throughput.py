"""Training throughput, model FLOPs utilisation and host syncs of a SigLIP-B/16-shaped model.

A randomly initialised `SiglipModel` with SigLIP-B/16's shapes (both towers 768 wide,
12 layers, 12 heads, MLP 3072; 224 px images in 16 px patches = 196 tokens; 64 text
tokens; vocabulary 32000) trained by the worker's own `train_step` (DualEncoder forward,
sigmoid loss, backward, fused AdamW) under bf16 autocast, float32 weights, on one GPU,
with TF32 on as the worker sets it (`training.configure_matmul`).

The batches come through the trials' real loader path: uint8 rows of a decode-once image
store (memory-mapped `.npy`, `cache.CachedDataset`), `data.Collate` (tokenisation) in
`--loader-workers` DataLoader processes, pinned memory, and `data.DeviceBatches` (the
non-blocking copy and the normalisation on the GPU); JPEG decoding is measured apart
(`loader_feed.py`).

* `gpu_samples_per_s`: after `--warmup` steps, `--steps` steps timed between two
  `torch.cuda.synchronize()`, batches from the loader; `gpu_staged_samples_per_s`: the
  same steps on two batches already on the GPU (the step alone), and
  `gpu_loader_vs_staged` their ratio (1: the loader keeps the GPU fed).
* `gpu_mfu`: model FLOPs per step, counted by `torch.utils.flop_counter.FlopCounterMode`
  over one forward + backward (matmuls and attention; the optimizer is not model FLOPs),
  times steps/s through the loader, over the assumed peak (`gpu_peak_tflops`: dense bf16
  of the card, H100 / H200 SXM 989, A100 312, L40S 362; `--peak-tflops` overrides).
  `gpu_mfu_6nd` is the same with the textbook 6 x parameters x tokens count.
* `gpu_host_syncs_per_step`: synchronising CUDA calls per step on the loader path
  (`torch.cuda.set_sync_debug_mode("warn")` over 3 steps, the next batch's copy and
  normalisation included; 0 expected: nothing is read back).
* `--compile`: the same with both towers compiled in place (`nn.Module.compile`).

`--cpu-dry-run` runs a few steps of a shrunken model (64 wide, 2 layers, 64 px) on the CPU
to check the script itself. The batch halves until it fits in memory.

Run: `python bench/gpu_throughput.py [--batch 256] [--steps 20] [--compile]
[--loader-workers 8] [--cpu-dry-run]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def build(dry: bool) -> tuple[Any, dict[str, int]]:
    import torch
    from transformers import SiglipConfig, SiglipModel

    if dry:
        shape = {"hidden": 64, "layers": 2, "heads": 4, "image": 64, "patch": 16, "text": 64,
                 "vocab": 1000}
    else:
        shape = {"hidden": 768, "layers": 12, "heads": 12, "image": 224, "patch": 16,
                 "text": 64, "vocab": 32000}
    common_cfg = {"hidden_size": shape["hidden"], "intermediate_size": 4 * shape["hidden"],
                  "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"]}
    config = SiglipConfig(
        text_config={"vocab_size": shape["vocab"], "max_position_embeddings": shape["text"],
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **common_cfg},
        vision_config={"image_size": shape["image"], "patch_size": shape["patch"],
                       **common_cfg})
    torch.manual_seed(0)
    return SiglipModel(config), shape


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return 989.0


def loader(shape: dict[str, int], batch: int, workers: int, device: Any, tmp: Path) -> Any:
    """Batches of `batch` from the trials' loader path over a store of 4 x `batch` random
    images (epochs repeat), delivered on `device`."""
    import numpy as np

    from sweeper import cache as C
    from sweeper import data as D
    from sweeper.models import build_tiny
    from sweeper.spec import TinyModelSpec
    from sweeper.synthetic import vocabulary

    n, px = 4 * batch, shape["image"]
    _, processor = build_tiny(TinyModelSpec(hidden_size=8, num_heads=1, num_layers=1,
                                            image_size=px, patch_size=shape["patch"],
                                            max_length=shape["text"]), vocabulary())
    transform = D.ImageTransform.from_processor(processor.image_processor)
    rows = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=np.uint8,
                                     shape=(n, px, px, 3))
    rows[:] = np.random.default_rng(0).integers(0, 256, rows.shape, dtype=np.uint8)
    rows.flush()
    np.save(tmp / "ok.npy", np.ones(n, dtype=bool))
    (tmp / "meta.json").write_text(json.dumps({"n": n}))
    names = [f"class {i}" for i in range(64)]
    base = D.ImageTextDataset([D.Sample(f"img{i}.jpg", i % 64) for i in range(n)], names,
                              transform, ["a photo of a {}."], "templates", 0)
    ds = C.CachedDataset(base, C.ArrayStore(tmp), np.arange(n))
    sampler = D.GlobalBatchSampler(n, batch)
    batches = D.make_loader(ds, sampler, D.Collate(processor.tokenizer, shape["text"]),
                            workers, pin_memory=device.type == "cuda", device=device)

    def forever() -> Any:
        epoch = 0
        while True:
            sampler.epoch = epoch
            yield from batches
            epoch += 1

    return forever()


def run(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sweeper.losses import sigmoid_loss
    from sweeper.models import DualEncoder
    from sweeper.training import configure_matmul, train_step

    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    configure_matmul(device)
    model, shape = build(dry)
    enc = DualEncoder(model, "sigmoid", freeze_vision=False).to(device).train()
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def loss_fn(img, txt, scale, bias, labels):
        return sigmoid_loss(img, txt, scale, bias)

    tmp = Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    try:
        feed = loader(shape, batch, args.loader_workers, device, tmp)
        staged = [next(feed), next(feed)]

        # Model FLOPs of one forward + backward, counted eagerly (before any compilation).
        with FlopCounterMode(display=False) as fc:
            with autocast():
                img, txt, scale, bias = enc(staged[0]["pixel_values"], staged[0]["input_ids"])
            sigmoid_loss(img.float(), txt.float(), scale.float(), bias.float()).backward()
        opt.zero_grad(set_to_none=True)
        flops = fc.get_total_flops()
        if args.compile:
            for tower in (model.vision_model, model.text_model):
                tower.compile()

        def step(b: dict[str, Any]) -> Any:
            return train_step(enc, b, opt, sched, loss_fn, None, autocast)

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def timed(batches: Any) -> tuple[float, Any]:
            for _ in range(args.warmup):
                step(next(batches))
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = step(next(batches))
            sync()
            return time.perf_counter() - t, loss

        dt, loss = timed(feed)
        dt_staged, _ = timed(iter(staged[i % 2] for i in range(10**9)))
        syncs = 0.0
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(3):
                        step(next(feed))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / 3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = {"vision": sum(p.numel() for p in model.vision_model.parameters()),
              "text": sum(p.numel() for p in model.text_model.parameters())}
    tokens = {"vision": (shape["image"] // shape["patch"]) ** 2, "text": shape["text"]}
    flops_6nd = 6 * batch * sum(params[k] * tokens[k] for k in params)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
    peak = peak_tflops(name, args.peak_tflops) * 1e12
    steps_s = args.steps / dt
    return {"device": name, "batch": batch, "samples_per_s": batch * steps_s,
            "staged_samples_per_s": batch * args.steps / dt_staged,
            "step_ms": 1e3 / steps_s, "model_tflop_per_step": flops / 1e12,
            "mfu": flops * steps_s / peak, "mfu_6nd": flops_6nd * steps_s / peak,
            "peak_tflops": peak / 1e12, "params_m": sum(params.values()) / 1e6,
            "host_syncs_per_step": syncs, "loss": float(loss),
            "max_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                            if device.type == "cuda" else 0.0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="compile both towers")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--loader-workers", type=int, default=8,
                    help="DataLoader processes feeding the step")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="a few steps of a shrunken model on the CPU (checks the script)")
    args = ap.parse_args(argv)
    import torch

    if args.cpu_dry_run:
        args.batch, args.steps, args.warmup = min(args.batch, 8), min(args.steps, 2), 1
        args.loader_workers = min(args.loader_workers, 1)
    elif not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu-dry-run to check the script)", file=sys.stderr)
        return 2
    batch, out = args.batch, None
    while batch >= 1:
        try:
            out = run(args, batch)
            break
        except torch.cuda.OutOfMemoryError:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
            print(f"batch {batch} does not fit; trying {batch // 2}", file=sys.stderr)
            batch //= 2
    if out is None:
        return 1
    tag = "gpu_compiled" if args.compile else "gpu"
    common.emit(f"{tag}_device", out["device"])
    common.emit(f"{tag}_batch", out["batch"])
    common.emit(f"{tag}_params_m", out["params_m"])
    common.emit(f"{tag}_samples_per_s", out["samples_per_s"])
    common.emit(f"{tag}_staged_samples_per_s", out["staged_samples_per_s"])
    common.emit(f"{tag}_loader_vs_staged", out["samples_per_s"] / out["staged_samples_per_s"])
    common.emit(f"{tag}_loader_workers", args.loader_workers)
    common.emit(f"{tag}_step_ms", out["step_ms"])
    common.emit(f"{tag}_model_tflop_per_step", out["model_tflop_per_step"])
    common.emit(f"{tag}_peak_tflops", out["peak_tflops"])
    common.emit(f"{tag}_mfu", out["mfu"])
    common.emit(f"{tag}_mfu_6nd", out["mfu_6nd"])
    common.emit(f"{tag}_host_syncs_per_step", out["host_syncs_per_step"])
    common.emit(f"{tag}_max_mem_gib", out["max_mem_gib"])
    common.emit(f"{tag}_final_loss", out["loss"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
