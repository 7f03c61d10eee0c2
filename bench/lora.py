"""LoRA (a variant's `peft:`) against full fine-tuning: memory of a step, time per sample,
optimizer-state bytes and checkpoint bytes.

Configurations: `full` (every weight trains) and LoRA at rank 8 and 16 on the `attention`
and `all-linear` presets of both towers (alpha = 2 r), each built as a trial builds it
(`adapters.wrap`, `DualEncoder`, fused AdamW over the trainable parameters) and stepped by
the trials' `train_step` (sigmoid loss) on random batches of `--batch` samples.

* On the CPU, the bench model of `common.py` (SigLIP-B/16's token counts: 224 px / 16 px
  patches, 64 text tokens; 128 wide, 2 layers), one intra-op thread. `*_step_peak_mib`:
  the peak of the live tensor bytes one step creates, after a warm-up step
  (`LiveTensorBytes`: gradients, activations, temporaries); `*_optimizer_mib`: AdamW's
  state; `*_memory_ratio`: (step peak + optimizer state) / full's. With `--device cuda`,
  the step peak is `torch.cuda.max_memory_allocated` over the step less what was
  allocated before it.
* `*_s_per_sample`: best of `--repeats` interleaved rounds of `--steps` steps;
  `*_time_ratio`: / full's.
* `*_ckpt_mib`: bytes `save_checkpoint` writes (`state.pt` + `optimizer.pt`);
  `*_ckpt_ratio`: / full's.
* `b16_*`: SigLIP-B/16 itself (`checkpoint_size.py`'s shape), counted on the meta device
  (nothing allocated): trainable parameters and the bytes of one checkpoint.

Run: `python bench/lora.py [--quick]`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MIB = 2.0**20
CONFIGS: dict[str, dict[str, Any] | None] = {
    "full": None,
    **{f"r{r}_{preset.replace('-', '_')}": {"r": r, "alpha": 2 * r, "target_modules": preset}
       for r in (8, 16) for preset in ("attention", "all-linear")},
}


def encoder(model: Any, peft: dict[str, Any] | None) -> Any:
    """`model` (a copy) as a trial of this configuration trains it."""
    import torch

    from sweeper import adapters
    from sweeper.models import DualEncoder
    from sweeper.spec import PeftSpec

    model = copy.deepcopy(model)
    if peft is not None:
        torch.manual_seed(0)
        adapters.wrap(model, PeftSpec(**peft).for_variant(False), "bench")
    return model, DualEncoder(model, "sigmoid")


def optimizer_bytes(opt: Any) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if hasattr(v, "numel") and v.ndim)


def checkpoint_bytes(bench: Any) -> int:
    from sweeper.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        return sum(save_checkpoint(Path(d), bench.enc, bench.opt, bench.sched,
                                   {"step": 1}).values())


def b16_counts() -> None:
    """Trainable parameters and checkpoint bytes of each configuration on SigLIP-B/16."""
    from checkpoint_size import SHAPES, meta_model

    from sweeper.checkpoint import checkpoint_nbytes

    base = meta_model(SHAPES["b16"])
    for name, peft in CONFIGS.items():
        _, enc = encoder(base, peft)
        trainable, total = enc.param_counts()
        nb = checkpoint_nbytes(enc)
        common.emit(f"lora_b16_{name}_trainable_m", trainable / 1e6)
        common.emit(f"lora_b16_{name}_trainable_share", trainable / total)
        common.emit(f"lora_b16_{name}_ckpt_mb", (nb["weights"] + nb["optimizer"]) / 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 2
    import torch
    from large_batch import Bench

    from sweeper.models import load_pretrained

    if args.device == "cpu":
        common.one_thread()
    device = torch.device(args.device)
    base, _ = load_pretrained(common.bench_model_dir())
    shape = {"image": common.BENCH_TINY["image_size"], "text": common.BENCH_TINY["max_length"],
             "vocab": base.config.text_config.vocab_size}
    common.emit("lora_machine", common.machine())
    common.emit("lora_batch", args.batch)
    benches = {}
    for name, peft in CONFIGS.items():
        model, _ = encoder(base, peft)
        benches[name] = Bench(shape, model, device, bf16=False)
    figures: dict[str, dict[str, float]] = {}
    for name, bench in benches.items():
        peak = bench.peak_bytes(args.batch, None)  # after a warm-up step: AdamW's state
        trainable, total = bench.enc.param_counts()
        figures[name] = {"peak": peak, "opt": optimizer_bytes(bench.opt),
                         "ckpt": checkpoint_bytes(bench), "trainable": trainable / total}
        gc.collect()
    times: dict[str, list[float]] = {n: [] for n in benches}
    for _ in range(args.repeats):  # interleaved: the machine's noise hits every one alike
        for name, bench in benches.items():
            times[name].append(bench.seconds_per_sample(args.batch, None, args.steps)[0])
    full = figures["full"]
    full_time = min(times["full"])
    for name, f in figures.items():
        tag = f"lora_{name}"
        common.emit(f"{tag}_trainable_share", f["trainable"])
        common.emit(f"{tag}_step_peak_mib", f["peak"] / MIB)
        common.emit(f"{tag}_optimizer_mib", f["opt"] / MIB)
        common.emit(f"{tag}_ckpt_mib", f["ckpt"] / MIB)
        common.emit(f"{tag}_s_per_sample", min(times[name]))
        if name != "full":
            common.emit(f"{tag}_memory_ratio",
                        (f["peak"] + f["opt"]) / (full["peak"] + full["opt"]))
            common.emit(f"{tag}_time_ratio", min(times[name]) / full_time)
            common.emit(f"{tag}_ckpt_ratio", f["ckpt"] / full["ckpt"])
    b16_counts()
    return 0


if __name__ == "__main__":
    sys.exit(main())
