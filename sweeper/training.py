"""The reusable optimisation pieces: parameter groups, the learning-rate schedule, the
step budget, the loss choice, precision and autocast, and the train step itself.

Pure functions over a model, a batch and an optimizer: the worker loop, the tiny-model
pretraining and the frozen-tower caches all import them from here, and none of them
imports this module's callers. Never imports Ray.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from sweeper import data as D
from sweeper.families import IMAGE_KEYS
from sweeper.losses import sigmoid_loss, softmax_loss
from sweeper.models import forward_inputs
from sweeper.spec import TrialConfig


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "bias" in name or "norm" in name or "logit_" in name


def param_groups(model: nn.Module, train: Any) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters of `model` (a `DualEncoder`, which says
    which tower each belongs to): per tower (text, vision, temperature/bias) x
    decay/no-decay.

    Biases, norms and the temperature/bias get no weight decay; each tower may have its own
    learning rate (`train.lr_text`, `lr_vision`, `lr_logit`, else `train.lr`)."""
    lrs = {"text": train.lr_text, "vision": train.lr_vision, "logit": train.lr_logit}
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        tower, nd = model.tower_of(name), _no_decay(name, p)
        g = groups.setdefault((tower, nd), {
            "params": [], "names": [], "tower": tower,
            "lr": lrs[tower] or train.lr,
            "weight_decay": 0.0 if nd else train.weight_decay,
        })
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_lambda(train: Any, total_steps: int) -> Callable[[int], float]:
    """The LambdaLR factor of the update that follows `step` updates: linear warmup
    (1/W, 2/W, ..., 1 over the first W = `train.warmup_steps` updates), then 1 (constant)
    or a cosine from 1 at step W to 0 at `total_steps`."""
    warm = train.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if train.schedule == "cosine":
            span = max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span)))
        return 1.0

    return f


def global_batch_size(cfg: TrialConfig, n_train: int) -> int:
    """Samples drawn per step over all workers: `batch_size`, unless the training set is
    smaller than one batch (then its one batch is trimmed to a multiple of the workers)."""
    nw = cfg.scaling.num_workers
    return cfg.batch_size if n_train >= cfg.batch_size else (n_train // nw) * nw


def total_steps(cfg: TrialConfig, n_train: int) -> tuple[int, int]:
    """(steps in the budget, steps per epoch) for this trial's data and global batch.

    `{epochs: N}`: N * steps per epoch; `{steps: N}`: N; `{samples: N}`: the fewest steps
    that draw at least N samples (ceil(N / global batch))."""
    spe = D.steps_per_epoch(n_train, cfg.batch_size, cfg.scaling.num_workers)
    if spe == 0:
        raise D.DataError(
            f"batch_size: {n_train} training samples cannot fill a batch over "
            f"{cfg.scaling.num_workers} workers")
    b = cfg.train.resolved_budget
    if b.epochs is not None:
        return b.epochs * spe, spe
    if b.steps is not None:
        return b.steps, spe
    return math.ceil(b.samples / global_batch_size(cfg, n_train)), spe


def loss_fn_for(loss: str, pair_targets: str = "negative", group: Any = None
                ) -> Callable[..., torch.Tensor]:
    """The global-batch contrastive loss `loss` ("sigmoid" or "softmax") as
    `fn(img, txt, scale, bias, labels)`; `pair_targets` says how same-class pairs count
    (labels are only passed on when they matter)."""

    def loss_fn(img, txt, scale, bias, labels):
        kw = {"group": group, "pair_targets": pair_targets,
              "labels": labels if pair_targets != "negative" else None}
        if loss == "sigmoid":
            return sigmoid_loss(img, txt, scale, bias, **kw)
        return softmax_loss(img, txt, scale, **kw)

    return loss_fn


def make_loss_fn(cfg: TrialConfig, group: Any) -> Callable[..., torch.Tensor]:
    """The global-batch contrastive loss of the trial's variant."""
    return loss_fn_for(cfg.loss, cfg.train.same_class_pairs, group)


def _forward(model: nn.Module, batch: dict[str, Any], autocast: Any
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The batch's model inputs go to the model by name (`models.forward_inputs`: whatever
    # the family's processor made, e.g. NaFlex's patch mask and shapes).
    with autocast():
        return model(**forward_inputs(batch))


def _update(optimizer: torch.optim.Optimizer, scheduler: Any,
            max_grad_norm: float | None) -> None:
    """Clip (the global norm, DDP-averaged gradients) and step optimizer and schedule."""
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    scheduler.step()


def train_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: Any, loss_fn: Callable[..., torch.Tensor], max_grad_norm: float | None,
               autocast: Any) -> torch.Tensor:
    """Forward, global-batch loss, backward, clip, update. Returns the loss (on device,
    unsynchronised: reading it forces a host sync, which the sequencer does only when it
    logs)."""
    # Gradients freed before the forward, not after it: the activations and the previous
    # step's gradients are never alive at the same time (peak memory).
    optimizer.zero_grad(set_to_none=True)
    img, txt, scale, bias = _forward(model, batch, autocast)
    loss = loss_fn(img.float(), txt.float(), scale.float(), bias.float(), batch["labels"])
    loss.backward()
    _update(optimizer, scheduler, max_grad_norm)
    return loss.detach()


# The batch entries a step reads, each [b, ...] (or None); the rest are loop bookkeeping.
_STEP_KEYS = (*IMAGE_KEYS, "input_ids", "attention_mask", "image_embeds", "labels")


def _micro_batches(batch: dict[str, Any], m: int) -> list[dict[str, Any]]:
    """The step's inputs in consecutive slices of `m` rows (the last one shorter when `m`
    does not divide the batch: a training set smaller than one batch)."""
    parts = {k: torch.split(batch[k], m) for k in _STEP_KEYS if batch.get(k) is not None}
    n = len(parts["input_ids"])
    return [{k: v[i] for k, v in parts.items()} for i in range(n)]


@dataclass
class _RngState:
    """The CPU and accelerator generator states before a micro-batch's first forward, so
    that its second forward draws the same dropout masks (what `torch.utils.checkpoint`
    does for its recomputation, with the same helpers)."""

    cpu: torch.Tensor
    devices: list[int]
    states: list[torch.Tensor]
    device_type: str

    @classmethod
    def capture(cls, tensors: list[torch.Tensor]) -> _RngState:
        devices, states = get_device_states(*tensors)
        return cls(torch.get_rng_state(), devices, states, tensors[0].device.type)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the body from this state; the generators continue afterwards as if it had
        never run (they are where the first passes left them)."""
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.states, device_type=self.device_type)
            yield


def micro_batch_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
                     scheduler: Any, loss_fn: Callable[..., torch.Tensor],
                     max_grad_norm: float | None, autocast: Any, micro_batch_size: int
                     ) -> torch.Tensor:
    """`train_step`, exactly, with at most `micro_batch_size` samples' activations alive:
    the gradient cache of GradCache (Gao et al. 2021). Returns the loss like `train_step`.

    1. Every micro-batch of this worker's `b` samples is encoded without a graph, its RNG
       state kept: only the `[b, d]` embeddings stay.
    2. The global-batch loss (`loss_fn`, collective over the workers as in `train_step`)
       runs once on the detached embeddings, giving its gradients with respect to the
       embeddings, the temperature and the bias: the same numbers `train_step`'s
       backward sends into the towers.
    3. Every micro-batch is encoded again with its graph, from its saved RNG state (the
       same dropout), and back-propagated from its slice of the embedding gradients. The
       parameter gradients add up to `train_step`'s, since they are linear in those. Under
       DDP only the last micro-batch synchronises (`no_sync` before), and it also carries
       the temperature/bias gradients, so they count once and are averaged like the rest.

    A tower that does not train (a frozen vision tower, cached image features) is encoded
    once: the second pass gets its embeddings from the first. Costs about one forward more
    than `train_step` (a third more compute for the towers that train); a batch of one
    micro-batch runs `train_step` itself."""
    parts = _micro_batches(batch, micro_batch_size)
    if len(parts) == 1:  # nothing to split: the one-pass step, without the extra forward
        return train_step(model, batch, optimizer, scheduler, loss_fn, max_grad_norm, autocast)
    optimizer.zero_grad(set_to_none=True)  # as in train_step: never alive beside activations
    enc = getattr(model, "module", model)  # the first pass needs no DDP (no gradients)
    frozen_image = bool(getattr(enc, "freeze_vision", False)) or "image_embeds" in parts[0]
    rng, imgs, txts = [], [], []
    with torch.no_grad():
        for mb in parts:
            rng.append(_RngState.capture([mb["input_ids"]]))
            img, txt, scale, bias = _forward(enc, mb, autocast)
            imgs.append(img)
            txts.append(txt)
    img = torch.cat(imgs).float().requires_grad_(not frozen_image)
    txt = torch.cat(txts).float().requires_grad_()
    leaves = [img, txt, scale.detach().float().requires_grad_(scale.requires_grad),
              bias.detach().float().requires_grad_(bias.requires_grad)]
    loss = loss_fn(*leaves, batch["labels"])
    wrt = [t for t in leaves if t.requires_grad]
    grads = dict(zip(map(id, wrt), torch.autograd.grad(loss, wrt, allow_unused=True),
                     strict=True))
    g_img = grads[id(img)].split(micro_batch_size) if not frozen_image else None
    g_txt = grads[id(txt)].split(micro_batch_size)
    g_scale, g_bias = grads.get(id(leaves[2])), grads.get(id(leaves[3]))

    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for i, mb in enumerate(parts):
        last = i == len(parts) - 1
        if frozen_image:
            mb = {**{k: v for k, v in mb.items() if k not in IMAGE_KEYS},
                  "image_embeds": imgs[i]}
        # DDP decides at forward whether the backward all-reduces: both go inside no_sync.
        with contextlib.nullcontext() if last else no_sync():
            with rng[i].restored():
                img_i, txt_i, scale_i, bias_i = _forward(model, mb, autocast)
            pairs = [(txt_i, g_txt[i])]
            if g_img is not None:
                pairs.append((img_i, g_img[i]))
            if last:
                pairs += [(o, g) for o, g in ((scale_i, g_scale), (bias_i, g_bias))
                          if g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
    _update(optimizer, scheduler, max_grad_norm)
    return loss.detach()


def step_for(train: Any) -> Callable[..., torch.Tensor]:
    """The step of `train` (a TrainSpec): `micro_batch_step` with `train.micro_batch_size`,
    else `train_step`; both take `train_step`'s arguments."""
    m = train.micro_batch_size
    return functools.partial(micro_batch_step, micro_batch_size=m) if m else train_step


def enable_gradient_checkpointing(model: Any) -> None:
    """Hugging Face's activation checkpointing (non-reentrant) on every encoder layer of
    `model` (a PreTrainedModel): each layer keeps only its input and recomputes the rest in
    backward, about one forward more for a fraction of the activations. A tower that does
    not train runs in eval mode without gradients, where the layers skip it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not "
                         "support activation checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, None for any other device."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


def resolve_precision(precision: str, device: torch.device) -> str:
    """What `train.precision` means on `device`: `fp32` is plain float32; `bf16` autocasts
    to bfloat16 on any device (on the CPU, or a GPU that only emulates it, only because it
    was asked for); `auto` (the default) is bf16 on a GPU with native bf16 (compute
    capability 8.0 and newer: A100, H100, L4, ...) and fp32 elsewhere: the CPU, V100, T4."""
    if precision == "auto":
        cap = _capability(device)
        return "bf16" if cap is not None and cap >= (8, 0) else "fp32"
    return precision


def use_tf32(device: torch.device) -> bool:
    """Whether float32 matmuls and convolutions on `device` run on TF32 tensor cores
    (Ampere and newer GPUs: 10-bit mantissa products, float32 accumulation, the precision
    every large training run accepts). Set for the process by `configure_matmul`; under
    bf16 autocast it covers the ops autocast leaves in float32."""
    cap = _capability(device)
    return cap is not None and cap >= (8, 0)


def configure_matmul(device: torch.device) -> bool:
    """Enable TF32 for this process where `use_tf32` says so; returns whether it did."""
    if not use_tf32(device):
        return False
    # Matmuls only: cuDNN's convolutions (the patch embedding) default to TF32 already.
    torch.set_float32_matmul_precision("high")
    return True


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int,
             group: Any = None) -> nn.Module:
    """`model` in DistributedDataParallel over `group` (default: the world) when there are
    several processes, as the large training codebases tune it: gradients are views into
    DDP's communication buckets (`gradient_as_bucket_view`: no copy into and out of them,
    one gradient-sized buffer less), and buffers are not broadcast before every forward
    (`broadcast_buffers=False`: these models' only buffers are position ids, identical on
    every rank; a module with running statistics keeps the broadcast)."""
    if world_size <= 1:
        return model
    stateful = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group, gradient_as_bucket_view=True, broadcast_buffers=stateful)


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """A factory of the autocast context of a resolved precision (bf16 autocast, or none)."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
