#!/usr/bin/env bash
# The prepared GPU check: the device-parametrised tests (tests/test_cuda.py), then featurization
# vs LoRA training on Llama-shaped ~1B and ~8B models with random weights (bf16, LoRA r=128 on
# q/k/v/o, d=8192, 2048-token examples). Under 8 minutes on one H100.
#
#   bench/gpu.sh             # on a CUDA machine: bench/results/gpu.json + gpu_parts.json
#   bench/gpu.sh --dry-run   # CPU, tiny model, seconds: what CI runs (tests/test_gpu_bench.py)
#
# Every part runs even when an earlier one fails (a GPU session is too rare to lose to the first
# error): each part's exit status and seconds go to $OUT/gpu_parts.json (gpu_dry_run_parts.json),
# which is always written, with the benchmark's JSON inside when it produced one. The script
# exits non-zero when any part failed. PYTHON (default: python), OUT (default: bench/results) and
# TESTS (default: tests/test_cuda.py) may be set in the environment.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results}
TESTS=${TESTS:-tests/test_cuda.py}
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
  mode=dry_run bench_json="$OUT/gpu_dry_run.json" parts_json="$OUT/gpu_dry_run_parts.json"
  part device_tests 600 "$PY" -m pytest -q -p no:cacheprovider "$TESTS" -rs  # cuda parameters skip here
  part bench 300 "$PY" bench/gpu.py --dry-run --out "$bench_json"
else
  mode=cuda bench_json="$OUT/gpu.json" parts_json="$OUT/gpu_parts.json"
  part cuda_available 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device (bench/gpu.sh --dry-run runs on CPU)")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  part device_tests 200 "$PY" -m pytest -q -p no:cacheprovider "$TESTS" -rs
  part bench 330 "$PY" bench/gpu.py --out "$bench_json"
fi
"$PY" - "$STATUS" "$bench_json" "$parts_json" "$mode" <<'PYEOF'
import json, os, sys
status, bench, out, mode = sys.argv[1:]
parts = {}
for line in open(status):
    name, rc, seconds = line.split()
    parts[name] = {"status": "ok" if rc == "0" else "failed", "exit_code": int(rc), "seconds": int(seconds)}
result = {"mode": mode, "parts": parts, "ok": all(p["exit_code"] == 0 for p in parts.values()),
          "bench": json.load(open(bench)) if os.path.exists(bench) else None}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
os.replace(tmp, out)
print(f"wrote {out}: " + ", ".join(f"{k} {v['status']}" for k, v in parts.items()))
sys.exit(0 if result["ok"] else 1)
PYEOF
