"""The one metrics sink: what a trial leaves on disk, and the atomic writes behind it.

Experiment directory layout (`<storage>/<name>/`)::

    sweep.json                  the resolved spec, its fingerprint and every trial's config
                                (written by the driver before any trial starts)
    spec.yaml                   the search-space file as the user wrote it
    trials/<trial_id>/          one folder per trial, named deterministically from the grid point
        config.json             resolved TrialConfig (written by the driver)
        status.json             {"status": running|terminated|diverged|errored, "error", ...}
        history.jsonl           one JSON object per report (see HISTORY_KEYS)
        per_class.jsonl         one JSON object per evaluation: {"step", "accuracy": {wnid: acc}}
        checkpoint_*/           Ray Train checkpoints (best `checkpoint.keep` by val_top1)
        final_model/            `save_pretrained` output when train.save_final is set
    <Tune's trial folders>      Tune's own params.json / result.json / progress.csv
    trials.parquet, history.parquet, per_class.parquet, report.md, plots/   (analysis)

Rank 0 of a trial writes; every file is either appended line by line (a torn last line is
skipped on read) or replaced atomically (temporary file, fsync, `os.replace`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HISTORY_KEYS = (
    "epoch",
    "step",
    "samples_seen",
    "train_loss",
    "lr",
    "logit_scale",
    "logit_bias",
    "val_top1",
    "val_top5",
    "val_top1_seen",
    "val_top1_unseen",
    "samples_per_s",
    "time_s",
    "skipped_images",
)

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:  # name the file (disk full, quota)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf; store them as null so every reader parses the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any | None:
    """The JSON in `path`, or None when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of `path`; a torn line (a killed writer) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return parse_jsonl(text)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    """Complete JSON object lines of `text`; a torn or foreign line is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class TrialSink:
    """Writer and reader for one trial's folder (`<experiment>/trials/<trial_id>/`)."""

    def __init__(self, trial_dir: str | Path) -> None:
        self.dir = Path(trial_dir)

    @property
    def history_path(self) -> Path:
        return self.dir / "history.jsonl"

    @property
    def per_class_path(self) -> Path:
        return self.dir / "per_class.jsonl"

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.dir / "config.json", config)

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json (atomically) and return the new status."""
        status = read_json(self.status_path) or {}
        status.update(fields)
        atomic_write_json(self.status_path, status)
        return status

    def status(self) -> dict[str, Any]:
        return read_json(self.status_path) or {}

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append_history(self, row: dict[str, Any]) -> None:
        self._append(self.history_path, row)

    def append_per_class(self, step: int, accuracy: dict[str, float]) -> None:
        self._append(self.per_class_path, {"step": step, "accuracy": accuracy})

    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.history_path)

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint at `step`, drop rows reported after it (they will be
        reported again), so the history holds every step exactly once."""
        for path in (self.history_path, self.per_class_path):
            rows = read_jsonl(path)
            kept = [r for r in rows if int(r.get("step", -1)) <= step]
            if len(kept) != len(rows) or path.exists():
                _write_lines(path, kept)


def _write_lines(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    data = "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode())


def trial_dir(experiment_dir: str | Path, trial_id: str) -> Path:
    """Where a trial's own files live inside the experiment directory."""
    return Path(experiment_dir) / "trials" / trial_id


def first_error_line(text: Any) -> str | None:
    """The one line that says what went wrong in an error message or traceback.

    A plain message keeps its first line. A traceback (Python's, or Tune's error.txt,
    which starts with "Failure # 1 (occurred at ...)") keeps its last unindented line:
    that is the exception and its message, where the first line would only say
    "Traceback (most recent call last):".
    """
    if not isinstance(text, str):
        return None if text is None else str(text)
    # Ray colours the actor name in error.txt; the escapes are noise in a table.
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() and not re.match(r"Failure # \d+", ln)]
    if not lines:
        return None
    traceback = any(
        ln.startswith("Traceback (most recent call last)") or ln.lstrip().startswith('File "')
        for ln in lines
    )
    if traceback:
        tail = [ln for ln in lines if not ln[0].isspace() and not ln.startswith("Traceback")]
        if tail:
            return tail[-1].strip()
    return lines[0].strip()
