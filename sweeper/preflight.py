"""The one validator of a run: everything a sweep refuses before its first trial, in the
order a run checks it, shared by `--dry-run` and a real run.

`load_spec` has already refused what the spec alone says is wrong (`sweeper.spec`); this
adds what needs the machine, never Ray: the storage, the loggers' packages, resources (a
local run: this machine's CPUs and GPUs; a cluster run is checked again after joining),
the dataset's layout, the model's presence, and the experiment folder (a changed spec, a
folder that is not ours). It reads and never writes (but for one probe object, deleted
again, that proves a bucket takes our writes): a dry run leaves no trace, and a refused
run loses nothing already written. Every refusal is one line naming the key or
file (`SpecError`, `DataError`, `ModelError`).
"""

from __future__ import annotations

import importlib.util
import os

from sweeper import data as D
from sweeper.experiment import check_storage, plan_experiment
from sweeper.models import check_loadable
from sweeper.resources import check_fits, local_nodes
from sweeper.spec import SpecError, SweepSpec
from sweeper.trials import sweep_models

# The package each logger of `loggers` needs, as Ray's callbacks import it.
LOGGER_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def cluster_address(address: str | None) -> str | None:
    """The cluster to join (`--address`, else RAY_ADDRESS), or None for a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def check_loggers(spec: SweepSpec) -> None:
    """Refuse a logger whose package is not installed."""
    for i, name in enumerate(spec.loggers):
        pkg = LOGGER_PACKAGES.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise SpecError(f"loggers[{i}]: {name} needs the {pkg!r} package, which is not "
                            f"installed (pip install {pkg}), or remove it from loggers")


def check_data(spec: SweepSpec) -> None:
    """Refuse a real dataset whose layout, class names, captions or class lists are bad,
    or that has fewer classes than a grid point trains on (synthetic data is checked by
    the spec itself)."""
    if spec.data.synthetic is not None:
        return
    train, _ = D.check_dataset(spec.data, spec.grid.n_train_classes, spec.grid.text_source)
    for i, k in enumerate(spec.grid.n_train_classes):
        if k > len(train.wnids):
            raise SpecError(f"grid.n_train_classes[{i}]: {k} exceeds the dataset's "
                            f"{len(train.wnids)} classes")


def preflight(spec: SweepSpec, address: str | None = None, *, new: bool = False,
              resume: bool = False) -> SweepSpec:
    """Every check a run makes before its first trial; returns the spec of the experiment
    it would open (renamed `name-2`, ... with `new` when the spec changed). Cheap checks
    first: no data is scanned for a sweep that cannot run."""
    check_storage(spec.storage, spec.storage_filesystem)
    check_loggers(spec)
    if cluster_address(address) is None:
        check_fits(spec, local_nodes())
    spec = plan_experiment(spec, new, resume)
    check_data(spec)
    for model in sweep_models(spec):
        check_loadable(model)
    return spec
