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

from sweeper import data as D
from sweeper import faults
from sweeper.checkpoint import (
    FINAL_ADAPTER,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
)
from sweeper.context import ReportFn, WorkerContext
from sweeper.recipe import TrialParts, checkpoint_on_node, setup_trial
from sweeper.sink import TrialSink
from sweeper.spec import TrialConfig
from sweeper.training import step_for

log = logging.getLogger(__name__)

__all__ = ["Diverged", "ReportFn", "WorkerContext", "run_trial"]


class Diverged(RuntimeError):
    """The loss became non-finite: the trial stops at once with status `diverged`."""


# --------------------------------------------------------------------------- sequencer


def _initial_state() -> dict[str, Any]:
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0,
            "best_val_top1": None, "best_step": None, "skipped_images": 0,
            "time_offset_s": 0.0, "zero_shot_top1": None, "data_wait_s": 0.0, "loop_s": 0.0}


WAIT_WARN = 0.10  # a worker's epoch line says so when it waited longer for data


class _DataClock:
    """The training loop's time and the part of it blocked on the loader's next batch
    (`data_wait_frac`). Host time only: on a GPU the step runs ahead asynchronously, so a
    loop whose GPU is the bottleneck blocks at its syncs, not in `next()`; nothing here
    adds a sync. Evaluations and checkpoints (`pause`) are not loop time."""

    def __init__(self) -> None:
        self.waited = self.paused = 0.0

    def batches(self, loader: Any) -> Any:
        """The loader's batches, the time blocked in `iter` and `next` counted."""
        t = time.perf_counter()
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - t
            yield batch
            t = time.perf_counter()

    def pause(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, its time not counted as the loop's."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.paused += time.perf_counter() - t

    def mark(self) -> tuple[float, float, float]:
        return time.perf_counter(), self.waited, self.paused

    def since(self, mark: tuple[float, float, float]) -> tuple[float, float]:
        """(loop seconds, of which waiting for data) since `mark`."""
        t, w, p = mark
        return time.perf_counter() - t - (self.paused - p), self.waited - w


@dataclass
class _Sequencer:
    """Everything around the train step: the loop over the budget, evaluations, reports,
    checkpoints, divergence and the final status. `st` is the loop state that a checkpoint
    saves and a resume restores."""

    cfg: TrialConfig
    ctx: WorkerContext
    parts: TrialParts
    sink: TrialSink | None
    t0: float = field(default_factory=time.time)
    st: dict[str, Any] = field(default_factory=_initial_state)

    def epochs(self) -> float:
        return self.st["epoch"] + self.st["batch_in_epoch"] / max(1, self.parts.steps_per_epoch)

    def elapsed(self) -> float:
        return self.st["time_offset_s"] + time.time() - self.t0

    def lr(self) -> float:
        return self.cfg.train.lr * self.parts.lr_factor(self.st["step"])

    def train(self, step: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        """Step until the budget is spent, evaluating when due. The loss stays on the
        device and is read (a host sync) only at log and evaluation points, or at every step
        on the CPU where reading it costs nothing, so that a divergence stops at once. The
        ranks agree on every batch before it reaches a collective (`Agreement.batch`): all
        step on slices of the smallest readable size, and all skip a position where one
        rank has no readable image."""
        cfg, st, device, p = self.cfg, self.st, self.ctx.device, self.parts
        sampler = p.sampler
        every, log_every = cfg.eval.every_steps, cfg.train.log_every_steps
        loss_sum = torch.zeros((), device=device)
        n_loss, t_int, n_int = 0, time.time(), 0
        clock = _DataClock()
        interval = clock.mark()
        while st["step"] < p.n_steps:
            sampler.epoch, sampler.skip_batches = st["epoch"], st["batch_in_epoch"]
            steps_before, epoch_start = st["step"], clock.mark()
            for batch in clock.batches(p.loader):
                size, skipped = p.agree.batch(batch["size"], batch["skipped"])
                st["skipped_images"] += skipped
                st["batch_in_epoch"] += 1  # a batch of unreadable images is a position too
                stepped = size > 0
                if stepped:
                    batch = D.trim_batch(batch, size)
                    loss_sum += step(batch)
                    n_loss, st["step"] = n_loss + 1, st["step"] + 1
                    st["samples_seen"] += p.global_batch
                    n_int += p.global_batch
                end_of_epoch = st["batch_in_epoch"] >= p.steps_per_epoch
                last = st["step"] >= p.n_steps
                due_eval = last or (stepped and st["step"] % every == 0 if every
                                    else end_of_epoch)
                due_log = stepped and st["step"] % log_every == 0
                loss = None
                if due_eval or due_log or device.type == "cpu":
                    loss = self._mean_loss(loss_sum, n_loss)
                    if loss is not None and not math.isfinite(loss):
                        raise Diverged(f"non-finite loss at step {st['step']}")
                if end_of_epoch:
                    self._epoch_wait(*clock.since(epoch_start))
                    st["epoch"], st["batch_in_epoch"] = st["epoch"] + 1, 0
                if due_eval or due_log:
                    dt = time.time() - t_int
                    sps = n_int / dt if dt > 0 and n_int else None
                    _progress(cfg, self.ctx, st, p.n_steps, loss, sps)
                    if due_eval:
                        loop_s, waited = clock.since(interval)
                        st["loop_s"] += loop_s
                        st["data_wait_s"] += waited
                        clock.pause(self.report, loss, sps,
                                    waited / loop_s if loop_s > 0 else None)
                        loss_sum.zero_()
                        n_loss, t_int, n_int = 0, time.time(), 0
                        interval = clock.mark()
                if last or end_of_epoch:
                    break
            if st["step"] == steps_before:
                raise D.DataError(f"epoch {st['epoch']}: no readable training image")

    def _epoch_wait(self, loop_s: float, waited: float) -> None:
        """Say so (rank 0) when the epoch's loop waited for data over WAIT_WARN of it."""
        if self.ctx.rank == 0 and loop_s > 0 and waited / loop_s > WAIT_WARN:
            log.warning("[%s] epoch %d: data_wait_frac %.2f: the training loop waited %.0f%% "
                        "of its time for data; more DataLoader workers "
                        "(scaling.resources_per_worker.CPU, data.num_workers) or "
                        "data.cache_images would feed it", self.cfg.trial_id,
                        self.st["epoch"], waited / loop_s, 100 * waited / loop_s)

    def _mean_loss(self, loss_sum: torch.Tensor, n: int) -> float | None:
        """Mean global loss per step since the last report (a host sync). Each rank holds
        its share of the global loss; the mean of the shares is the global loss."""
        if self.ctx.world_size > 1:
            loss_sum = loss_sum.clone()
            dist.all_reduce(loss_sum, group=self.ctx.group)
            loss_sum /= self.ctx.world_size
        return loss_sum.item() / n if n else None

    def report(self, train_loss: float | None, samples_per_s: float | None,
               data_wait_frac: float | None = None) -> dict[str, Any]:
        """Evaluate, append the history and per-class rows, and hand the metrics (listed in
        `run_trial`'s docstring) with a checkpoint (written by rank 0; none at step 0,
        whose weights are the pretrained ones) to `ctx.report`."""
        st, p = self.st, self.parts
        m = p.evaluate()
        per_class, skipped_val = m.pop("per_class"), m.pop("skipped_val")
        if st["step"] == 0:
            st["zero_shot_top1"] = m["val_top1"]
        if m["val_top1"] is not None and (st["best_val_top1"] is None
                                          or m["val_top1"] > st["best_val_top1"]):
            st["best_val_top1"], st["best_step"] = m["val_top1"], st["step"]
        metrics = {
            "epoch": self.epochs(), "step": st["step"], "samples_seen": st["samples_seen"],
            "train_loss": train_loss, "lr": self.lr(),
            "logit_scale": p.enc.logit_scale.detach().float().exp().item(),
            "logit_bias": p.enc.logit_bias.detach().float().item(),
            **m,
            "samples_per_s": samples_per_s, "data_wait_frac": data_wait_frac,
            "time_s": self.elapsed(),
            "skipped_images": st["skipped_images"] + skipped_val,
            "best_val_top1": st["best_val_top1"], "best_step": st["best_step"],
        }
        ckpt_dir = None
        if self.sink:
            self.sink.append_history(metrics)
            self.sink.append_per_class(st["step"],
                                       dict(zip(p.data.val_wnids, per_class, strict=True)))
            if st["step"] > 0:  # step 0 is the pretrained checkpoint: nothing to save
                ckpt_dir = Path(tempfile.mkdtemp(prefix="sweeper-ckpt-"))
                save_checkpoint(ckpt_dir, p.enc, p.optimizer, p.scheduler,
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

    def finish(self, status: str, error: str | None) -> dict[str, Any]:
        """The final status fields (status.json); `final_model/` when `train.save_final`."""
        st = self.st
        final = {"status": status, "error": error, "best_val_top1": st["best_val_top1"],
                 "best_step": st["best_step"], "zero_shot_top1": st["zero_shot_top1"],
                 "steps": st["step"], "samples_seen": st["samples_seen"],
                 "epochs": self.epochs(), "skipped_images": st["skipped_images"],
                 "data_wait_frac": st["data_wait_s"] / st["loop_s"] if st["loop_s"] else None,
                 "ended_at": _now(), "wall_time_s": self.elapsed()}
        if self.sink:
            if self.cfg.train.save_final and status == "terminated":
                p = self.parts
                save_final_model(self.ctx.trial_dir / "final_model", p.model, p.processor,
                                 p.adapted)
                if p.adapted is not None:
                    self.sink.publish_dir(FINAL_ADAPTER, marker="adapter_config.json")
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
      `data_wait_frac`: the share of the training loop's time since the previous report
      spent blocked on the loader's next batch (`_DataClock`; None at step 0);
      `time_s`: wall time since the trial started, carried over resumes;
      `skipped_images`: unreadable images skipped so far (and samples the scan could not
      use: a WebDataset sample without a label or with an image over the size bound);
    - `best_val_top1` and `best_step`: the best val_top1 so far and the step it was reached.

    Per-class top-1 goes to per_class.jsonl. A non-finite loss ends the trial with status
    `diverged` (no exception). With `ctx.resume_from` the loop continues from that
    checkpoint's step, the history after it dropped.
    """
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    sink = TrialSink(ctx.trial_dir, ctx.remote) if ctx.rank == 0 else None
    cfg = checkpoint_on_node(cfg)
    p = setup_trial(cfg, ctx)
    seq = _Sequencer(cfg, ctx, p, sink, t0)
    resumed = ctx.resume_from is not None
    if resumed:
        seq.st.update(load_checkpoint(Path(ctx.resume_from), p.enc, p.optimizer, p.scheduler,
                                      restore_rng=True))
        if sink:
            sink.truncate_after(seq.st["step"])
    else:
        seq.st["skipped_images"] = p.data.skipped
    if sink:
        td = p.data
        trainable, total = p.enc.param_counts()
        sink.update_status(
            status="running", started_at=_now(), train_classes=td.train_classes,
            train_class_names=td.train_class_names,
            eval_classes=td.val_wnids, trust_remote_code=cfg.model.trust_remote_code,
            n_train_images=len(td.train), n_val_images=len(td.val_samples),
            left_out_no_caption=td.left_out_no_caption, total_steps=p.n_steps,
            steps_per_epoch=p.steps_per_epoch, world_size=ctx.world_size,
            device=str(ctx.device), precision=p.precision, tf32=p.tf32,
            inputs=p.inputs.kind, loader_workers=p.loader_workers,
            trainable_params=trainable, total_params=total,
            restarts=int(sink.status().get("restarts", -1)) + 1)
    p.enc.train()
    if not resumed:
        seq.report(None, None)  # zero-shot, step 0

    train_step = step_for(cfg.train)  # one pass, or micro-batched (train.micro_batch_size)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        faults.maybe_oom(p.faults, seq.st["step"] + 1)
        return train_step(p.module, batch, p.optimizer, p.scheduler, p.loss_fn,
                          cfg.train.max_grad_norm, p.autocast)

    try:
        seq.train(step)
    except Diverged as e:
        seq.diverged(e)
        return seq.finish("diverged", str(e))
    return seq.finish("terminated", None)


def _progress(cfg: TrialConfig, ctx: WorkerContext, st: dict[str, Any], n_steps: int,
              loss: float | None, sps: float | None) -> None:
    if ctx.rank == 0:
        left = (n_steps - st["step"]) * cfg.batch_size / sps if sps else float("nan")
        log.info("[%s] epoch %d step %d/%d loss %s %s samples/s ETA %.0fs", cfg.trial_id,
                 st["epoch"], st["step"], n_steps, "-" if loss is None else f"{loss:.4f}",
                 "-" if sps is None else f"{sps:.1f}", left)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
