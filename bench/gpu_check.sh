#!/usr/bin/env bash
# GPU check for a machine with one CUDA GPU, in about 8 minutes (each step bounded; at most 14):
#   1. install the project (torch with CUDA is expected to be installed already: it is not
#      pinned here, so pip keeps it; everything else comes from PyPI),
#   2. the quickstart on the GPU in bf16 (8 trials, one GPU each, so one at a time),
#   3. training throughput and model FLOPs utilisation of a randomly initialised model with
#      SigLIP-B/16's shapes (bench/gpu_throughput.py), eager,
#   4. global batches larger than memory (bench/large_batch.py, bf16): peak memory and time
#      per sample one pass vs micro-batched, and the largest global batch that trains on
#      this GPU without micro-batches, with them, and with them and gradient checkpointing,
#   5. throughput with the towers compiled, if time is left.
# Every step has its own time limit; the script prints `name: value` lines and exits non-zero
# if a step failed.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from anywhere
#   bash bench/gpu_check.sh --only large_batch   # install, then step 4 alone (about 4 min)
#   bash bench/gpu_check.sh --cpu-dry-run   # here: checks the script on the CPU (a trimmed
#                                           # quickstart, a shrunken model; no install;
#                                           # --only large_batch works here too)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
ONLY=""
while (( $# )); do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a step name: large_batch}; shift ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
export SWEEPER_CACHE=${SWEEPER_CACHE:-$PWD/.sweeper_cache}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=$(mktemp -d /tmp/gpu-check.XXXXXX)
STATUS=0
START=$(date +%s)
step() { echo "## $* ($(( $(date +%s) - START ))s)"; }

if [[ $DRY == 0 ]]; then
  step "install"
  if ! timeout 180 "$PY" -m pip install -q -e . 2>&1 | tail -3; then
    echo "install_ok: false"; exit 1
  fi
  "$PY" - <<'EOF' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch: {torch.__version__}")
print(f"cuda: {torch.version.cuda}")
print(f"gpu: {torch.cuda.get_device_name(0)}")
print(f"bf16_supported: {torch.cuda.is_bf16_supported()}")
EOF
  QS_SET=(--set scaling.use_gpu=true --set train.precision=bf16)
  QS_LIMIT=300
else
  QS_SET=(--set grid.text_source=[templates] --set grid.n_train_classes=[5]
          --set train.epochs=1 --set train.precision=bf16)
  QS_LIMIT=400
fi

large_batch() {
  if [[ $DRY == 0 ]]; then
    step "large batch, bf16"
    timeout 270 "$PY" bench/large_batch.py --gpu --find-max --max-seconds 60 || STATUS=1
  else
    step "large batch (CPU dry run)"
    timeout 400 "$PY" bench/large_batch.py --cpu-dry-run --find-max || STATUS=1
  fi
}
if [[ $ONLY == large_batch ]]; then
  large_batch
  echo "gpu_check_s: $(( $(date +%s) - START ))"
  echo "gpu_check_ok: $([[ $STATUS == 0 ]] && echo true || echo false)"
  rm -rf "$OUT"
  exit $STATUS
fi

step "quickstart ${QS_SET[*]}"
T=$(date +%s)
timeout "$QS_LIMIT" "$PY" -m sweeper.run search_spaces/quickstart.yaml --storage "$OUT" \
  "${QS_SET[@]}" > "$OUT/quickstart.log" 2>&1
RC=$?
grep -E "^(Trials|Experiment|report):" "$OUT/quickstart.log"
echo "quickstart_exit: $RC"
echo "quickstart_s: $(( $(date +%s) - T ))"
if [[ $RC != 0 ]]; then
  STATUS=1
  tail -30 "$OUT/quickstart.log"
else
  # Every trial ran on the GPU, in bf16, and reported its throughput.
  "$PY" - "$OUT/quickstart" <<'EOF' || STATUS=1
import json, sys
from pathlib import Path
trials = sorted(Path(sys.argv[1], "trials").glob("*/status.json"))
st = [json.loads(p.read_text()) for p in trials]
print(f"quickstart_trials: {len(st)}")
print(f"quickstart_devices: {sorted({s.get('device') for s in st})}")
print(f"quickstart_precisions: {sorted({s.get('precision') for s in st})}")
print(f"quickstart_statuses: {sorted({s.get('status') for s in st})}")
best = [s.get("best_val_top1") for s in st if s.get("best_val_top1") is not None]
print(f"quickstart_best_val_top1_max: {max(best) if best else None}")
sps = []
for p in trials:
    rows = [json.loads(l) for l in (p.parent / "history.jsonl").read_text().splitlines() if l]
    sps += [r["samples_per_s"] for r in rows if r.get("samples_per_s")]
print(f"quickstart_samples_per_s_max: {max(sps) if sps else None}")
assert all(s.get("status") == "terminated" for s in st), "a trial did not terminate"
EOF
fi

if [[ $DRY == 0 ]]; then
  step "throughput, eager"
  timeout 90 "$PY" bench/gpu_throughput.py --batch 256 --steps 20 || STATUS=1
  large_batch
  LEFT=$(( 470 - ($(date +%s) - START) ))
  if (( LEFT > 60 )); then
    step "throughput, compiled towers"
    timeout "$LEFT" "$PY" bench/gpu_throughput.py --batch 256 --steps 20 --compile || STATUS=1
  else
    echo "gpu_compiled_skipped: ${LEFT}s left of the 8 minutes"
  fi
else
  step "throughput (CPU dry run)"
  timeout 300 "$PY" bench/gpu_throughput.py --cpu-dry-run || STATUS=1
  large_batch
fi
echo "gpu_check_s: $(( $(date +%s) - START ))"
echo "gpu_check_ok: $([[ $STATUS == 0 ]] && echo true || echo false)"
rm -rf "$OUT"
exit $STATUS
