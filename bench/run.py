"""Run every benchmark in `bench/` and print all their `name: value` lines.

Each benchmark runs as its own process, one after the other (they time themselves, so
nothing else of ours should run beside them), with `--quick` passed through. Their output
streams as it comes; a summary of every `name: value` line follows, prefixed by the
benchmark's name where two would collide. `--json FILE` also writes them as JSON;
`--readme` rewrites the figures table in `bench/README.md` (between its markers).

Run: `python bench/run.py [--quick] [--only siglit_cache,hot_loop] [--json out.json]`.
`python bench/run.py --quick` takes 5 to 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

HERE = Path(__file__).resolve().parent
# (name, script): ours, then the other benchmarks of the repository when present.
BENCHES = [
    ("siglit_cache", "siglit_cache.py"),
    ("image_cache", "image_cache.py"),
    ("hot_loop", "hot_loop.py"),
    ("sweep_overhead", "sweep_overhead.py"),
    ("large_batch", "large_batch.py"),
    ("loader_feed", "loader_feed.py"),
    ("checkpoint_size", "checkpoint_size.py"),
    ("lora", "lora.py"),
    ("processor_parity", "processor_parity.py"),
    ("loss_ring_vs_allgather", "loss_ring_vs_allgather.py"),
    ("data_pipeline", "data_pipeline.py"),
]
# The figures the issue asks for (and what explains them), with their targets, in the
# README table's order: (figure, target, the figure the target is checked on, threshold).
HEADLINE = [
    ("siglit_cache_speedup", ">= 0.9 x bound", "siglit_cache_vs_bound", 0.9),
    ("siglit_cache_bound", "(FLOPs)", None, None),
    ("siglit_cache_vs_bound", ">= 0.9", "siglit_cache_vs_bound", 0.9),
    ("siglit_cache_time_bound", "(measured parts)", None, None),
    ("siglit_cache_vs_time_bound", "about 1", None, None),
    ("siglit_cache_max_metric_diff", "<= 1e-4", None, None),
    ("image_cache_speedup", "> 1", "image_cache_speedup", 1.0),
    ("image_loader_speedup", "> 1", "image_loader_speedup", 1.0),
    ("hot_loop_ratio", ">= 0.95", "hot_loop_ratio", 0.95),
    ("hot_loop_ratio_cached", ">= 0.95", "hot_loop_ratio_cached", 0.95),
    ("loader_images_per_s_per_worker", "(JPEG, per CPU-second)", None, None),
    ("loader_cached_images_per_s_per_worker", "(image cache)", None, None),
    ("loader_workers_needed", "(per bf16 B/16 GPU)", None, None),
    ("ckpt_b16_siglip_written_gb", "(GB per checkpoint)", None, None),
    ("ckpt_so400m_siglip_written_gb", "(GB per checkpoint)", None, None),
    ("parity_max_abs_diff_siglip", "<= 1e-5", None, None),
    ("trial_overhead_s", "(seconds)", None, None),
    ("default_trial_ray_start_s", "(of which Ray)", None, None),
    ("default_trial_worker_setup_s", "(of which worker set-up)", None, None),
    ("default_trial_train_s", "(training per trial)", None, None),
    ("sweep_efficiency", ">= 0.8", "sweep_efficiency", 0.8),
    ("fastpoll_trial_overhead_s", "(seconds)", None, None),
    ("fastpoll_sweep_efficiency", ">= 0.8", "fastpoll_sweep_efficiency", 0.8),
    ("fastpoll_saves_s_per_trial", "(seconds)", None, None),
    ("worker_import_s", "(seconds)", None, None),
    ("large_batch_peak_ratio", "(micro-batched / one pass)", None, None),
    ("large_batch_micro_growth_4x", "about 1", None, None),
    ("large_batch_time_ratio", "<= 1.4", None, None),
    ("large_batch_time_ratio_cpu", "<= 1.4", None, None),
    ("lora_r8_attention_memory_ratio", "(LoRA / full: step peak + AdamW state)", None, None),
    ("lora_r8_attention_time_ratio", "(LoRA / full: time per sample)", None, None),
    ("lora_r8_attention_ckpt_ratio", "(LoRA / full: checkpoint bytes)", None, None),
    ("lora_b16_r8_attention_ckpt_mb", "(MB per SigLIP-B/16 checkpoint)", None, None),
]
LINE = re.compile(r"^([A-Za-z0-9_.\-]+): (.+)$")
START = "<!-- figures:start -->"
END = "<!-- figures:end -->"


def run_one(name: str, script: Path, quick: bool, timeout: float) -> tuple[dict[str, str],
                                                                        float, int]:
    cmd = [sys.executable, str(script), *(["--quick"] if quick else [])]
    print(f"## {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    values: dict[str, str] = {}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                cwd=common.ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = LINE.match(line.rstrip("\n"))
                if m:
                    values[m.group(1)] = m.group(2)
                    print(line.rstrip("\n"), flush=True)
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = 124
        if rc != 0:  # say why: the end of its stderr
            err.seek(0)
            print("".join(err.readlines()[-25:]), end="", flush=True)
    secs = time.perf_counter() - t
    print(f"## {name}: exit {rc} in {secs:.0f}s", flush=True)
    return values, secs, rc


def readme_table(values: dict[str, str], when: str, where: str, quick: bool) -> str:
    rows = ["| figure | value | target | met |", "|---|---|---|---|"]
    for k, target, check, threshold in HEADLINE:
        if k not in values:
            continue
        met = ""
        if check and check in values:
            met = "yes" if float(values[check]) >= threshold else "**no**"
        rows.append(f"| `{k}` | {values[k]} | {target} | {met} |")
    return "\n".join([f"Measured {when} with `python bench/run.py{' --quick' if quick else ''}`"
                      f" on {where}.", "", *rows])


def write_readme(values: dict[str, str], when: str, where: str, quick: bool) -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        table = readme_table(values, when, where, quick)
        readme.write_text(f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the short version of every bench")
    ap.add_argument("--only", default=None, help="comma-separated bench names")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--readme", action="store_true",
                    help="rewrite the figures table of bench/README.md")
    ap.add_argument("--timeout", type=float, default=600, help="per bench, seconds")
    ap.add_argument("--from-json", default=None,
                    help="only rewrite bench/README.md's table from a --json file")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write_readme(saved["figures"], saved.get("date", time.strftime("%Y-%m-%d")),
                     saved["machine"], saved["quick"])
        return 0
    only = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    results: dict[str, dict[str, str]] = {}
    failed = []
    for name, script in BENCHES:
        path = HERE / script
        if (only and name not in only) or not path.is_file():
            continue
        values, secs, rc = run_one(name, path, args.quick, args.timeout)
        results[name] = {**values, "bench_seconds": f"{secs:.1f}"}
        if rc != 0:
            failed.append(name)
    merged: dict[str, str] = {}
    seen: dict[str, int] = {}
    for vals in results.values():
        for k in vals:
            seen[k] = seen.get(k, 0) + 1
    print("\n# all figures", flush=True)
    for name, vals in results.items():
        for k, v in vals.items():
            key = f"{name}.{k}" if seen[k] > 1 else k
            merged[key] = v
            print(f"{key}: {v}")
    total = time.perf_counter() - t0
    print(f"bench_total_seconds: {total:.0f}")
    print(f"machine: {common.machine()}")
    if failed:
        print(f"failed: {','.join(failed)}")
    common.write_json(args.json, {"machine": common.machine(), "quick": args.quick,
                                  "seconds": total, "date": time.strftime("%Y-%m-%d"),
                                  "figures": merged})
    if args.readme:
        write_readme(merged, time.strftime("%Y-%m-%d"), common.machine(), args.quick)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
