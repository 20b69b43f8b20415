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


def test_validation_bench_runs(tiny_model_dir, tmp_path):
    """``bench/validation.py`` (before/after and --bf16) on the tiny model, so it cannot rot."""
    from rose_select.testing import write_lora_checkpoint

    ckpt = write_lora_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    pool, prefs = tmp_path / "pool.jsonl", tmp_path / "prefs.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": "Tell me about bread." * (1 + i % 3)},
        {"role": "assistant", "content": "Bread is baked." + " yes" * i}]}) + "\n" for i in range(6)))
    prefs.write_text("".join(json.dumps({"id": f"v{i}", "subtask": f"s{i % 2}", "prompt": "How?" + "!" * i,
                                         "chosen": "Mix flour." + " knead" * i, "rejected": "No."}) + "\n"
                             for i in range(4)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for extra, key in (([], "after_vs_before"), (["--bf16"], "spearman_scores")):
        out = tmp_path / f"r{len(extra)}.json"
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "validation.py"), "--checkpoint", str(ckpt),
                               "--model", str(tiny_model_dir), "--validation", str(prefs), "--pool", str(pool),
                               "--dim", "32", "--max-length", "64", "--rounds", "1", "--out", str(out), *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(out.read_text())[key] > 0
