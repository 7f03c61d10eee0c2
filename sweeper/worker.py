"""The worker loop of one trial: a short step function plus a sequencer.

Runs the same on 1 or N processes (world size 1 is the trivial case) and never imports Ray:
the orchestration layer hands it a `WorkerContext` (rank, world size, device, trial folder,
a `report` function and the checkpoint to resume from), and a test can hand it one too.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sweeper import cache as C
from sweeper import data as D
from sweeper import faults
from sweeper.checkpoint import load_checkpoint, save_checkpoint, save_final_model
from sweeper.collectives import Agreement
from sweeper.evaluation import Evaluator, retrieval_captions, val_loader
from sweeper.models import (
    PRESETS,
    DualEncoder,
    load_pretrained,
    local_checkpoint,
    text_max_length,
)
from sweeper.resources import worker_resources
from sweeper.sink import TrialSink
from sweeper.spec import TrialConfig
from sweeper.storage import Location
from sweeper.training import (
    autocast_for,
    configure_matmul,
    enable_gradient_checkpointing,
    global_batch_size,
    lr_lambda,
    make_loss_fn,
    param_groups,
    resolve_precision,
    step_for,
    total_steps,
    wrap_ddp,
)

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, Any], Path | None], None]


@dataclass
class WorkerContext:
    """What the orchestration gives one worker process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trial_dir: Path = Path(".")
    # The trial's folder in the bucket when `storage` is remote; `trial_dir` is then its
    # node-local copy, and the sink uploads every file whole after each change.
    remote: Location | None = None
    report: ReportFn = lambda metrics, ckpt: None
    resume_from: Path | None = None  # a checkpoint directory to continue from
    cache_dir: Path | None = None
    group: Any = None  # torch.distributed group (None: the world when initialised)
    local_world_size: int = 1  # trial workers on this node (they share its /dev/shm)
    # Whether `report` takes the checkpoint folder it is handed (an asynchronous upload
    # deletes it when done) rather than the loop deleting it once `report` returns.
    report_takes_checkpoint: bool = False


class Diverged(RuntimeError):
    """The loss became non-finite: the trial stops at once with status `diverged`."""


# --------------------------------------------------------------------------- sequencer


def _initial_state() -> dict[str, Any]:
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0,
            "best_val_top1": None, "best_step": None, "skipped_images": 0,
            "time_offset_s": 0.0, "zero_shot_top1": None}


@dataclass
class _Sequencer:
    """Everything around the train step: the loop over the budget, evaluations, reports,
    checkpoints, divergence and the final status. `st` is the loop state that a checkpoint
    saves and a resume restores."""

    cfg: TrialConfig
    ctx: WorkerContext
    enc: DualEncoder
    optimizer: Any
    scheduler: Any
    lr_factor: Callable[[int], float]
    evaluate: Evaluator
    sink: TrialSink | None
    val_wnids: list[str]
    n_steps: int
    spe: int
    global_batch: int
    t0: float = field(default_factory=time.time)
    st: dict[str, Any] = field(default_factory=_initial_state)
    agree: Agreement = field(default_factory=Agreement)

    def epochs(self) -> float:
        return self.st["epoch"] + self.st["batch_in_epoch"] / max(1, self.spe)

    def elapsed(self) -> float:
        return self.st["time_offset_s"] + time.time() - self.t0

    def lr(self) -> float:
        return self.cfg.train.lr * self.lr_factor(self.st["step"])

    def train(self, loader: Any, sampler: D.GlobalBatchSampler,
              step: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        """Step until the budget is spent, evaluating when due. The loss stays on the
        device and is read (a host sync) only at log and evaluation points, or at every step
        on the CPU where reading it costs nothing, so that a divergence stops at once. The
        ranks agree on every batch before it reaches a collective (`Agreement.batch`): all
        step on slices of the smallest readable size, and all skip a position where one
        rank has no readable image."""
        cfg, st, device = self.cfg, self.st, self.ctx.device
        every, log_every = cfg.eval.every_steps, cfg.train.log_every_steps
        loss_sum = torch.zeros((), device=device)
        n_loss, t_int, n_int = 0, time.time(), 0
        while st["step"] < self.n_steps:
            sampler.epoch, sampler.skip_batches = st["epoch"], st["batch_in_epoch"]
            steps_before = st["step"]
            for batch in loader:
                size, skipped = self.agree.batch(batch["size"], batch["skipped"])
                st["skipped_images"] += skipped
                st["batch_in_epoch"] += 1  # a batch of unreadable images is a position too
                stepped = size > 0
                if stepped:
                    batch = D.trim_batch(batch, size)
                    loss_sum += step(batch)
                    n_loss, st["step"] = n_loss + 1, st["step"] + 1
                    st["samples_seen"] += self.global_batch
                    n_int += self.global_batch
                end_of_epoch = st["batch_in_epoch"] >= self.spe
                last = st["step"] >= self.n_steps
                due_eval = last or (stepped and st["step"] % every == 0 if every
                                    else end_of_epoch)
                due_log = stepped and st["step"] % log_every == 0
                loss = None
                if due_eval or due_log or device.type == "cpu":
                    loss = self._mean_loss(loss_sum, n_loss)
                    if loss is not None and not math.isfinite(loss):
                        raise Diverged(f"non-finite loss at step {st['step']}")
                if end_of_epoch:
                    st["epoch"], st["batch_in_epoch"] = st["epoch"] + 1, 0
                if due_eval or due_log:
                    dt = time.time() - t_int
                    sps = n_int / dt if dt > 0 and n_int else None
                    _progress(cfg, self.ctx, st, self.n_steps, loss, sps)
                    if due_eval:
                        self.report(loss, sps)
                        loss_sum.zero_()
                        n_loss, t_int, n_int = 0, time.time(), 0
                if last or end_of_epoch:
                    break
            if st["step"] == steps_before:
                raise D.DataError(f"epoch {st['epoch']}: no readable training image")

    def _mean_loss(self, loss_sum: torch.Tensor, n: int) -> float | None:
        """Mean global loss per step since the last report (a host sync). Each rank holds
        its share of the global loss; the mean of the shares is the global loss."""
        if self.ctx.world_size > 1:
            loss_sum = loss_sum.clone()
            dist.all_reduce(loss_sum, group=self.ctx.group)
            loss_sum /= self.ctx.world_size
        return loss_sum.item() / n if n else None

    def report(self, train_loss: float | None, samples_per_s: float | None) -> dict[str, Any]:
        """Evaluate, append the history and per-class rows, and hand the metrics (listed in
        `run_trial`'s docstring) with a checkpoint (written by rank 0; none at step 0,
        whose weights are the pretrained ones) to `ctx.report`."""
        st = self.st
        m = self.evaluate()
        per_class, skipped_val = m.pop("per_class"), m.pop("skipped_val")
        if st["step"] == 0:
            st["zero_shot_top1"] = m["val_top1"]
        if m["val_top1"] is not None and (st["best_val_top1"] is None
                                          or m["val_top1"] > st["best_val_top1"]):
            st["best_val_top1"], st["best_step"] = m["val_top1"], st["step"]
        metrics = {
            "epoch": self.epochs(), "step": st["step"], "samples_seen": st["samples_seen"],
            "train_loss": train_loss, "lr": self.lr(),
            "logit_scale": self.enc.logit_scale.detach().float().exp().item(),
            "logit_bias": self.enc.logit_bias.detach().float().item(),
            **m,
            "samples_per_s": samples_per_s, "time_s": self.elapsed(),
            "skipped_images": st["skipped_images"] + skipped_val,
            "best_val_top1": st["best_val_top1"], "best_step": st["best_step"],
        }
        ckpt_dir = None
        if self.sink:
            self.sink.append_history(metrics)
            self.sink.append_per_class(st["step"],
                                       dict(zip(self.val_wnids, per_class, strict=True)))
            if st["step"] > 0:  # step 0 is the pretrained checkpoint: nothing to save
                ckpt_dir = Path(tempfile.mkdtemp(prefix="sweeper-ckpt-"))
                save_checkpoint(ckpt_dir, self.enc, self.optimizer, self.scheduler,
                                {**st, "time_offset_s": metrics["time_s"]})
        try:
            self.ctx.report(metrics, ckpt_dir)
        finally:
            if ckpt_dir is not None and not self.ctx.report_takes_checkpoint:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        return metrics

    def diverged(self, err: Diverged) -> None:
        """Record a divergence: one history row and one report, without a checkpoint."""
        st = self.st
        log.warning("%s: %s", self.cfg.trial_id, err)
        row = {"epoch": self.epochs(), "step": st["step"], "samples_seen": st["samples_seen"],
               "train_loss": float("nan"), "lr": self.lr(), "time_s": self.elapsed(),
               "diverged": True}
        if self.sink:
            self.sink.append_history(row)
        # val_top1 present (None) so a Tune scheduler on val_top1 accepts the result.
        self.ctx.report({**row, "val_top1": None}, None)

    def finish(self, status: str, error: str | None, model: Any, processor: Any
               ) -> dict[str, Any]:
        """The final status fields (status.json); `final_model/` when `train.save_final`."""
        st = self.st
        final = {"status": status, "error": error, "best_val_top1": st["best_val_top1"],
                 "best_step": st["best_step"], "zero_shot_top1": st["zero_shot_top1"],
                 "steps": st["step"], "samples_seen": st["samples_seen"],
                 "epochs": self.epochs(), "skipped_images": st["skipped_images"],
                 "ended_at": _now(), "wall_time_s": self.elapsed()}
        if self.sink:
            if self.cfg.train.save_final and status == "terminated":
                save_final_model(self.ctx.trial_dir / "final_model", model, processor)
                self.sink.publish_dir("final_model", marker="config.json")
            self.sink.update_status(**final)
        return final


def run_trial(cfg: TrialConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Fine-tune and evaluate one trial; returns the final status fields.

    Evaluates zero-shot before the first update (step 0), then every epoch, or every
    `eval.every_steps` steps, and after the last step. Each evaluation reports, through
    `ctx.report(metrics, checkpoint_dir)`, and appends to history.jsonl:

    - `epoch` (fractional: epochs done + batches into the current one / steps per epoch),
      `step` (optimizer updates), `samples_seen` (training samples drawn over all workers);
    - `train_loss`: mean global-batch loss over the steps since the previous report (None at
      step 0); `lr`: `train.lr` times the schedule factor of the next update (towers with
      their own learning rate follow the same factor);
    - `logit_scale`: the temperature as the loss applies it, exp(model.logit_scale), not the
      raw log-parameter; `logit_bias`: the sigmoid loss's bias as stored;
    - `val_top1`, `val_top5` over the eval classes; `val_top1_seen` / `val_top1_unseen`
      over the val images of classes trained on / not (None when there are none);
      `val_mean_per_class_recall` (and `_seen`, `_unseen`): the mean of the per-class top-1;
    - with retrieval on (`eval.retrieval`), `val_i2t_r1/5/10` and `val_t2i_r1/5/10` over the
      val images that have captions (`evaluation.retrieval_metrics`);
    - `samples_per_s`: training throughput since the previous report, evaluation excluded;
      `time_s`: wall time since the trial started, carried over resumes;
      `skipped_images`: unreadable images skipped so far;
    - `best_val_top1` and `best_step`: the best val_top1 so far and the step it was reached.

    Per-class top-1 goes to per_class.jsonl. A non-finite loss ends the trial with status
    `diverged` (no exception). With `ctx.resume_from` the loop continues from that
    checkpoint's step, the history after it dropped.
    """
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = ctx.device
    sink = TrialSink(ctx.trial_dir, ctx.remote) if ctx.rank == 0 else None
    cfg = _with_checkpoint(cfg)
    model, processor = load_pretrained(cfg.model_path, cfg.model.trust_remote_code)
    tokenizer = processor.tokenizer
    max_len = text_max_length(model, processor, cfg.model.max_length)
    transform = D.image_transform(processor.image_processor, cfg.model.max_num_patches)
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, D.data_root(cfg.data, ctx.cache_dir))
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    enc = DualEncoder(model, cfg.loss, cfg.freeze_vision).to(device)
    ddp = wrap_ddp(enc, device, ctx.world_size, ctx.group)
    agree = Agreement.create(ctx.world_size, ctx.group)
    tf32 = configure_matmul(device)
    # Fused AdamW: one kernel over every parameter instead of ~10 small ops per tensor (on
    # the CPU the unfused step of a small tower costs as much as its backward).
    optimizer = torch.optim.AdamW(param_groups(enc, cfg.train), lr=cfg.train.lr,
                                  fused=device.type in ("cpu", "cuda"))
    n_steps, spe = total_steps(cfg, len(td.train))
    lr_factor = lr_lambda(cfg.train, n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_fn = make_loss_fn(cfg, ctx.group)
    precision = resolve_precision(cfg.train.precision, device)
    autocast = autocast_for(precision, device)
    # Cached image features (frozen tower) or decode-once images, per the data spec.
    nw = D.loader_workers(cfg.data.num_workers, worker_resources(cfg.scaling).get("CPU", 0.0))
    inputs = C.trial_inputs(cfg, ctx, td, enc, transform, D.Collate(tokenizer, max_len),
                            precision, agree, nw)
    if cfg.train.compile:  # in place: parameter names (checkpoints) and DDP stay the same
        for name, tower in enc.model.named_children():
            if name == "text_model" or (name == "vision_model" and inputs.kind != "features"):
                tower.compile()
    sampler = D.GlobalBatchSampler(len(td.train), cfg.batch_size, ctx.rank, ctx.world_size,
                                   cfg.seed)
    injected = faults.for_trial(cfg.trial_id)  # empty unless a fault-tolerance test asks
    collate = inputs.collate
    if "dataloader" in injected:
        collate = faults.FaultyCollate(collate, injected["dataloader"])
    loader = D.make_loader(inputs.train, sampler, collate, nw, pin_memory=device.type == "cuda",
                           device=device, augment=cfg.data.augment, seed=cfg.seed,
                           local_ranks=ctx.local_world_size)
    val = val_loader(td.val_samples, td.val_names, transform, tokenizer, max_len, ctx.rank,
                     ctx.world_size, cfg.eval.batch_size, nw, inputs.wrap_val, device,
                     ctx.local_world_size)
    evaluate = Evaluator(enc, val, td.val_names, td.eval_templates, td.seen, tokenizer,
                         max_len, device, autocast, cfg.eval.batch_size, ctx.world_size,
                         ctx.group, images=inputs.val_images,
                         captions=retrieval_captions(cfg.eval.retrieval, td.val_samples))
    seq = _Sequencer(cfg, ctx, enc, optimizer, scheduler, lr_factor, evaluate, sink,
                     td.val_wnids, n_steps, spe, global_batch_size(cfg, len(td.train)), t0,
                     agree=agree)
    resumed = ctx.resume_from is not None
    if resumed:
        seq.st.update(load_checkpoint(Path(ctx.resume_from), enc, optimizer, scheduler,
                                      restore_rng=True))
        if sink:
            sink.truncate_after(seq.st["step"])
    if sink:
        sink.update_status(
            status="running", started_at=_now(), train_classes=td.train_classes,
            train_class_names=td.train_class_names,
            eval_classes=td.val_wnids, trust_remote_code=cfg.model.trust_remote_code,
            n_train_images=len(td.train), n_val_images=len(td.val_samples),
            left_out_no_caption=td.left_out_no_caption, total_steps=n_steps,
            steps_per_epoch=spe, world_size=ctx.world_size, device=str(device),
            precision=precision, tf32=tf32, inputs=inputs.kind, loader_workers=nw,
            restarts=int(sink.status().get("restarts", -1)) + 1)
    enc.train()
    if not resumed:
        seq.report(None, None)  # zero-shot, step 0

    train_step = step_for(cfg.train)  # one pass, or micro-batched (train.micro_batch_size)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        faults.maybe_oom(injected, seq.st["step"] + 1)
        return train_step(ddp, batch, optimizer, scheduler, loss_fn, cfg.train.max_grad_norm,
                          autocast)

    try:
        seq.train(loader, sampler, step)
    except Diverged as e:
        seq.diverged(e)
        return seq.finish("diverged", str(e), model, processor)
    return seq.finish("terminated", None, model, processor)


def _with_checkpoint(cfg: TrialConfig) -> TrialConfig:
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


def _progress(cfg: TrialConfig, ctx: WorkerContext, st: dict[str, Any], n_steps: int,
              loss: float | None, sps: float | None) -> None:
    if ctx.rank == 0:
        left = (n_steps - st["step"]) * cfg.batch_size / sps if sps else float("nan")
        log.info("[%s] epoch %d step %d/%d loss %s %s samples/s ETA %.0fs", cfg.trial_id,
                 st["epoch"], st["step"], n_steps, "-" if loss is None else f"{loss:.4f}",
                 "-" if sps is None else f"{sps:.1f}", left)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
