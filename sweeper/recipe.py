"""One trial's parts, built in one setup step (torchtune's recipe `setup()`): the model and
its wrapper, the data and its loaders, the optimizer and schedule, the loss, the precision
and the evaluator. `worker.run_trial` then reads as the short sequence it is: set up,
resume, evaluate at step 0, train, finish.

Each part that a scaling strategy, an adapter method or another engine changes has one
place here. Never imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sweeper import adapters, faults
from sweeper import cache as C
from sweeper import data as D
from sweeper.collectives import Agreement
from sweeper.context import WorkerContext
from sweeper.evaluation import Evaluator, retrieval_captions, val_loader
from sweeper.models import (
    PRESETS,
    DualEncoder,
    load_pretrained,
    local_checkpoint,
    text_max_length,
)
from sweeper.resources import worker_resources
from sweeper.spec import TrialConfig
from sweeper.training import (
    autocast_for,
    configure_matmul,
    enable_gradient_checkpointing,
    global_batch_size,
    lr_lambda,
    make_loss_fn,
    param_groups,
    resolve_precision,
    total_steps,
    wrap_ddp,
)


@dataclass
class TrialParts:
    """Everything one worker of a trial trains and evaluates with.

    `model`/`processor`: the Hugging Face model and processor (what `final_model/` saves);
    `adapted`: the `peft.PeftModel` around `model` when the variant trains LoRA adapters
    (`sweeper.adapters`), else None; `enc`: the two-tower wrapper the loss and evaluation
    call; `module`: what the step runs, `enc` or its DDP wrapper;
    `n_steps`/`steps_per_epoch`: the budget in optimizer updates; `global_batch`: samples
    per step over all workers; `inputs`: the datasets as the caches serve them; `faults`:
    faults a fault-tolerance test injects (empty else)."""

    model: Any
    processor: Any
    adapted: Any
    enc: DualEncoder
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    lr_factor: Callable[[int], float]
    loss_fn: Callable[..., torch.Tensor]
    precision: str
    tf32: bool
    autocast: Any
    data: D.TrialData
    inputs: C.TrialInputs
    loader_workers: int
    sampler: D.GlobalBatchSampler | D.StreamPlan
    loader: Any
    evaluate: Evaluator
    agree: Agreement
    n_steps: int
    steps_per_epoch: int
    global_batch: int
    faults: dict[str, Any]


def setup_trial(cfg: TrialConfig, ctx: WorkerContext) -> TrialParts:
    """Build one worker's parts of trial `cfg`; `cfg.model_path` must be loadable on this
    node (`checkpoint_on_node`)."""
    device = ctx.device
    model, processor = load_pretrained(cfg.model_path, cfg.model.trust_remote_code)
    tokenizer = processor.tokenizer
    max_len = text_max_length(model, processor, cfg.model.max_length)
    transform = D.image_transform(processor.image_processor, cfg.model.max_num_patches)
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, D.data_root(cfg.data, ctx.cache_dir))
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # LoRA: adapters on the model in place, everything else frozen (before the wrapper,
    # which then freezes a softmax loss's bias and a frozen vision tower as for any model).
    adapted = adapters.wrap(model, cfg.peft, f"variants.{cfg.variant}.peft") \
        if cfg.peft else None
    enc = DualEncoder(model, cfg.loss, cfg.freeze_vision).to(device)
    module = wrap_ddp(enc, device, ctx.world_size, ctx.group)
    agree = Agreement.create(ctx.world_size, ctx.group)
    tf32 = configure_matmul(device)
    # Fused AdamW: one kernel over every parameter instead of ~10 small ops per tensor (on
    # the CPU the unfused step of a small tower costs as much as its backward).
    optimizer = torch.optim.AdamW(param_groups(enc, cfg.train), lr=cfg.train.lr,
                                  fused=device.type in ("cpu", "cuda"))
    n_steps, spe = total_steps(cfg, len(td.train))
    lr_factor = lr_lambda(cfg.train, n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    precision = resolve_precision(cfg.train.precision, device)
    autocast = autocast_for(precision, device)
    # Cached image features (frozen tower) or decode-once images, per the data spec.
    nw = D.loader_workers(cfg.data.num_workers, worker_resources(cfg.scaling).get("CPU", 0.0))
    inputs = C.trial_inputs(cfg, ctx, td, enc, transform, D.Collate(tokenizer, max_len),
                            precision, agree, nw)
    if cfg.train.compile:  # in place: parameter names (checkpoints) and DDP stay the same
        for tower in ("text", "vision") if inputs.kind != "features" else ("text",):
            enc.model.get_submodule(enc.family.tower(tower).root).compile()
    sampler = D.batch_plan(inputs.train, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed,
                           cfg.data.shuffle_buffer)
    injected = faults.for_trial(cfg.trial_id)  # empty unless a fault-tolerance test asks
    collate = inputs.collate
    if "dataloader" in injected:
        collate = faults.FaultyCollate(collate, injected["dataloader"])
    loader = D.make_loader(inputs.train, sampler, collate, nw, pin_memory=device.type == "cuda",
                           device=device, augment=cfg.data.augment, seed=cfg.seed,
                           local_ranks=ctx.local_world_size)
    val = val_loader(td.val_samples, td.val_names, transform, tokenizer, max_len, ctx.rank,
                     ctx.world_size, cfg.eval.batch_size, nw, inputs.wrap_val, device,
                     ctx.local_world_size, td.reader)
    evaluate = Evaluator(enc, val, td.val_names, td.eval_templates, td.seen, tokenizer,
                         max_len, device, autocast, cfg.eval.batch_size, ctx.world_size,
                         ctx.group, images=inputs.val_images,
                         captions=retrieval_captions(cfg.eval.retrieval, td.val_samples))
    return TrialParts(
        model=model, processor=processor, adapted=adapted, enc=enc, module=module,
        optimizer=optimizer, scheduler=scheduler, lr_factor=lr_factor,
        loss_fn=make_loss_fn(cfg, ctx.group),
        precision=precision, tf32=tf32, autocast=autocast, data=td, inputs=inputs,
        loader_workers=nw, sampler=sampler, loader=loader, evaluate=evaluate, agree=agree,
        n_steps=n_steps, steps_per_epoch=spe, global_batch=global_batch_size(cfg, len(td.train)),
        faults=injected)


def checkpoint_on_node(cfg: TrialConfig) -> TrialConfig:
    """`cfg` with a `model_path` this node can load: the directory `sweeper.prepare`
    resolved, else (a node that does not see it: no shared Hugging Face cache) the hub id
    or directory as written."""
    if cfg.model_path and Path(cfg.model_path).is_dir():
        return cfg
    name = cfg.model.pretrained
    if name in PRESETS and cfg.model_path:
        raise ValueError(f"model.pretrained: the {name!r} checkpoint built before the sweep, "
                         f"{cfg.model_path}, is missing on this node (put the cache on a "
                         "shared filesystem: --cache-dir)")
    if name in PRESETS:
        raise ValueError(f"model.pretrained: preset {name!r} was not built before the trial "
                         "(sweeper.prepare.prepare_inputs builds it)")
    return cfg.model_copy(update={"model_path": local_checkpoint(name)})
