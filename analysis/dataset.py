"""The Parquet files of an experiment: writing them atomically and reproducibly, loading them.

A file is serialised in memory first and then handed to `sweeper.sink.atomic_write_bytes`
(temporary file, fsync, `os.replace`), so a reader sees the previous file or the new one,
never a torn one. The writer options are pinned and no wall-clock time goes into the data,
so running the analysis twice over the same experiment gives byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.collect import (
    Experiment,
    history_table,
    per_class_table,
    read_experiment,
    trials_table,
)
from analysis.store import Store, location_of
from sweeper.sink import atomic_write_bytes
from sweeper.storage import mirror_dir

TRIALS_FILE = "trials.parquet"
HISTORY_FILE = "history.parquet"
PER_CLASS_FILE = "per_class.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    """`table` as Parquet bytes, with writer options fixed so the bytes are reproducible."""
    buf = pa.BufferOutputStream()
    pq.write_table(
        table,
        buf,
        version="2.6",
        data_page_version="1.0",
        compression="zstd",
        compression_level=3,
        use_dictionary=True,
        write_statistics=True,
        row_group_size=1 << 20,
        store_schema=True,
    )
    return buf.getvalue().to_pybytes()


def write_parquet_file(path: str | Path, table: pa.Table) -> Path:
    """Atomically replace `path` with `table` as Parquet; returns the path."""
    path = Path(path)
    atomic_write_bytes(path, parquet_bytes(table))
    return path


def output_dir(experiment_dir: str | Path, out_dir: str | Path | None) -> Path:
    """Where the analysis writes: `out_dir`; else the experiment directory itself, or, for
    an experiment in a bucket (`s3://...`), its node-local copy
    (`sweeper.storage.mirror_dir`), which `publish` then uploads next to the experiment."""
    if out_dir is not None:
        return Path(out_dir).expanduser().resolve()
    return mirror_dir(location_of(experiment_dir))


def publish(experiment_dir: str | Path, out_dir: str | Path | None,
            paths: dict[str, Path]) -> dict[str, Path]:
    """Upload the outputs `paths` (files, and the plots folder) of a bucket experiment,
    written to its local copy (`output_dir` without `out_dir`), into the experiment, each
    as one whole object; plots of an earlier report that this one no longer draws are
    removed there too. Nothing for a local experiment or an explicit `out_dir`. Returns
    `paths`."""
    loc = location_of(experiment_dir)
    if out_dir is not None or not loc.remote:
        return paths
    local = output_dir(experiment_dir, None)
    for path in paths.values():
        if path.is_file():
            (loc / path.relative_to(local).as_posix()).upload(path)
        elif path.is_dir():
            remote = loc / path.relative_to(local).as_posix()
            names = {p.name for p in path.iterdir() if p.is_file()}
            for p in sorted(path.iterdir()):
                if p.is_file():
                    (remote / p.name).upload(p)
            for name in remote.children():
                if name not in names and name.endswith(".png"):
                    (remote / name).delete()
    return paths


def output_lines(experiment_dir: str | Path, out_dir: str | Path | None,
                 paths: dict[str, Path]) -> list[str]:
    """`key: where` for each output, as the CLIs print them: the local path, or for a
    bucket experiment the object's URI and its local copy."""
    loc = location_of(experiment_dir)
    if out_dir is not None or not loc.remote:
        return [f"{key}: {path}" for key, path in paths.items()]
    local = output_dir(experiment_dir, None)
    return [f"{key}: {loc / path.relative_to(local).as_posix()} (local copy: {path})"
            for key, path in paths.items()]


def write_tables(exp: Experiment, out: Path) -> tuple[dict[str, Path], dict[str, pa.Table]]:
    """Write trials, history and (when any trial saved it) per-class Parquet into `out`."""
    tables: dict[str, pa.Table] = {
        "trials": trials_table(exp),
        "history": history_table(exp),
    }
    per_class = per_class_table(exp)
    if per_class is not None:
        tables["per_class"] = per_class
    names = {"trials": TRIALS_FILE, "history": HISTORY_FILE, "per_class": PER_CLASS_FILE}
    paths = {key: write_parquet_file(out / names[key], t) for key, t in tables.items()}
    return paths, tables


def write_parquet(experiment_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Build and write the Parquet files only (no report, no plots); returns their paths."""
    exp = read_experiment(experiment_dir)
    paths, _ = write_tables(exp, output_dir(experiment_dir, out_dir))
    return publish(experiment_dir, out_dir, paths)


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """The table as a DataFrame; `attrs["sampled_axes"]` holds the columns of the axes a
    sampling search drew from a range, {column: {kind: args}} (from the schema's
    `sweeper.sampled_axes`), which the tables list as values instead of grouping by."""
    frame = table.to_pandas()
    raw = (table.schema.metadata or {}).get(b"sweeper.sampled_axes")
    try:
        sampled = json.loads(raw) if raw else {}
    except ValueError:
        sampled = {}
    frame.attrs["sampled_axes"] = sampled if isinstance(sampled, dict) else {}
    return frame



def load(path: str | Path, *, refresh: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The experiment's (trials, history) as pandas DataFrames.

    Reads `trials.parquet` and `history.parquet` from `path` when both are there (this
    also works for an `--out` folder that holds only them), else builds them from the
    experiment directory and writes them there first. `refresh=True` rebuilds them, e.g.
    while the sweep is still running. A URI is never written to: without its Parquet
    files, the tables are built in memory.
    """
    store = Store(path)
    if not refresh:
        trials = store.read_parquet(TRIALS_FILE)
        history = store.read_parquet(HISTORY_FILE)
        if trials is not None and history is not None:
            return to_pandas(trials), to_pandas(history)
    exp = read_experiment(path)
    if store.uri:
        return to_pandas(trials_table(exp)), to_pandas(history_table(exp))
    _, tables = write_tables(exp, output_dir(path, None))
    return to_pandas(tables["trials"]), to_pandas(tables["history"])


def load_per_class(path: str | Path) -> pd.DataFrame | None:
    """The experiment's per-class accuracies, or None when no trial saved them.

    Reads `per_class.parquet` when present, else builds it in memory (nothing is written).
    """
    store = Store(path)
    table = store.read_parquet(PER_CLASS_FILE)
    if table is None:
        table = per_class_table(read_experiment(path))
    return to_pandas(table) if table is not None else None
