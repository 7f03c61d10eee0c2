"""Read an experiment directory into three Arrow tables: trials, history and per-class.

The directory is the sweeper's contract (see `sweeper/sink.py`): `sweep.json` lists every
trial of the grid, `trials/<trial_id>/` holds what each trial wrote, and Tune's own trial
folders sit beside them. Any of these files may be missing, half-written or stale (a
sweep still running, a driver killed); every reader here degrades to "unknown" (null)
rather than failing, and the tables are built with fixed schemas so that a rerun on the
same files gives the same bytes. Column meanings and dtypes: `analysis/SCHEMA.md`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from analysis.store import Store
from sweeper import search
from sweeper.sink import HISTORY_KEYS, first_error_line

SCHEMA_VERSION = "1"
NAMED_AXES = tuple(search.NAMED_AXES)
# Dotted grid axes must start with one of these spec sections (see sweeper.spec).
EXTRA_AXIS_SECTIONS = search.SECTIONS
# Trials left out of the tables: proposals of a killed run that the searcher replaced.
SUPERSEDED = "superseded"
# Evaluation metrics beside top-1 (sweeper.evaluation): mean per-class recall, and the
# image-text retrieval recalls (present when the trial's val images have captions).
EVAL_METRICS = (
    "val_mean_per_class_recall", "val_mean_per_class_recall_seen",
    "val_mean_per_class_recall_unseen",
    *(f"val_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
)
FINAL_METRICS = ("val_top1", "val_top5", "val_top1_seen", "val_top1_unseen", *EVAL_METRICS,
                 "train_loss")
# history.parquet's metric columns: the sink's keys, the evaluation metrics after top-1.
_AFTER = HISTORY_KEYS.index("val_top1_unseen") + 1
HISTORY_COLUMNS = (*HISTORY_KEYS[:_AFTER], *EVAL_METRICS, *HISTORY_KEYS[_AFTER:])

_INT_HISTORY = frozenset({"step", "samples_seen", "skipped_images"})

_AXIS_TYPES: dict[str, pa.DataType] = {
    "variant": pa.string(),
    "text_source": pa.string(),
    "batch_size": pa.int64(),
    "n_train_classes": pa.int64(),
    "seed": pa.int64(),
}

# trials.parquet, in column order; the extra-axis columns go right after `seed`.
_TRIAL_HEAD: tuple[tuple[str, pa.DataType], ...] = (
    ("trial_id", pa.string()),
    ("experiment", pa.string()),
    ("variant", pa.string()),
    ("loss", pa.string()),
    ("freeze_vision", pa.bool_()),
    ("text_source", pa.string()),
    ("batch_size", pa.int64()),
    ("n_train_classes", pa.int64()),
    ("seed", pa.int64()),
)
_TRIAL_TAIL: tuple[tuple[str, pa.DataType], ...] = (
    ("lr", pa.float64()),
    ("lr_text", pa.float64()),
    ("lr_vision", pa.float64()),
    ("lr_logit", pa.float64()),
    ("weight_decay", pa.float64()),
    ("warmup_steps", pa.int64()),
    ("schedule", pa.string()),
    ("max_grad_norm", pa.float64()),
    ("budget_kind", pa.string()),
    ("budget_value", pa.int64()),
    ("precision", pa.string()),
    ("same_class_pairs", pa.string()),
    ("micro_batch_size", pa.int64()),
    ("gradient_checkpointing", pa.bool_()),
    ("peft_method", pa.string()),
    ("lora_r", pa.int64()),
    ("lora_alpha", pa.float64()),
    ("lora_dropout", pa.float64()),
    ("lora_targets", pa.string()),
    ("lora_towers", pa.string()),
    ("trainable_params", pa.int64()),
    ("total_params", pa.int64()),
    ("num_workers", pa.int64()),
    ("use_gpu", pa.bool_()),
    ("pretrained", pa.string()),
    ("synthetic_data", pa.bool_()),
    ("trust_remote_code", pa.bool_()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("stopped_early", pa.bool_()),
    ("zero_shot_top1", pa.float64()),
    ("val_top1", pa.float64()),
    ("val_top5", pa.float64()),
    ("val_top1_seen", pa.float64()),
    ("val_top1_unseen", pa.float64()),
    *((m, pa.float64()) for m in EVAL_METRICS),
    ("train_loss", pa.float64()),
    ("best_val_top1", pa.float64()),
    ("best_step", pa.int64()),
    ("train_classes", pa.string()),
    ("n_eval_classes", pa.int64()),
    ("samples_seen", pa.int64()),
    ("steps", pa.int64()),
    ("total_steps", pa.int64()),
    ("epochs", pa.float64()),
    ("wall_time_s", pa.float64()),
    ("device_hours", pa.float64()),
    ("skipped_images", pa.int64()),
    ("data_wait_frac", pa.float64()),
    ("restarts", pa.int64()),
    ("started_at", pa.string()),
    ("ended_at", pa.string()),
    ("trial_path", pa.string()),
    ("tune_path", pa.string()),
    ("config", pa.string()),
)

PER_CLASS_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("step", pa.int64()),
        ("wnid", pa.string()),
        ("accuracy", pa.float64()),
        ("seen", pa.bool_()),
    ]
)


class ExperimentNotFound(FileNotFoundError):
    """The location holds neither a sweep.json nor a trials/ folder."""


def axis_column(axis: str) -> str:
    """Column name of a grid axis: dotted extra axes get `__` for `.` (`train.lr` ->
    `train__lr`), so that SQL and attribute access need no quoting."""
    return axis.replace(".", "__")


def is_extra_axis_column(name: str) -> bool:
    """True for a column that holds a dotted extra grid axis (`train__lr`)."""
    return any(name.startswith(f"{s}__") for s in EXTRA_AXIS_SECTIONS)


# --------------------------------------------------------------------------- coercion
# Files written by a crashing process or an older sweeper may hold anything; a value of
# the wrong type becomes null rather than failing the whole report.


def _float(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    f = _float(v)
    return int(f) if f is not None and f.is_integer() else None


def _bool(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def _str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True)


def _coerce(v: Any, dtype: pa.DataType) -> Any:
    if pa.types.is_integer(dtype):
        return _int(v)
    if pa.types.is_floating(dtype):
        return _float(v)
    if pa.types.is_boolean(dtype):
        return _bool(v)
    return _str(v)


def _infer_type(values: Iterable[Any]) -> pa.DataType:
    """Arrow type of an extra axis from its values: bool, int64, float64 or string."""
    vals = [v for v in values if v is not None]
    if not vals:
        return pa.string()
    if all(isinstance(v, bool) for v in vals):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pa.int64()
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
        return pa.float64()
    return pa.string()


# --------------------------------------------------------------------------- reading


@dataclass
class TuneTrial:
    """One of Tune's own trial folders at the top of the experiment directory."""

    name: str
    error: str | None
    results: list[dict[str, Any]]


@dataclass
class TrialRecord:
    """Everything the experiment directory says about one trial."""

    trial_id: str
    axes: dict[str, Any]
    config: dict[str, Any]
    status_file: dict[str, Any]
    history: list[dict[str, Any]]
    per_class: list[dict[str, Any]]
    has_folder: bool
    tune: list[TuneTrial] = field(default_factory=list)

    @property
    def tune_primary(self) -> TuneTrial | None:
        """The Tune folder that speaks for this trial: one with an error, else the one
        with the most results (a restored run continues in its old folder)."""
        if not self.tune:
            return None
        failed = [t for t in self.tune if t.error is not None]
        if failed:
            return failed[-1]
        return max(reversed(self.tune), key=lambda t: len(t.results))

    @property
    def status(self) -> str:
        """pending, running, terminated, diverged or errored (see SCHEMA.md)."""
        st = self.status_file.get("status")
        if isinstance(st, str) and st:
            return st
        if any(t.error is not None for t in self.tune):
            return "errored"
        if self.has_folder or self.history or self.tune:
            # Includes Tune's RUNNING copy with an empty result.json after a killed
            # driver: incomplete, never dropped.
            return "running"
        return "pending"

    @property
    def error(self) -> str | None:
        """First meaningful line of the trial's error, ours first, then Tune's."""
        err = first_error_line(self.status_file.get("error"))
        if err is None and self.status in ("errored", "diverged"):
            tune = self.tune_primary
            err = first_error_line(tune.error) if tune is not None else None
        return err


@dataclass
class Experiment:
    """An experiment directory, read: its sweep metadata and every trial's record."""

    store: Store
    name: str | None
    fingerprint: str | None
    created_at: str | None
    axes: dict[str, list[Any]]
    trials: list[TrialRecord]
    # Axes drawn from a range by a sampling search: {axis: its distribution, {kind: args}}.
    sampled: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def extra_axes(self) -> list[str]:
        """Dotted grid axes (`train.lr`), in the order the sweep lists them."""
        return [a for a in self.axes if a not in NAMED_AXES]


def _read_tune_folders(store: Store, trial_ids: Iterable[str]) -> list[TuneTrial]:
    """Tune's folders of our trials. Tune names each one by our trial id
    (trial_dirname_creator), and the ids are deterministic and unique, so the folder name
    alone says which trial it ran; other folders are never read."""
    ids = set(trial_ids)
    out = []
    for name in store.list_dirs():
        if name not in ids:
            continue
        error = store.read_text(name, "error.txt")
        has_result = store.is_file(name, "result.json")
        if error is None and not has_result and not store.is_file(name, "params.json"):
            continue  # not a trial folder (checkpoints, logs, ...)
        results = store.read_jsonl(name, "result.json") if has_result else []
        out.append(TuneTrial(name=name, error=error, results=results))
    return out


def _dig(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def read_experiment(location: str | Path) -> Experiment:
    """Read everything the experiment directory at `location` holds about its trials.

    Raises ExperimentNotFound when it has neither `sweep.json` nor `trials/`.
    """
    store = Store(location)
    sweep = store.read_json("sweep.json")
    sweep = sweep if isinstance(sweep, dict) else {}
    # Hidden folders are scratch space (temporary files of a writer), never trials.
    trial_dirs = [d for d in store.list_dirs("trials") if not d.startswith(".")]
    if not sweep and not trial_dirs:
        raise ExperimentNotFound(f"{store.location}: no sweep.json and no trials/ folder")

    listed: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for entry in sweep.get("trials") or []:
        if isinstance(entry, dict) and isinstance(entry.get("trial_id"), str):
            axes = entry.get("axes") if isinstance(entry.get("axes"), dict) else {}
            config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
            listed.setdefault(entry["trial_id"], (axes, config))
    # Folders of trials the sweep.json does not list (an older grid, or no sweep.json).
    for tid in trial_dirs:
        listed.setdefault(tid, ({}, {}))

    folders = set(trial_dirs)
    trials: dict[str, TrialRecord] = {}
    for tid, (axes, config) in listed.items():
        has_folder = tid in folders
        if has_folder:
            status = store.read_json("trials", tid, "status.json")
            if isinstance(status, dict) and status.get("status") == SUPERSEDED:
                continue
            disk_config = store.read_json("trials", tid, "config.json")
            if not config and isinstance(disk_config, dict):
                config = disk_config
            history = store.read_jsonl("trials", tid, "history.jsonl")
            per_class = store.read_jsonl("trials", tid, "per_class.jsonl")
        else:
            status, history, per_class = None, [], []
        if not axes and isinstance(config.get("axes"), dict):
            axes = config["axes"]
        trials[tid] = TrialRecord(
            trial_id=tid,
            axes=dict(axes),
            config=config,
            status_file=status if isinstance(status, dict) else {},
            history=history,
            per_class=per_class,
            has_folder=has_folder,
        )

    for tune in _read_tune_folders(store, trials):
        trials[tune.name].tune.append(tune)

    axes_doc = sweep.get("axes")
    sampled: dict[str, dict[str, Any]] = {}
    if isinstance(axes_doc, dict) and axes_doc:
        axes = {}
        for k, v in axes_doc.items():
            try:  # a distribution ({kind: args}): its values are the trials'
                dist = search.Distribution.parse(v) if isinstance(v, dict) else None
            except ValueError:
                dist = None
            if dist is not None and dist.continuous:
                sampled[k] = dist.doc()
            axes[k] = list(v) if isinstance(v, list) else \
                list(dist.args) if dist is not None and not dist.continuous else []
    else:
        axes = {}
        for rec in trials.values():
            for k, v in rec.axes.items():
                if v not in axes.setdefault(k, []):
                    axes[k].append(v)
    for name in NAMED_AXES:  # the named axes always have a column, even if unknown
        axes.setdefault(name, [])
    ordered = {k: axes[k] for k in NAMED_AXES}
    ordered.update({k: v for k, v in axes.items() if k not in NAMED_AXES})

    return Experiment(
        store=store,
        name=_str(sweep.get("name")),
        fingerprint=_str(sweep.get("fingerprint")),
        created_at=_str(sweep.get("created_at")),
        axes=ordered,
        trials=list(trials.values()),
        sampled=sampled,
    )


# --------------------------------------------------------------------------- tables


def _history_rows(rec: TrialRecord) -> list[dict[str, Any]]:
    """The trial's reports, ours first; Tune's result.json only when we have none."""
    if rec.history:
        return rec.history
    tune = rec.tune_primary
    if tune is None:
        return []
    return [r for r in tune.results if any(k in r for k in HISTORY_KEYS)]


def _by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Stable: rows of one step keep their file order; rows without a step go last.
    def key(item: tuple[int, dict[str, Any]]) -> tuple[int, int, int]:
        step = _int(item[1].get("step"))
        return (step is None, step if step is not None else 0, item[0])

    return [r for _, r in sorted(enumerate(rows), key=key)]


def _last(rows: list[dict[str, Any]], key: str, conv: Any = _float) -> Any:
    for row in reversed(rows):
        v = conv(row.get(key))
        if v is not None:
            return v
    return None


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [v for r in rows if (v := _float(r.get(key))) is not None]
    return sum(values) / len(values) if values else None


def _max(rows: list[dict[str, Any]], key: str, conv: Any = _float) -> Any:
    vals = [v for v in (conv(r.get(key)) for r in rows) if v is not None]
    return max(vals) if vals else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _axis_value(rec: TrialRecord, axis: str) -> Any:
    if axis in NAMED_AXES:
        v = rec.config.get(axis)
        return v if v is not None else rec.axes.get(axis)
    v = rec.axes.get(axis)
    return v if v is not None else _dig(rec.config, axis)


def _budget(train: Mapping[str, Any]) -> tuple[str | None, int | None]:
    budget = train.get("budget")
    if isinstance(budget, Mapping):
        for kind in ("epochs", "steps", "samples"):
            if budget.get(kind) is not None:
                return kind, _int(budget[kind])
    if train.get("epochs") is not None:
        return "epochs", _int(train["epochs"])
    # TrainSpec.resolved_budget: neither given means one epoch.
    return ("epochs", 1) if train else (None, None)


def device_hours(
    wall_time_s: Any, status: Mapping[str, Any], scaling: Mapping[str, Any]
) -> float | None:
    """Device-hours a trial took: workers x devices per worker x wall time.

    Workers are `status.json`'s `world_size` (what ran), else `scaling.num_workers`. A
    worker on a GPU (status `device` `cuda...`, else `scaling.use_gpu`) counts its
    `resources_per_worker.GPU` share (1 by default); on the CPU, its
    `resources_per_worker.CPU` (1 by default: Ray reserves 0.99 so that the trial's
    driver fits, but the worker occupies a core). None without a wall time.
    """
    wall = _float(wall_time_s)
    workers = _first(_int(status.get("world_size")), _int(scaling.get("num_workers")))
    if wall is None or workers is None:
        return None
    device = status.get("device")
    gpu = device.startswith("cuda") if isinstance(device, str) else _bool(scaling.get("use_gpu"))
    per_worker = scaling.get("resources_per_worker")
    per_worker = per_worker if isinstance(per_worker, Mapping) else {}
    share = _float(per_worker.get("GPU" if gpu else "CPU"))
    return workers * (share if share else 1.0) * wall / 3600.0


def _peft_columns(peft: Any) -> dict[str, Any]:
    """The LoRA settings of a trial's resolved `peft` (all null for full fine-tuning):
    targets as the spec names them (a preset, or module names joined with `,`)."""
    peft = peft if isinstance(peft, dict) else {}

    def joined(v: Any) -> Any:
        return ",".join(map(str, v)) if isinstance(v, list) else v

    return {"peft_method": peft.get("method"), "lora_r": peft.get("r"),
            "lora_alpha": peft.get("alpha"), "lora_dropout": peft.get("dropout"),
            "lora_targets": joined(peft.get("target_modules")),
            "lora_towers": joined(peft.get("towers"))}


def _trial_row(rec: TrialRecord, exp: Experiment) -> dict[str, Any]:
    cfg = rec.config
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    scaling = cfg.get("scaling") if isinstance(cfg.get("scaling"), dict) else {}
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    st = rec.status_file
    rows = _by_step(_history_rows(rec))
    wall_time_s = _first(_float(st.get("wall_time_s")), _last(rows, "time_s"))

    zero_shot = next(
        (
            v
            for r in rows
            if _int(r.get("step")) == 0 and (v := _float(r.get("val_top1"))) is not None
        ),
        _float(st.get("zero_shot_top1")),
    )

    best, best_step = _float(st.get("best_val_top1")), _int(st.get("best_step"))
    if best is None:
        # The best checkpoint is chosen among trained evaluations; step 0 is the baseline.
        scored = [
            (v, step)
            for r in rows
            if (step := _int(r.get("step"))) is not None
            and step > 0
            and (v := _float(r.get("val_top1"))) is not None
        ]
        if scored:
            best = max(v for v, _ in scored)
            best_step = next(s for v, s in scored if v == best)

    train_classes = st.get("train_classes")
    eval_classes = st.get("eval_classes")
    budget_kind, budget_value = _budget(train)
    trust = _bool(st.get("trust_remote_code"))
    tune = rec.tune_primary

    row: dict[str, Any] = {
        "trial_id": rec.trial_id,
        "experiment": _first(cfg.get("experiment"), exp.name),
        "loss": cfg.get("loss"),
        "freeze_vision": cfg.get("freeze_vision"),
        "lr": train.get("lr"),
        "lr_text": train.get("lr_text"),
        "lr_vision": train.get("lr_vision"),
        "lr_logit": train.get("lr_logit"),
        "weight_decay": train.get("weight_decay"),
        "warmup_steps": train.get("warmup_steps"),
        "schedule": train.get("schedule"),
        "max_grad_norm": train.get("max_grad_norm"),
        "budget_kind": budget_kind,
        "budget_value": budget_value,
        # What it ran in (status.json): `auto` resolves per device.
        "precision": _first(st.get("precision"), train.get("precision")),
        "same_class_pairs": train.get("same_class_pairs"),
        "micro_batch_size": train.get("micro_batch_size"),
        "gradient_checkpointing": train.get("gradient_checkpointing"),
        **_peft_columns(cfg.get("peft")),
        "trainable_params": st.get("trainable_params"),
        "total_params": st.get("total_params"),
        "num_workers": scaling.get("num_workers"),
        "use_gpu": scaling.get("use_gpu"),
        "pretrained": model.get("pretrained"),
        "synthetic_data": (
            (data.get("synthetic") is not None) if "synthetic" in data or "root" in data else None
        ),
        # What the trial ran with, when it says so; else what the spec asked for.
        "trust_remote_code": trust if trust is not None else model.get("trust_remote_code"),
        "status": rec.status,
        "error": rec.error,
        # Stopped by the scheduler (ASHA) before its budget; false for another ending.
        "stopped_early": _bool(st.get("stopped_early")) or (False if rec.status in (
            "terminated", "diverged", "errored") else None),
        "zero_shot_top1": zero_shot,
        "best_val_top1": best,
        "best_step": best_step,
        "train_classes": (
            ",".join(str(c) for c in train_classes) if isinstance(train_classes, list) else None
        ),
        "n_eval_classes": len(eval_classes) if isinstance(eval_classes, list) else None,
        # The worker records these in status.json when it ends; until then, the history.
        "samples_seen": _first(_int(st.get("samples_seen")), _max(rows, "samples_seen", _int)),
        "steps": _first(_int(st.get("steps")), _max(rows, "step", _int)),
        "total_steps": st.get("total_steps"),
        "epochs": _first(_float(st.get("epochs")), _max(rows, "epoch")),
        "wall_time_s": wall_time_s,
        "device_hours": device_hours(wall_time_s, st, scaling),
        "skipped_images": _first(
            _int(st.get("skipped_images")), _last(rows, "skipped_images", _int)
        ),
        # The whole trial's share (status.json, when it ended); until then the mean of
        # the reports' shares.
        "data_wait_frac": _first(_float(st.get("data_wait_frac")),
                                 _mean(rows, "data_wait_frac")),
        "restarts": st.get("restarts"),
        "started_at": st.get("started_at"),
        "ended_at": st.get("ended_at"),
        "trial_path": exp.store.display("trials", rec.trial_id),
        "tune_path": exp.store.display(tune.name) if tune is not None else None,
        "config": json.dumps(cfg, sort_keys=True) if cfg else None,
    }
    # "Final" is the last report that carries the metric: a trial may log train loss
    # more often than it evaluates.
    for metric in FINAL_METRICS:
        row[metric] = _last(rows, metric)
    for axis in exp.axes:
        row[axis_column(axis)] = _axis_value(rec, axis)
    return row


def _extra_axis_fields(exp: Experiment) -> list[tuple[str, pa.DataType]]:
    return [
        (axis_column(a), _infer_type(_axis_value(rec, a) for rec in exp.trials))
        for a in exp.extra_axes
    ]


def _metadata(exp: Experiment) -> dict[bytes, bytes]:
    return {
        b"sweeper.analysis.schema": SCHEMA_VERSION.encode(),
        b"sweeper.experiment": (exp.name or "").encode(),
        b"sweeper.fingerprint": (exp.fingerprint or "").encode(),
        b"sweeper.axes": json.dumps(list(exp.axes)).encode(),
        b"sweeper.sampled_axes": json.dumps(
            {axis_column(a): d for a, d in exp.sampled.items()}, sort_keys=True).encode(),
    }


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    cols = {
        f.name: pa.array([_coerce(r.get(f.name), f.type) for r in rows], type=f.type)
        for f in schema
    }
    return pa.Table.from_pydict(cols, schema=schema)


def trials_table(exp: Experiment) -> pa.Table:
    """One row per trial of the sweep, in grid order (then unlisted trials by id)."""
    fields = [*_TRIAL_HEAD, *_extra_axis_fields(exp), *_TRIAL_TAIL]
    schema = pa.schema(fields, metadata=_metadata(exp))
    return _table([_trial_row(rec, exp) for rec in exp.trials], schema)


def history_table(exp: Experiment) -> pa.Table:
    """One row per report per trial, trials in grid order, reports by step."""
    fields = [("trial_id", pa.string())]
    fields += [(a, _AXIS_TYPES[a]) for a in NAMED_AXES]
    fields += _extra_axis_fields(exp)
    fields += [(k, pa.int64() if k in _INT_HISTORY else pa.float64()) for k in HISTORY_COLUMNS]
    schema = pa.schema(fields, metadata=_metadata(exp))
    rows = []
    for rec in exp.trials:
        axes = {axis_column(a): _axis_value(rec, a) for a in exp.axes}
        for r in _by_step(_history_rows(rec)):
            rows.append({"trial_id": rec.trial_id, **axes,
                         **{k: r.get(k) for k in HISTORY_COLUMNS}})
    return _table(rows, schema)


def per_class_table(exp: Experiment) -> pa.Table | None:
    """Per-class val accuracy at each evaluation, or None when no trial saved any."""
    rows = []
    for rec in exp.trials:
        train_classes = rec.status_file.get("train_classes")
        seen = {str(c) for c in train_classes} if isinstance(train_classes, list) else None
        evals = sorted(
            enumerate(rec.per_class),
            key=lambda item: (_int(item[1].get("step")) is None, _int(item[1].get("step")) or 0),
        )
        for _, ev in evals:
            acc = ev.get("accuracy")
            if not isinstance(acc, dict):
                continue
            for wnid in sorted(acc, key=str):
                rows.append(
                    {
                        "trial_id": rec.trial_id,
                        "step": ev.get("step"),
                        "wnid": str(wnid),
                        "accuracy": acc[wnid],
                        "seen": (str(wnid) in seen) if seen is not None else None,
                    }
                )
    if not rows:
        return None
    return _table(rows, PER_CLASS_SCHEMA.with_metadata(_metadata(exp)))
