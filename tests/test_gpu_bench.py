"""``bench/gpu.sh --dry-run``: the prepared GPU script's CPU mode runs in CI, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "skipped" in done.stdout and "needs a CUDA device" in done.stdout  # the CUDA tests, skipped here
    res = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    row = res["shapes"]["tiny"]
    for side in ("train", "featurize"):
        assert row[side]["examples_per_s"] > 0
        assert row[side]["tokens_per_s"] == row[side]["examples_per_s"] * res["setting"]["seq_len"]
    assert row["featurize_vs_train"] > 0 and row["lora_params"] > 0
    assert "Warning" not in done.stderr, done.stderr[-2000:]
