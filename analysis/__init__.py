"""Analysis of a sweep's experiment directory: Parquet tables, report.md, plots.

    trials, history = analysis.load("results/my-sweep")   # pandas DataFrames
    analysis.write_report("results/my-sweep")             # Parquet + report.md + plots/

Column meanings and dtypes are in `analysis/SCHEMA.md`.
"""

from __future__ import annotations

from typing import Any

from analysis.collect import ExperimentNotFound, read_experiment
from analysis.dataset import load, load_per_class, write_parquet

__all__ = [
    "ExperimentNotFound",
    "load",
    "load_per_class",
    "read_experiment",
    "write_parquet",
    "write_report",
]


def __getattr__(name: str) -> Any:
    # Imported lazily: importing analysis.report here would make
    # `python -m analysis.report` warn that the module was already imported.
    if name == "write_report":
        from analysis.report import write_report

        return write_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
