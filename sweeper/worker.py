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

from sweeper import cache as C
from sweeper import data as D
from sweeper import faults
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
                          autocast: Any, batch_size: int = 256) -> torch.Tensor:
    """[C, d] class embeddings from the *current* text tower: the normalised embeddings of
    every template filled with the class name, averaged (prompt ensembling), renormalised.
    The C x T prompts are encoded in batches of `batch_size`."""
    prompts = [t.format(name) for name in names for t in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        mask = tok.get("attention_mask")
        with autocast():
            e = enc.encode_text(tok["input_ids"].to(device),
                                mask.to(device) if mask is not None else None)
        embs.append(e.float())
    per_prompt = torch.cat(embs).view(len(names), len(templates), -1)
    return nn.functional.normalize(per_prompt.mean(1), dim=-1)


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
        return (torch.zeros(0, 1, device=device),
                torch.zeros(0, dtype=torch.long, device=device), skipped)
    return torch.cat(embs), torch.cat(labels), skipped


def zero_shot_metrics(img: torch.Tensor, labels: torch.Tensor, cls: torch.Tensor,
                      seen: list[bool], world_size: int, group: Any = None) -> dict[str, Any]:
    """Top-1/top-5 and per-class top-1 over every rank's shard (counts summed).

    `img` [n, d] and `cls` [C, d] are normalised embeddings, `labels` [n] index the classes,
    `seen[c]` says whether class c was trained on. `val_top1_seen` / `val_top1_unseen` are
    the top-1 over the images of seen / unseen classes (None when there are none); top-5
    is top-min(5, C). `per_class[c]` is None for a class without val images."""
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
    per_class = [c / n if n else None for c, n in zip(correct1.tolist(), count.tolist(),
                                                      strict=True)]
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


# --------------------------------------------------------------------------- sequencer


def resolve_precision(precision: str, device: torch.device) -> str:
    """What `train.precision` means on `device`: `fp32` is plain float32; `bf16` autocasts
    to bfloat16 on any device (on the CPU only because it was asked for); `auto` is bf16 on
    a CUDA device that supports it and fp32 elsewhere, the CPU included."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    return precision


def _autocast(precision: str, device: torch.device) -> Callable[[], Any]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _val_loader(samples: list[D.Sample], names: list[str], transform: D.ImageTransform,
                tokenizer: Any, max_length: int, ctx: WorkerContext, batch_size: int,
                num_workers: int, wrap: Callable[[Any], Any] = lambda ds: ds) -> Any:
    ds = wrap(D.ImageTextDataset(samples, names, transform, ["{}"], "templates", 0))
    mine = list(range(ctx.rank, len(samples), ctx.world_size))
    batches = [[(i, 0) for i in mine[j:j + batch_size]] for j in range(0, len(mine), batch_size)]
    return D.make_loader(ds, batches, D.Collate(tokenizer, max_length), num_workers)


@dataclass
class Evaluator:
    """Zero-shot evaluation of the current model on this rank's shard of the val set.

    Every call rebuilds the class embeddings from the current text tower (prompt ensembling
    over the eval templates). With a frozen vision tower the val image embeddings cannot
    change, so they are computed at the first call only and kept for the trial."""

    enc: DualEncoder
    loader: Any
    names: list[str]
    templates: list[str]
    seen: list[bool]
    tokenizer: Any
    max_length: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Any = contextlib.nullcontext
    batch_size: int = 256
    world_size: int = 1
    group: Any = None
    images: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __call__(self) -> dict[str, Any]:
        """`zero_shot_metrics`' fields plus `skipped_val` (unreadable val images)."""
        was_training = self.enc.training
        self.enc.eval()
        try:
            if self.images is None or not self.enc.freeze_vision:
                self.images = image_embeddings(self.enc, self.loader, self.device,
                                               self.autocast)
            img, labels, skipped = self.images
            cls = class_text_embeddings(self.enc, self.names, self.templates, self.tokenizer,
                                        self.max_length, self.device, self.autocast,
                                        self.batch_size)
            m = zero_shot_metrics(img, labels, cls, self.seen, self.world_size, self.group)
        finally:
            self.enc.train(was_training)
        return {**m, "skipped_val": skipped}


def _initial_state() -> dict[str, Any]:
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0,
            "best_val_top1": None, "best_step": None, "skipped_images": 0,
            "time_offset_s": 0.0, "zero_shot_top1": None}


@dataclass
class _Sequencer:
    """Everything around `train_step`: the loop over the budget, evaluations, reports,
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
        on the CPU where reading it costs nothing, so that a divergence stops at once."""
        cfg, st, device = self.cfg, self.st, self.ctx.device
        every, log_every = cfg.eval.every_steps, cfg.train.log_every_steps
        loss_sum = torch.zeros((), device=device)
        n_loss, t_int, n_int = 0, time.time(), 0
        while st["step"] < self.n_steps:
            sampler.epoch, sampler.skip_batches = st["epoch"], st["batch_in_epoch"]
            steps_before = st["step"]
            for batch in loader:
                st["skipped_images"] += batch["skipped"]
                st["batch_in_epoch"] += 1  # a batch of unreadable images is a position too
                stepped = bool(batch["size"])
                if stepped:
                    loss_sum += step(_to_device(batch, device))
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
        `run_trial`'s docstring) with a checkpoint (written by rank 0) to `ctx.report`."""
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
            ckpt_dir = Path(tempfile.mkdtemp(prefix="sweeper-ckpt-"))
            save_checkpoint(ckpt_dir, self.enc, self.optimizer, self.scheduler,
                            {**st, "time_offset_s": metrics["time_s"]})
        try:
            self.ctx.report(metrics, ckpt_dir)
        finally:
            if ckpt_dir is not None:
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
            self.sink.update_status(**final)
        return final


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
    # Fused AdamW: one kernel over every parameter instead of ~10 small ops per tensor (on
    # the CPU the unfused step of a small tower costs as much as its backward).
    optimizer = torch.optim.AdamW(param_groups(enc, cfg.train), lr=cfg.train.lr,
                                  fused=device.type in ("cpu", "cuda"))
    n_steps, spe = total_steps(cfg, len(td.train))
    lr_factor = lr_lambda(cfg.train, n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss_fn = make_loss_fn(cfg, ctx.group)
    precision = resolve_precision(cfg.train.precision, device)
    autocast = _autocast(precision, device)
    # Cached image features (frozen tower) or decode-once images, per the data spec.
    inputs = C.trial_inputs(cfg, ctx, td, enc, transform, D.Collate(tokenizer, max_len),
                            precision)
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
    loader = C.DeviceBatches(
        D.make_loader(inputs.train, sampler, collate, cfg.data.num_workers,
                      pin_memory=device.type == "cuda"),
        device, cfg.data.augment, cfg.seed, sampler)
    val_loader = _val_loader(td.val_samples, td.val_names, transform, tokenizer, max_len, ctx,
                             cfg.eval.batch_size, cfg.data.num_workers, inputs.wrap_val)
    evaluate = Evaluator(enc, val_loader, td.val_names, td.eval_templates, td.seen, tokenizer,
                         max_len, device, autocast, cfg.eval.batch_size, ctx.world_size,
                         ctx.group, images=inputs.val_images)
    seq = _Sequencer(cfg, ctx, enc, optimizer, scheduler, lr_factor, evaluate, sink,
                     td.val_wnids, n_steps, spe, global_batch_size(cfg, len(td.train)), t0)
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
            precision=precision, restarts=int(sink.status().get("restarts", -1)) + 1)
    enc.train()
    if not resumed:
        seq.report(None, None)  # zero-shot, step 0

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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _progress(cfg: TrialConfig, ctx: WorkerContext, st: dict[str, Any], n_steps: int,
              loss: float | None, sps: float | None) -> None:
    if ctx.rank == 0:
        left = (n_steps - st["step"]) * cfg.batch_size / sps if sps else float("nan")
        log.info("[%s] epoch %d step %d/%d loss %s %s samples/s ETA %.0fs", cfg.trial_id,
                 st["epoch"], st["step"], n_steps, "-" if loss is None else f"{loss:.4f}",
                 "-" if sps is None else f"{sps:.1f}", left)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
