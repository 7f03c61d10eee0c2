"""The worker loop of one trial: a short step function plus a sequencer.

Runs the same on 1 or N processes (world size 1 is the trivial case) and never imports Ray:
the orchestration layer hands it a `WorkerContext` (rank, world size, device, trial folder,
a `report` function and the checkpoint to resume from), and a test can hand it one too.
"""

from __future__ import annotations

import contextlib
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
from torch import nn

from sweeper import data as D
from sweeper.losses import sigmoid_loss, softmax_loss
from sweeper.models import DualEncoder, load_pretrained, text_max_length
from sweeper.sink import TrialSink
from sweeper.spec import TrialConfig

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, Any], Path | None], None]


@dataclass
class WorkerContext:
    """What the orchestration gives one worker process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trial_dir: Path = Path(".")
    report: ReportFn = lambda metrics, ckpt: None
    resume_from: Path | None = None  # a checkpoint directory to continue from
    cache_dir: Path | None = None
    group: Any = None  # torch.distributed group (None: the world when initialised)


class Diverged(RuntimeError):
    """The loss became non-finite: the trial stops at once with status `diverged`."""


# --------------------------------------------------------------------------- optimisation


def _tower(name: str) -> str:
    if "logit_" in name:
        return "logit"
    if "vision" in name or "visual" in name:
        return "vision"
    return "text"


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "bias" in name or "norm" in name or "logit_" in name


def param_groups(model: nn.Module, train: Any) -> list[dict[str, Any]]:
    """AdamW groups: per tower (text, vision, temperature/bias) x decay/no-decay.

    Biases, norms and the temperature/bias get no weight decay; each tower may have its own
    learning rate (`train.lr_text`, `lr_vision`, `lr_logit`, else `train.lr`)."""
    lrs = {"text": train.lr_text, "vision": train.lr_vision, "logit": train.lr_logit}
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        tower, nd = _tower(name), _no_decay(name, p)
        g = groups.setdefault((tower, nd), {
            "params": [], "names": [], "tower": tower,
            "lr": lrs[tower] or train.lr,
            "weight_decay": 0.0 if nd else train.weight_decay,
        })
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_lambda(train: Any, total_steps: int) -> Callable[[int], float]:
    """Linear warmup over `train.warmup_steps`, then constant or cosine decay to 0."""
    warm = train.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if train.schedule == "cosine":
            span = max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span)))
        return 1.0

    return f


def total_steps(cfg: TrialConfig, n_train: int) -> tuple[int, int]:
    """(steps in the budget, steps per epoch) for this trial's data and global batch."""
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
    return math.ceil(b.samples / cfg.batch_size), spe


# --------------------------------------------------------------------------- step


def make_loss_fn(cfg: TrialConfig, group: Any) -> Callable[..., torch.Tensor]:
    """The global-batch contrastive loss of the trial's variant."""
    targets = cfg.train.same_class_pairs

    def loss_fn(img, txt, scale, bias, labels):
        kw = {"group": group, "pair_targets": targets,
              "labels": labels if targets != "negative" else None}
        if cfg.loss == "sigmoid":
            return sigmoid_loss(img, txt, scale, bias, **kw)
        return softmax_loss(img, txt, scale, **kw)

    return loss_fn


def train_step(model: nn.Module, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: Any, loss_fn: Callable[..., torch.Tensor], max_grad_norm: float | None,
               autocast: Any) -> torch.Tensor:
    """Forward, global-batch loss, backward, clip, update. Returns the loss (on device,
    unsynchronised: reading it forces a host sync, which the sequencer does only when it
    logs)."""
    with autocast():
        img, txt, scale, bias = model(batch["pixel_values"], batch["input_ids"],
                                      batch.get("attention_mask"), batch.get("image_embeds"))
    loss = loss_fn(img.float(), txt.float(), scale.float(), bias.float(), batch["labels"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    scheduler.step()
    return loss.detach()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def class_text_embeddings(enc: DualEncoder, names: list[str], templates: list[str],
                          tokenizer: Any, max_length: int, device: torch.device,
                          autocast: Any) -> torch.Tensor:
    """[C, d] class embeddings from the *current* text tower, averaged over templates
    (prompt ensembling), renormalised."""
    out = []
    for name in names:
        tok = tokenizer([t.format(name) for t in templates], padding="max_length",
                        truncation=True, max_length=max_length, return_tensors="pt")
        with autocast():
            e = enc.encode_text(tok["input_ids"].to(device),
                                tok.get("attention_mask").to(device)
                                if tok.get("attention_mask") is not None else None)
        out.append(nn.functional.normalize(e.float().mean(0), dim=-1))
    return torch.stack(out)


@torch.no_grad()
def image_embeddings(enc: DualEncoder, loader: Any, device: torch.device,
                     autocast: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(embeddings [n, d], labels [n], skipped) of this rank's shard of the val set."""
    embs, labels, skipped = [], [], 0
    for batch in loader:
        skipped += batch["skipped"]
        if not batch["size"]:
            continue
        with autocast():
            e = enc.encode_image(batch["pixel_values"].to(device, non_blocking=True))
        embs.append(e.float())
        labels.append(batch["labels"].to(device))
    if not embs:
        return torch.zeros(0, 1, device=device), torch.zeros(0, dtype=torch.long), skipped
    return torch.cat(embs), torch.cat(labels), skipped


def zero_shot_metrics(img: torch.Tensor, labels: torch.Tensor, cls: torch.Tensor,
                      seen: list[bool], world_size: int, group: Any = None) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy over every rank's shard (counts summed)."""
    n_cls = cls.shape[0]
    correct1 = torch.zeros(n_cls, dtype=torch.float64, device=cls.device)
    correct5 = torch.zeros_like(correct1)
    count = torch.zeros_like(correct1)
    if img.shape[0]:
        logits = img @ cls.T
        k = min(5, n_cls)
        top = logits.topk(k, dim=-1).indices
        hit1 = (top[:, 0] == labels).double()
        hit5 = (top == labels[:, None]).any(-1).double()
        correct1.index_add_(0, labels, hit1)
        correct5.index_add_(0, labels, hit5)
        count.index_add_(0, labels, torch.ones_like(hit1))
    if world_size > 1:
        stacked = torch.stack([correct1, correct5, count])
        dist.all_reduce(stacked, group=group)
        correct1, correct5, count = stacked
    seen_t = torch.tensor(seen, device=cls.device)

    def acc(c: torch.Tensor, mask: torch.Tensor) -> float | None:
        n = count[mask].sum().item()
        return c[mask].sum().item() / n if n else None

    every = torch.ones_like(seen_t)
    per_class = (correct1 / count.clamp(min=1)).tolist()
    return {
        "val_top1": acc(correct1, every),
        "val_top5": acc(correct5, every),
        "val_top1_seen": acc(correct1, seen_t),
        "val_top1_unseen": acc(correct1, ~seen_t),
        "per_class": per_class,
    }


# --------------------------------------------------------------------------- checkpoints


def _trainable_state(enc: DualEncoder) -> dict[str, torch.Tensor]:
    """What changes during training: a frozen vision tower is not saved again."""
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in enc.state_dict().items()
            if k in names or not enc.freeze_vision}


def save_checkpoint(path: Path, enc: DualEncoder, optimizer: Any, scheduler: Any,
                    state: dict[str, Any]) -> None:
    torch.save({"model": _trainable_state(enc), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": state}, path / "state.pt")


def load_checkpoint(path: Path, enc: DualEncoder, optimizer: Any = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint`; returns the loop state."""
    ck = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    enc.load_state_dict(ck["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(ck["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ck["scheduler"])
    return ck["state"]


# --------------------------------------------------------------------------- sequencer


def _autocast(cfg: TrialConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.train.precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _val_loader(samples: list[D.Sample], names: list[str], transform: D.ImageTransform,
                tokenizer: Any, max_length: int, ctx: WorkerContext, batch_size: int,
                num_workers: int) -> Any:
    ds = D.ImageTextDataset(samples, names, transform, ["{}"], "templates", 0)
    mine = list(range(ctx.rank, len(samples), ctx.world_size))
    batches = [[(i, 0) for i in mine[j:j + batch_size]] for j in range(0, len(mine), batch_size)]
    return D.make_loader(ds, batches, D.Collate(tokenizer, max_length), num_workers)


def run_trial(cfg: TrialConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Fine-tune and evaluate one trial; returns the final status fields."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = ctx.device
    sink = TrialSink(ctx.trial_dir) if ctx.rank == 0 else None
    model, processor = load_pretrained(cfg.model, ctx.cache_dir)
    tokenizer = processor.tokenizer
    max_len = text_max_length(model, processor, cfg.model.max_length)
    transform = D.ImageTransform.from_processor(processor.image_processor)
    root = cfg.data.root
    if cfg.data.synthetic is not None:
        from sweeper.synthetic import dataset_dir

        s = cfg.data.synthetic
        root = str(dataset_dir(s.n_classes, s.train_per_class, s.val_per_class, s.image_size,
                               s.seed, ctx.cache_dir and Path(ctx.cache_dir)))
    td = D.build_trial_data(cfg.data, cfg.text_source, cfg.n_train_classes, cfg.seed,
                            transform, root)
    enc = DualEncoder(model, cfg.loss, cfg.freeze_vision).to(device)
    ddp: nn.Module = enc
    if ctx.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            enc, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(enc, cfg.train), lr=cfg.train.lr)
    n_steps, spe = total_steps(cfg, len(td.train))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train, n_steps))
    loss_fn = make_loss_fn(cfg, ctx.group)
    autocast = _autocast(cfg, device)
    collate = D.Collate(tokenizer, max_len)
    sampler = D.GlobalBatchSampler(len(td.train), cfg.batch_size, ctx.rank, ctx.world_size,
                                   cfg.seed)
    loader = D.make_loader(td.train, sampler, collate, cfg.data.num_workers,
                           pin_memory=device.type == "cuda")
    val_loader = _val_loader(td.val_samples, td.val_names, transform, tokenizer, max_len, ctx,
                             cfg.eval.batch_size, cfg.data.num_workers)

    st: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0,
                          "best_val_top1": None, "best_step": None, "skipped_images": 0,
                          "time_offset_s": 0.0, "zero_shot_top1": None}
    resumed = ctx.resume_from is not None
    if resumed:
        st.update(load_checkpoint(Path(ctx.resume_from), enc, optimizer, scheduler))
        if sink:
            sink.truncate_after(st["step"])
    if sink:
        sink.update_status(
            status="running", started_at=_now(), train_classes=td.train_classes,
            train_class_names=td.train_class_names,
            eval_classes=td.val_wnids, trust_remote_code=cfg.model.trust_remote_code,
            n_train_images=len(td.train), n_val_images=len(td.val_samples),
            left_out_no_caption=td.left_out_no_caption, total_steps=n_steps,
            steps_per_epoch=spe, world_size=ctx.world_size, device=str(device),
            restarts=int(sink.status().get("restarts", -1)) + 1)
    cache: dict[str, Any] = {}

    def evaluate_and_report(train_loss: float | None, lr: float, sps: float | None) -> None:
        enc.eval()
        if "val" not in cache or not cfg.freeze_vision:
            # With a frozen vision tower the val image embeddings never change: once per trial.
            cache["val"] = image_embeddings(enc, val_loader, device, autocast)
        img, labels, skipped = cache["val"]
        cls = class_text_embeddings(enc, td.val_names, td.eval_templates, tokenizer, max_len,
                                    device, autocast)
        m = zero_shot_metrics(img, labels, cls, td.seen, ctx.world_size, ctx.group)
        enc.train()
        per_class = m.pop("per_class")
        if st["step"] == 0:
            st["zero_shot_top1"] = m["val_top1"]
        if m["val_top1"] is not None and (st["best_val_top1"] is None
                                          or m["val_top1"] > st["best_val_top1"]):
            st["best_val_top1"], st["best_step"] = m["val_top1"], st["step"]
        metrics = {
            "epoch": st["epoch"] + st["batch_in_epoch"] / max(1, spe),
            "step": st["step"], "samples_seen": st["samples_seen"],
            "train_loss": train_loss, "lr": lr,
            "logit_scale": enc.logit_scale.detach().float().exp().item(),
            "logit_bias": enc.logit_bias.detach().float().item(),
            **m,
            "samples_per_s": sps, "time_s": st["time_offset_s"] + time.time() - t0,
            "skipped_images": st["skipped_images"] + skipped,
            "best_val_top1": st["best_val_top1"], "best_step": st["best_step"],
        }
        ckpt_dir = None
        if sink:
            sink.append_history(metrics)
            sink.append_per_class(st["step"], dict(zip(td.val_wnids, per_class, strict=True)))
            if st["step"] > 0:
                ckpt_dir = Path(tempfile.mkdtemp(prefix="sweeper-ckpt-"))
                save_checkpoint(ckpt_dir, enc, optimizer, scheduler,
                                {**st, "time_offset_s": metrics["time_s"]})
        ctx.report(metrics, ckpt_dir)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    enc.train()
    if not resumed:
        evaluate_and_report(None, scheduler.get_last_lr()[0], None)
    loss_sum = torch.zeros((), device=device)
    n_loss, t_int, n_int = 0, time.time(), 0
    status = "terminated"
    try:
        while st["step"] < n_steps:
            sampler.epoch, sampler.skip_batches = st["epoch"], st["batch_in_epoch"]
            for batch in loader:
                st["skipped_images"] += batch["skipped"]
                if not batch["size"]:
                    continue
                batch = _to_device(batch, device)
                loss = train_step(ddp, batch, optimizer, scheduler, loss_fn,
                                  cfg.train.max_grad_norm, autocast)
                loss_sum += loss
                n_loss += 1
                st["step"] += 1
                st["batch_in_epoch"] += 1
                st["samples_seen"] += cfg.batch_size
                n_int += cfg.batch_size
                end_of_epoch = st["batch_in_epoch"] >= spe
                last = st["step"] >= n_steps
                every = cfg.eval.every_steps
                due_eval = last or (every and st["step"] % every == 0) or (
                    not every and end_of_epoch)
                # Reading the loss syncs with the device: only at log/eval points, or every
                # step on the CPU where it is free, so divergence stops the trial at once.
                check = due_eval or device.type == "cpu" or (
                    st["step"] % cfg.train.log_every_steps == 0)
                if check and not torch.isfinite(loss_sum):
                    raise Diverged(f"non-finite loss at step {st['step']}")
                if end_of_epoch:
                    st["epoch"] += 1
                    st["batch_in_epoch"] = 0
                if due_eval:
                    dt = time.time() - t_int
                    evaluate_and_report(loss_sum.item() / max(1, n_loss),
                                        scheduler.get_last_lr()[0], n_int / dt if dt else None)
                    _progress(cfg, ctx, st, n_steps, loss_sum.item() / max(1, n_loss), n_int / dt)
                    loss_sum.zero_()
                    n_loss, t_int, n_int = 0, time.time(), 0
                if last or end_of_epoch:
                    break
    except Diverged as e:
        status = "diverged"
        log.warning("%s: %s", cfg.trial_id, e)
        if sink:
            sink.append_history({"step": st["step"], "epoch": st["epoch"],
                                 "samples_seen": st["samples_seen"], "train_loss": float("nan"),
                                 "time_s": time.time() - t0 + st["time_offset_s"]})
        ctx.report({"step": st["step"], "diverged": True}, None)
    final = {"status": status, "best_val_top1": st["best_val_top1"],
             "best_step": st["best_step"], "zero_shot_top1": st["zero_shot_top1"],
             "steps": st["step"], "samples_seen": st["samples_seen"],
             "epochs": st["epoch"] + st["batch_in_epoch"] / max(1, spe),
             "skipped_images": st["skipped_images"], "ended_at": _now(),
             "wall_time_s": st["time_offset_s"] + time.time() - t0,
             "error": f"non-finite loss at step {st['step']}" if status == "diverged" else None}
    if sink:
        if cfg.train.save_final and status == "terminated":
            out = ctx.trial_dir / "final_model"
            model.save_pretrained(out)
            processor.save_pretrained(out)
        sink.update_status(**final)
    return final


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _progress(cfg: TrialConfig, ctx: WorkerContext, st: dict[str, Any], n_steps: int,
              loss: float, sps: float) -> None:
    if ctx.rank == 0:
        left = (n_steps - st["step"]) * cfg.batch_size / sps if sps else float("nan")
        log.info("[%s] epoch %d step %d/%d loss %.4f %.1f samples/s ETA %.0fs", cfg.trial_id,
                 st["epoch"], st["step"], n_steps, loss, sps, left)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
