#!/usr/bin/env bash
# The prepared GPU check: the device-parametrised tests (tests/test_cuda.py), then featurization
# vs LoRA training on Llama-shaped ~1B and ~8B models with random weights (bf16, LoRA r=128 on
# q/k/v/o, d=8192, 2048-token examples), then the plan's rehearsal (bench/rehearsal.py --device
# cuda): each stage's step on a full-depth Llama-3.1-8B shape, its peak memory against the plan and
# its time, so the plan's FLOPs give the MFU it assumes. The parts' timeouts add up to 540 s, under
# 9 minutes on one H100.
#
#   bench/gpu.sh             # on a CUDA machine: bench/results/gpu.json, rehearsal_cuda.json, gpu_parts.json
#   bench/gpu.sh --dry-run   # CPU, tiny model, about 2 minutes: what CI runs (tests/test_gpu_bench.py)
#
# Every part runs even when an earlier one fails (a GPU session is too rare to lose to the first
# error): each part's exit status and seconds go to $OUT/gpu_parts.json (gpu_dry_run_parts.json),
# which is always written, with the benchmark's and the rehearsal's JSON inside when they produced
# one (the rehearsal writes after every row, so a timeout keeps the rows done). The script exits
# non-zero when any part failed. PYTHON (default: python), OUT (default: bench/results), TESTS
# (default: tests/test_cuda.py) and REHEARSAL_STAGES (default: featurize_pool,validation,
# train,evaluate) may be set in the environment.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results}
TESTS=${TESTS:-tests/test_cuda.py}
REHEARSAL_STAGES=${REHEARSAL_STAGES:-featurize_pool,validation,train,evaluate}
export ROSE_NO_PROGRESS=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
STATUS=$(mktemp)
trap 'rm -f "$STATUS"' EXIT

part() {  # part NAME TIMEOUT_S COMMAND...: run it, record "NAME RC SECONDS", never stop the script
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name"
  timeout "$limit" "$@"
  rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$STATUS"
  echo "== $name: exit $rc, $((SECONDS - start)) s"
}

if [[ "${1:-}" == "--dry-run" ]]; then
  mode=dry_run bench_json="$OUT/gpu_dry_run.json" rehearsal_json="$OUT/rehearsal_dry_run.json"
  parts_json="$OUT/gpu_dry_run_parts.json"
  rm -f "$bench_json" "$rehearsal_json"  # a stale file must not pass for this run's
  part device_tests 600 "$PY" -m pytest -q -p no:cacheprovider "$TESTS" -rs  # cuda parameters skip here
  part bench 300 "$PY" bench/gpu.py --dry-run --out "$bench_json"
  part rehearsal 300 "$PY" bench/rehearsal.py --tiny --layers 1,2 --stages "$REHEARSAL_STAGES" --length 64 \
    --rank 8 --dim 256 --repeats 1 --out "$rehearsal_json"  # the CUDA part's code on the CPU, timed steps too
else
  mode=cuda bench_json="$OUT/gpu.json" rehearsal_json="$OUT/rehearsal_cuda.json" parts_json="$OUT/gpu_parts.json"
  rm -f "$bench_json" "$rehearsal_json"
  part cuda_available 30 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device (bench/gpu.sh --dry-run runs on CPU)")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  part device_tests 150 "$PY" -m pytest -q -p no:cacheprovider "$TESTS" -rs
  part bench 210 "$PY" bench/gpu.py --out "$bench_json"
  part rehearsal 150 "$PY" bench/rehearsal.py --device cuda --shapes llama-3.1-8b --layers 32 \
    --stages "$REHEARSAL_STAGES" --out "$rehearsal_json"
fi
"$PY" - "$STATUS" "$bench_json" "$rehearsal_json" "$parts_json" "$mode" <<'PYEOF'
import json, os, sys
status, bench, rehearsal, out, mode = sys.argv[1:]
parts = {}
for line in open(status):
    name, rc, seconds = line.split()
    parts[name] = {"status": "ok" if rc == "0" else "failed", "exit_code": int(rc), "seconds": int(seconds)}
result = {"mode": mode, "parts": parts, "ok": all(p["exit_code"] == 0 for p in parts.values()),
          "bench": json.load(open(bench)) if os.path.exists(bench) else None,
          "rehearsal": json.load(open(rehearsal)) if os.path.exists(rehearsal) else None}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
os.replace(tmp, out)
print(f"wrote {out}: " + ", ".join(f"{k} {v['status']}" for k, v in parts.items()))
sys.exit(0 if result["ok"] else 1)
PYEOF
