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
skipped on read) or replaced atomically (temporary file, fsync, `os.replace`). On an
object store (`storage: s3://...`) the same layout holds whole objects: a trial appends to
its node-local copy and uploads the file whole after each change (`TrialSink`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sweeper.storage import (  # noqa: F401 (the file primitives' historical home)
    Location,
    atomic_write_bytes,
    atomic_write_json,
    clean_json,
    json_bytes,
    parse_json,
    parse_jsonl,
    publish_dir,
    read_json,
    read_jsonl,
)

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
    "data_wait_frac",
    "time_s",
    "skipped_images",
)

class TrialSink:
    """Writer and reader for one trial's folder (`<experiment>/trials/<trial_id>/`).

    On local (or shared) storage the folder is `trial_dir`: lines are appended in place.
    On remote storage (`remote`, the folder in the bucket) `trial_dir` is the node-local
    working copy (None: no copy, as the driver needs none for its status updates): each
    file is read from the bucket on first use, changed locally and uploaded whole after
    every change, so the bucket holds every report the trial made and never half a file;
    status.json is always read from the bucket (the driver updates it too)."""

    def __init__(self, trial_dir: str | Path | None = None,
                 remote: Location | None = None) -> None:
        self.dir = Path(trial_dir) if trial_dir is not None else None
        self.remote = remote if remote is not None and remote.remote else None
        if self.dir is None and self.remote is None:
            raise ValueError("a trial sink needs a local folder or a remote one")
        self._pulled: set[str] = set()

    @classmethod
    def at(cls, location: Location | str | Path) -> TrialSink:
        """The sink of the trial folder `location` (a path, or a Location of either kind)."""
        if isinstance(location, Location):
            return cls(location.local) if not location.remote else cls(None, location)
        return cls(location)

    @property
    def history_path(self) -> Path:
        return self._local("history.jsonl")

    @property
    def per_class_path(self) -> Path:
        return self._local("per_class.jsonl")

    @property
    def status_path(self) -> Path:
        return self._local("status.json")

    def _local(self, name: str) -> Path:
        if self.dir is None:
            raise ValueError(f"{self.remote}: this sink keeps no local copy")
        return self.dir / name

    def _pull(self, name: str) -> None:
        """Make the local copy of `name` the bucket's (once per sink: from then on this
        sink is its only writer)."""
        if self.remote is None or self.dir is None or name in self._pulled:
            return
        data = (self.remote / name).read_bytes()
        if data is None:
            self._local(name).unlink(missing_ok=True)
        else:
            atomic_write_bytes(self._local(name), data)
        self._pulled.add(name)

    def read_bytes(self, name: str) -> bytes | None:
        """The file `name` of the trial folder, or None when there is none."""
        if self.remote is not None and (self.dir is None or name == "status.json"):
            return (self.remote / name).read_bytes()
        self._pull(name)
        try:
            return self._local(name).read_bytes()
        except OSError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace the file `name` whole (locally, then in the bucket)."""
        if self.dir is not None:
            atomic_write_bytes(self._local(name), data)
            self._pulled.add(name)
        if self.remote is not None:
            (self.remote / name).write_bytes(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json_bytes(obj))

    def write_config(self, config: dict[str, Any]) -> None:
        self.write_json("config.json", config)

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json (atomically) and return the new status."""
        status = self.status()
        status.update(fields)
        self.write_json("status.json", status)
        return status

    def status(self) -> dict[str, Any]:
        status = parse_json(self.read_bytes("status.json"))
        return status if isinstance(status, dict) else {}

    def _append(self, name: str, row: dict[str, Any]) -> None:
        line = json.dumps(clean_json(row), sort_keys=True) + "\n"
        if self.dir is None:  # remote, no working copy: rewrite the object
            (self.remote / name).write_bytes((self.read_bytes(name) or b"") + line.encode())
            return
        self._pull(name)
        path = self._local(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self.remote is not None:
            (self.remote / name).upload(path)

    def append_history(self, row: dict[str, Any]) -> None:
        self._append("history.jsonl", row)

    def append_per_class(self, step: int, accuracy: dict[str, float]) -> None:
        self._append("per_class.jsonl", {"step": step, "accuracy": accuracy})

    def history(self) -> list[dict[str, Any]]:
        return parse_jsonl((self.read_bytes("history.jsonl") or b"").decode(errors="replace"))

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint at `step`, drop rows reported after it (they will be
        reported again), so the history holds every step exactly once."""
        for name in ("history.jsonl", "per_class.jsonl"):
            data = self.read_bytes(name)
            rows = parse_jsonl((data or b"").decode(errors="replace"))
            kept = [r for r in rows if int(r.get("step", -1)) <= step]
            if len(kept) != len(rows) or data is not None:
                self.write_bytes(name, _lines(kept))

    def publish_dir(self, name: str, marker: str) -> None:
        """Upload the local folder `name` (e.g. final_model/) to the bucket, `marker`
        last; nothing on local storage, where it already is in place."""
        if self.remote is not None and self.dir is not None:
            publish_dir(self._local(name), self.remote / name, marker)


def _lines(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(clean_json(r), sort_keys=True) + "\n" for r in rows).encode()


def trial_dir(experiment_dir: str | Path | Location, trial_id: str) -> Path | Location:
    """Where a trial's own files live inside the experiment directory (a Path, or a
    Location when given one)."""
    if isinstance(experiment_dir, Location):
        return experiment_dir / "trials" / trial_id
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
