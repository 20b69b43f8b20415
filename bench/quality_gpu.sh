#!/usr/bin/env bash
# The planted-pool benchmark at a GPU's scale (configs/experiments/quality_gpu.yaml; README, "Does it
# select better data?"): 3 seeds, selection and downstream, in one call. Run the same command again
# to resume: every finished step (warm-up, feature-store batches, selections, trainings,
# evaluations) is stamped with its settings and inputs and reused.
#
#   bench/quality_gpu.sh --base.pool data/pool.jsonl [more rose experiment flags]   # CUDA machine
#   bench/quality_gpu.sh --dry-run   # CPU, tiny random model, one seed, --quick: the same path (CI)
#
# PYTHON (default: python), OUT (default: runs/experiments) and SEEDS (default: 3) may be set.
# Its cost on a given GPU: the plan of the GPU-readiness work (`rose plan`), once it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/experiments}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
CONFIG=configs/experiments/quality_gpu.yaml

if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  export ROSE_NO_PROGRESS=1
  # the GPU config with its scale replaced by a tiny model's (every other setting kept)
  "$PY" - "$CONFIG" "$OUT/quality_gpu_dry_run" <<'PY'
import sys
from pathlib import Path

import yaml

from rose_select.testing import write_tiny_model_dir

cfg, out = yaml.safe_load(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
base = cfg["base"]
base.update(model=str(write_tiny_model_dir(out / "tiny-model")), pool="builtin:pool/sharegpt_demo.jsonl",
            device="cpu", lora={"r": 2, "alpha": 4, "dropout": 0.0}, tokenize={"max_length": 48})
base["warmup"].update(epochs=2, batch_size=4, grad_accum=1, fraction=0.25, lr=1e-3)
base["train"].update(epochs=1, batch_size=4, grad_accum=1, lr=1e-3)
base["featurize"].update(dim=32, batch_size=8, checkpoints=[1, 2])
cfg.update(output_dir=str(out), methods=["rose", "rose_plus", "less", "random"], downstream_test_prompts={})
(out / "config.yaml").write_text(yaml.safe_dump(cfg))
PY
  exec "$PY" -m rose_select experiment quality --config "$OUT/quality_gpu_dry_run/config.yaml" --quick true --seeds 1 "$@"
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/quality_gpu.sh: no CUDA device (--dry-run runs on CPU)")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" -m rose_select experiment quality --config "$CONFIG" --seeds "${SEEDS:-3}" --output-dir "$OUT" "$@"
