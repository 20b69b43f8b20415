#!/usr/bin/env bash
# The prepared GPU check: the CUDA-marked tests, then featurization vs LoRA training on
# Llama-shaped ~1B and ~8B models with random weights (bf16, LoRA r=128 on q/k/v/o, d=8192,
# 2048-token examples). Under 8 minutes on one H100; results in bench/results/gpu.json.
#
#   bench/gpu.sh             # on a CUDA machine
#   bench/gpu.sh --dry-run   # CPU, tiny model, seconds: what CI runs (tests/test_gpu_bench.py)
#
# PYTHON (default: python) and OUT (default: bench/results) may be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results}
export ROSE_NO_PROGRESS=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--dry-run" ]]; then
  "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs  # skipped (with reason) without CUDA
  exec "$PY" bench/gpu.py --dry-run --out "$OUT/gpu_dry_run.json"
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device (bench/gpu.sh --dry-run runs on CPU)")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$SECONDS
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs
echo "cuda tests: $((SECONDS - start)) s"
timeout 330 "$PY" bench/gpu.py --out "$OUT/gpu.json"
echo "bench/gpu.sh: $((SECONDS - start)) s in all"
