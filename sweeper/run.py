"""Command line: `python -m sweeper.run SPEC.yaml [--dry-run] [--set key=value ...]`.

Exit status: 0 every trial terminated or diverged; 1 some trial errored (or did not finish);
2 the spec, the data or the cluster was refused (before any trial ran); 130 interrupted by
Ctrl-C, 143 by SIGTERM (the experiment state is saved, so rerunning the same command
resumes it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sweeper import search
from sweeper.spec import SpecError, SweepSpec, load_spec
from sweeper.storage import Location
from sweeper.trials import trial_configs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeper.run", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="search-space YAML file")
    p.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or host:port; default: RAY_ADDRESS, "
                        "else start a local Ray)")
    p.add_argument("--storage", default=None,
                   help="override `storage` (a local path, on a cluster a shared one, or a "
                        "bucket URI: s3://bucket/prefix, gs://...)")
    p.add_argument("--name", default=None, help="override the experiment `name`")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY.PATH=VALUE", help="override a spec key (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an existing experiment, refusing to start a new one "
                        "(rerunning without it resumes too)")
    p.add_argument("--retry-errored", action="store_true", help="rerun errored trials")
    p.add_argument("--new", action="store_true",
                   help="start a new experiment (suffixed name) if the spec changed")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface the local dashboard binds to (default loopback only)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print everything Ray, Tune and transformers say (default: their "
                        "known-harmless messages are dropped)")
    p.add_argument("--cache-dir", default=None,
                   help="where the tiny model, synthetic data and the node-local copy of a "
                        "bucket storage are kept (default: $SWEEPER_CACHE or "
                        "~/.cache/sweeper)")
    return p


def dry_run_table(spec: SweepSpec) -> str:
    """A plain-text table of every trial the sweep would run; for a sampling search, what
    it draws from (its trials are proposed as the sweep runs)."""
    if not search.known_up_front(spec):
        return "\n".join([*search.describe(spec),
                          f"{spec.scaling.num_workers} worker(s) per trial, at most "
                          f"{spec.scaling.max_concurrent_trials} at once"])
    trials = trial_configs(spec)
    cols = ["trial_id", "variant", "loss", "freeze_vision",
            *(k for k in search.NAMED_AXES if k != "variant")]
    rows = [[str(getattr(t, c)) for c in cols] for t in trials]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    out.append(f"{len(trials)} trials, {spec.scaling.num_workers} worker(s) each, "
               f"at most {spec.scaling.max_concurrent_trials} at once")
    return "\n".join(out)


def write_report(experiment_dir: Location) -> list[str]:
    """Write the experiment's Parquet files, report.md and plots (`analysis.report`; for
    a bucket, to its node-local copy, then uploaded); returns the `key: where` lines to
    print. A failure is logged, never fatal: the trials' results stay where they are."""
    try:
        from analysis.dataset import output_lines
        from analysis.report import write_report as write

        return output_lines(experiment_dir, None, write(experiment_dir))
    except Exception as e:
        logging.getLogger("sweeper").error("report failed: %s", e)
        return []


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before or after the Tune loop, which handles its own
        print("\nInterrupted: rerun the same command to resume.", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.verbose:
        from sweeper.console import quiet_process

        quiet_process()
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' "Writing model shards"
    if args.cache_dir:
        # One cache for everything of this run that defaults to it (the report's local
        # copy of a bucket experiment too), in this process and the local Ray it starts.
        os.environ["SWEEPER_CACHE"] = str(Path(args.cache_dir).expanduser().resolve())
    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"storage={args.storage}")
    if args.name:
        overrides.append(f"name={args.name}")
    try:
        spec = load_spec(args.spec, overrides)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sweeper import data as D
    from sweeper.models import ModelError
    from sweeper.preflight import preflight

    try:
        # The same checks for a dry run and a run: what one refuses, so does the other.
        spec = preflight(spec, args.address, new=args.new, resume=args.resume)
    except (SpecError, D.DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dry_run_table(spec))
        return 0
    from sweeper.experiment import create_experiment
    from sweeper.orchestration import run_sweep
    from sweeper.prepare import prepare_inputs

    try:
        model_paths = prepare_inputs(spec, args.cache_dir)
    except (SpecError, D.DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    create_experiment(spec, Path(args.spec).read_text(encoding="utf-8"))
    try:
        result = run_sweep(spec, address=args.address, retry_errored=args.retry_errored,
                           cache_dir=args.cache_dir, dashboard_host=args.dashboard_host,
                           model_paths=model_paths, verbose=2 if args.verbose else 1)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report_lines = write_report(result.experiment_dir)
    counts: dict[str, int] = {}
    for s in result.statuses.values():
        counts[s] = counts.get(s, 0) + 1
    print(f"\nExperiment: {result.experiment_dir}")
    print("Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + (f" ({len(result.stopped_early)} stopped early by the scheduler)"
             if result.stopped_early else ""))
    for tid, err in result.errors.items():
        print(f"  errored {tid}: {err}")
    for line in report_lines:
        print(line)
    if result.interrupted:
        print("Interrupted: the experiment state is saved; rerun the same command to resume.")
    elif result.errors:
        print("Rerun with --retry-errored to train the errored trials again.")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
