#!/usr/bin/env bash
# GPU check on a bare machine with one CUDA GPU, unattended, no network, no Ray, in under
# 12 minutes (a budget of GPU_CHECK_BUDGET_S, 690 s by default, that every step's time limit
# is cut to; the step about to run when it is spent is skipped, with a line saying so). Expects Python with torch (CUDA), transformers, torchvision, pandas, pyarrow,
# pillow and pyyaml installed; installs what else sweeper imports (pydantic and its core,
# annotated-types, typing-inspection, typing-extensions) from the wheels in $WHEELS
# (default .whl/, downloaded beforehand: see bench/README.md), into a folder of its own.
# Steps, each with its own time limit, in order of what matters most:
#   parity       training preprocesses as the pinned AutoProcessor does, torchvision installed
#   trial        quickstart-shaped trials in-process on the GPU, bf16 (bench/gpu_trial.py)
#   throughput   samples/s, MFU and host syncs of a SigLIP-B/16-shaped step, eager
#   hot_loop     the worker loop vs a bare Hugging Face loop on the GPU (SigLIP-B/16 shapes)
#   loader       images/s per DataLoader worker vs what the bf16 B/16 step consumes
#   checkpoint   bytes per checkpoint for SigLIP-B/16 and so400m
#   large_batch  bench/large_batch.py (micro-batching), when present
#   compiled     the throughput step with both towers compiled, if time is left
# Prints `name: value` lines and `gpu_check_ok: true|false`; exits 1 if a step failed.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from anywhere
#   bash bench/gpu_check.sh --cpu-dry-run   # here: every step shrunk, on the CPU; checks
#                                           # the wheels resolve for Python 3.12 and that
#                                           # a step past its limit is stopped cleanly
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
# 690 s on the GPU machine; a dry run on a (shared, slow) CPU gets 40 minutes.
BUDGET=${GPU_CHECK_BUDGET_S:-$(( DRY ? 2400 : 690 ))}
NEEDED=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)
export SWEEPER_CACHE=${SWEEPER_CACHE:-/tmp/gpu-check-cache}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1
LOGS=$(mktemp -d /tmp/gpu-check.XXXXXX)
STATUS=0
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

# run NAME LIMIT_S CMD...: the step under min(LIMIT_S, what the budget has left), its
# name: value lines printed, its log's tail on failure; a step past its limit is killed
# (TERM, then KILL 10 s later) and the check goes on.
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - $(elapsed) - 15 ))
  (( limit > left )) && limit=$left
  LAST_RC=skipped
  if (( limit < 5 )); then
    echo "${name}_skipped: only ${left}s of the ${BUDGET}s budget left"; return 0
  fi
  echo "## ${name} (limit ${limit}s, at $(elapsed)s): $*"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  LAST_RC=$rc
  grep -E '^[A-Za-z0-9_.-]+: ' "$LOGS/$name.log" | grep -vE '^(WARNING|INFO|ERROR):'
  echo "${name}_exit: $rc"
  echo "${name}_s: $(( $(date +%s) - t ))"
  if (( rc == 124 || rc == 137 )); then
    echo "${name}_timed_out: true"
  fi
  if (( rc != 0 )); then
    STATUS=1
    tail -25 "$LOGS/$name.log" | sed "s/^/  ${name}| /"
  fi
  return 0
}

# --------------------------------------------------------------------------- wheels
echo "## wheels from $WHEELS"
missing=0
for n in "${NEEDED[@]}"; do
  f=$(ls "$WHEELS"/"${n//-/_}"-*.whl 2>/dev/null | head -1)
  if [[ -z "$f" ]]; then echo "wheel_missing: $n"; missing=1; else echo "wheel: $(basename "$f")"; fi
done
if (( missing )); then echo "gpu_check_ok: false"; exit 1; fi
if [[ $DRY == 1 ]]; then
  # The wheels resolve, dependencies included, for the GPU machine's Python 3.12 alone.
  if ! "$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$WHEELS" \
      --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --target "$LOGS/site" "${NEEDED[@]}" \
      > "$LOGS/wheels.log" 2>&1; then
    echo "wheels_resolve: false"; tail -5 "$LOGS/wheels.log"; echo "gpu_check_ok: false"; exit 1
  fi
  echo "wheels_resolve: true (Python 3.12, manylinux x86_64, no index)"
else
  SITE=/tmp/gpu-check-site
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl > "$LOGS/wheels.log" 2>&1; then
    echo "wheels_installed: false"; tail -5 "$LOGS/wheels.log"; echo "gpu_check_ok: false"; exit 1
  fi
  echo "wheels_installed: true"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' || { echo "gpu_check_ok: false"; exit 1; }
import importlib, sys
import torch, transformers
print(f"python: {sys.version.split()[0]}")
print(f"torch: {torch.__version__}")
print(f"transformers: {transformers.__version__}")
for m in ("torchvision", "pydantic", "yaml", "pandas", "pyarrow", "PIL"):
    try:
        v = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:
        v = f"missing ({type(e).__name__})"
    print(f"{m}: {v}")
print(f"cuda_available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}")
    print(f"compute_capability: {p.major}.{p.minor}")
    print(f"gpu_memory_gib: {p.total_memory / 2**30:.1f}")
import sweeper.worker  # everything the worker loop imports is there
EOF

# --------------------------------------------------------------------------- steps
if [[ $DRY == 0 ]]; then
  run parity 90 "$PY" bench/processor_parity.py
  run trial 180 "$PY" bench/gpu_trial.py
  run throughput 120 "$PY" bench/gpu_throughput.py --batch 256 --steps 20 --loader-workers 8
  SPS=$(grep -E '^gpu_samples_per_s: ' "$LOGS/throughput.log" | awk '{print $2}')
  run hot_loop 150 "$PY" bench/hot_loop.py --in-process --device cuda --shape b16 \
    --batch 128 --quick
  run loader 90 "$PY" bench/loader_feed.py --workers 1,4,8 ${SPS:+--step-samples-per-s $SPS}
  run checkpoint 60 "$PY" bench/checkpoint_size.py
  if [[ -f bench/large_batch.py ]]; then
    run large_batch 150 "$PY" bench/large_batch.py --gpu --find-max --max-seconds 60
  else
    echo "large_batch_skipped: bench/large_batch.py is not in this checkout"
  fi
  run compiled 240 "$PY" bench/gpu_throughput.py --batch 256 --steps 20 --loader-workers 8 \
    --compile
else
  # A step past its limit is stopped (TERM; KILL if it ignores that), reported, and the
  # check goes on: the drill's failure is the expected one, not the check's.
  run timeout_drill 3 "$PY" -c "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
  if [[ $LAST_RC == 137 || $LAST_RC == 124 ]]; then
    echo "timeout_drill_ok: true"; STATUS=0
  else
    echo "timeout_drill_ok: false"; STATUS=1
  fi
  run parity 120 "$PY" bench/processor_parity.py
  run trial 900 "$PY" bench/gpu_trial.py --cpu-dry-run --trials 2
  run throughput 300 "$PY" bench/gpu_throughput.py --cpu-dry-run
  run hot_loop 600 "$PY" bench/hot_loop.py --in-process --quick --interval 2
  run loader 200 "$PY" bench/loader_feed.py --quick --workers 1
  run checkpoint 120 "$PY" bench/checkpoint_size.py
  if [[ -f bench/large_batch.py ]]; then
    run large_batch 300 "$PY" bench/large_batch.py --cpu-dry-run --find-max
  else
    echo "large_batch_skipped: bench/large_batch.py is not in this checkout"
  fi
  echo "compiled_skipped: dry run (torch.compile of the towers is a GPU figure)"
fi
echo "gpu_check_s: $(elapsed)"
echo "gpu_check_ok: $([[ $STATUS == 0 ]] && echo true || echo false)"
[[ -n "${GPU_CHECK_LOGS:-}" ]] && mkdir -p "$GPU_CHECK_LOGS" && cp "$LOGS"/*.log "$GPU_CHECK_LOGS"/
rm -rf "$LOGS"
exit $STATUS
