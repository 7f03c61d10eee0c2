"""The experiment folder's rules, without Ray: where it is (`storage`), whether a rerun
resumes it or is refused (the spec changed), creating it, and how a sweep ended.

`sink.py` says what a trial leaves on disk; this module says what the experiment as a
whole may be. The orchestration and `--dry-run` call the same functions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import search
from sweeper.sink import TrialSink, trial_dir
from sweeper.spec import SpecError, SweepSpec, spec_fingerprint
from sweeper.storage import Location, check_remote, resolve
from sweeper.trials import trial_configs

FINISHED = ("terminated", "diverged")
# A sampled trial whose proposal Tune lost (it was made after Tune's last save of the
# experiment state, then the driver was killed): the searcher proposed another in its place.
SUPERSEDED = "superseded"

# Keys of the spec that say where and how fast trials run, not what they compute: an
# existing experiment resumes when only these changed.
RESOURCE_KEYS = (
    "storage",
    "storage_filesystem",
    "loggers",
    "scaling.resources_per_worker",
    "scaling.placement_strategy",
    "scaling.max_concurrent_trials",
    "scaling.max_failures",
    "scaling.worker_start_timeout_s",
    "checkpoint.upload",
    "tune.reuse_actors",
)


def storage_location(spec: SweepSpec) -> Location:
    """`storage` (and `storage_filesystem`) as a Location: a local path or a bucket."""
    return resolve(spec.storage, spec.storage_filesystem)


# Filesystem types whose writes cross a network (a mount's type in /proc/mounts; any
# `fuse.*` type too: the FUSE mounts of buckets).
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph",
                       "glusterfs", "wekafs", "9p", "fuse")


def storage_is_remote(storage: str, mounts: str | None = None) -> bool:
    """Whether writes to `storage` cross a network: an object-store URI, or a path whose
    filesystem (the longest mount point above it in `mounts`, /proc/mounts' text) is a
    network or FUSE one."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage) and not storage.startswith("file://"):
        return True
    path = os.path.realpath(Path(storage.removeprefix("file://")).expanduser())
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
    best, fstype = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, fstype = point, parts[2]
    return fstype.split(".")[0] in NETWORK_FILESYSTEMS


def check_storage(storage: str, filesystem: dict[str, Any] | None = None) -> Location:
    """`storage` as a Location that can be a folder of ours. A local path: an existing
    directory we may write to, or a path whose nearest existing ancestor is one. A bucket:
    reachable, with credentials that may write there (`storage.check_remote`)."""
    root = resolve(storage, filesystem)
    if root.remote:
        check_remote(root, storage)
        return root
    path = probe = Path(root.fs_path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise SpecError(f"storage: {storage!r} exists and is not a directory")
    if not probe.is_dir():
        raise SpecError(f"storage: {storage!r}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SpecError(f"storage: {storage!r}: {probe} is not writable by this user")
    return root


@dataclass
class SweepResult:
    """How a sweep ended, for the CLI's exit status and summary."""

    experiment_dir: Location
    statuses: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    stopped_early: list[str] = field(default_factory=list)
    interrupted: bool = False
    signal_number: int = signal.SIGINT  # which signal interrupted the sweep
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 every trial terminated or diverged, 1 some did not, 128 + the signal when
        interrupted (130 Ctrl-C, 143 SIGTERM)."""
        if self.interrupted:
            return 128 + int(self.signal_number)
        return 1 if self.errors else 0


def experiment_dir(spec: SweepSpec) -> Location:
    """`<storage>/<name>` (a local path made absolute, as Tune needs, or a bucket folder)."""
    return storage_location(spec) / spec.name


def _spec_doc(spec: SweepSpec | dict[str, Any]) -> dict[str, Any]:
    doc = spec.model_dump(mode="json") if isinstance(spec, SweepSpec) else json.loads(
        json.dumps(spec))
    for key in RESOURCE_KEYS:
        node, *rest = key.split(".")
        if rest:
            doc.get(node, {}).pop(rest[0], None)
        else:
            doc.pop(node, None)
    doc.pop("name", None)
    return doc


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            d = _first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if old != new:
        return f"{path or '<root>'}: {json.dumps(old)[:60]} -> {json.dumps(new)[:60]}"
    return None


def spec_change(old_sweep: dict[str, Any], spec: SweepSpec) -> str | None:
    """None when `spec` computes the same trials as the experiment of `old_sweep`
    (sweep.json), else the first differing key path (`train.lr: 0.001 -> 0.0003`).
    Resource keys (RESOURCE_KEYS) may change: they say where trials run, not what they do."""
    if old_sweep.get("fingerprint") == spec_fingerprint(spec):
        return None
    old_spec = old_sweep.get("spec")
    if not isinstance(old_spec, dict):
        return "fingerprint differs"
    try:  # keys added to the spec since, at their defaults, are no change
        old_doc = _spec_doc(SweepSpec.model_validate(old_spec))
    except Exception:
        old_doc = _spec_doc(old_spec)
    return _first_difference(old_doc, _spec_doc(spec))


def plan_experiment(spec: SweepSpec, new: bool = False, resume: bool = False) -> SweepSpec:
    """The spec of the experiment a run would open, refusing what it would refuse; reads,
    never writes (a dry run calls it too).

    An existing experiment of a different spec is refused naming the first changed key,
    unless `new`: then the new one gets a suffixed name (`name-2`, `name-3`, ...). With
    `resume` the experiment must exist. Changes to resource keys only (RESOURCE_KEYS)
    reopen the experiment as it is. A folder that exists but is not an experiment of ours
    (no sweep.json, not empty) is refused: we never write into someone else's folder."""
    base = spec.name
    k = 1
    while True:
        exp = experiment_dir(spec)
        old = (exp / "sweep.json").read_json()
        change = spec_change(old, spec) if isinstance(old, dict) else None
        if old is None or change is None:
            break
        if not new:
            raise SpecError(
                f"name: experiment {exp} exists with a different spec ({change}); pass --new "
                "to start another beside it, or another --name")
        k += 1
        spec = spec.model_copy(update={"name": f"{base}-{k}"})
    if resume and old is None:
        raise SpecError(f"name: no experiment {exp} to resume (drop --resume to start it)")
    if old is None and exp.exists():
        if not exp.is_dir():
            raise SpecError(f"name: {exp} exists and is not a directory")
        if any(name != "sweep.json" for name in exp.children()) \
                and not (exp / "trials").is_dir():
            raise SpecError(f"name: {exp} exists and is not a sweeper experiment (no "
                            "sweep.json); choose another --name or storage")
    return spec


def create_experiment(spec: SweepSpec, spec_text: str | None = None) -> Location:
    """Create the experiment folder of a planned spec (`plan_experiment`) and its
    sweep.json and spec.yaml, unless they exist; returns the folder."""
    exp = experiment_dir(spec)
    exp.mkdir()
    if (exp / "sweep.json").read_json() is None:
        trials = trial_configs(spec)  # none listed for a sampling search
        (exp / "sweep.json").write_json({
            "name": spec.name,
            "fingerprint": spec_fingerprint(spec),
            "spec": spec.model_dump(mode="json"),
            "axes": {k: v if isinstance(v, list) else v.doc()
                     for k, v in search.axes(spec).items()},
            "search": {"algorithm": spec.tune.search, "num_samples": search.num_samples(spec),
                       "seed": spec.tune.search_seed, "trials": search.n_trials(spec)},
            "trials": [{"trial_id": t.trial_id, "axes": t.axes,
                        "config": t.model_dump(mode="json")} for t in trials],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if spec_text is not None:
            (exp / "spec.yaml").write_bytes(spec_text.encode())
    return exp


def prepare_experiment(spec: SweepSpec, spec_text: str | None, new: bool,
                       resume: bool = False) -> SweepSpec:
    """`plan_experiment`, then `create_experiment`: create or reopen the folder."""
    spec = plan_experiment(spec, new, resume)
    create_experiment(spec, spec_text)
    return spec


def trial_names(spec: SweepSpec, exp: Location) -> list[str]:
    """The trials of the experiment: every grid point's, or for a sampling search the
    folders of the trials its searcher proposed so far (superseded ones left out)."""
    known = search.points(spec)
    if known is not None:
        return [search.trial_name(p) for p in known]
    names = [n for n in (exp / "trials").children() if not n.startswith(".")]
    return [n for n in names
            if TrialSink.at(trial_dir(exp, n)).status().get("status") != SUPERSEDED]


def supersede_lost(exp: Location, trial_id: str) -> list[str]:
    """Mark superseded the unfinished trials of the same proposal index as `trial_id` under
    another name: proposals of a killed run that Tune's saved state did not hold, which the
    restored searcher replaced. Their folders stay; returns their names."""
    index = search.proposal_index(trial_id)
    if index is None:
        return []
    out = []
    for name in (exp / "trials").children():
        if name == trial_id or name.startswith(".") or search.proposal_index(name) != index:
            continue
        sink = TrialSink.at(trial_dir(exp, name))
        if sink.status().get("status") not in (*FINISHED, SUPERSEDED):
            sink.update_status(status=SUPERSEDED, superseded_by=trial_id,
                               ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            out.append(name)
    return out


def reset_errored(spec: SweepSpec, exp: Location) -> None:
    """Set the errored trials of the experiment back to pending (`--retry-errored`)."""
    for tid in trial_names(spec, exp):
        s = TrialSink.at(trial_dir(exp, tid))
        if s.status().get("status") == "errored":
            s.update_status(status="pending", error=None, error_detail=None)


def collect(spec: SweepSpec, result: SweepResult) -> None:
    """Fill `result` with every trial's status and the first line of each error."""
    for tid in trial_names(spec, result.experiment_dir):
        st = TrialSink.at(trial_dir(result.experiment_dir, tid)).status()
        status = st.get("status") or "pending"
        result.statuses[tid] = status
        if status == "errored":
            result.errors[tid] = str(st.get("error") or "").splitlines()[0][:300] \
                if st.get("error") else "errored"
        elif status not in FINISHED and not result.interrupted:
            result.errors[tid] = f"did not finish (status {status})"
