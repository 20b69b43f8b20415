"""``bench/gpu.sh --dry-run``: the prepared GPU script's CPU mode runs in CI, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_sh(tmp_path, **env):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=900)


def test_gpu_script_dry_run(tmp_path):
    done = _gpu_sh(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "skipped" in done.stdout and "needs a CUDA device" in done.stdout  # the cuda parameters, skipped here
    assert " passed" in done.stdout  # the same bodies, on the CPU
    res = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    row = res["shapes"]["tiny"]
    for side in ("train", "featurize"):
        assert row[side]["examples_per_s"] > 0
        assert row[side]["tokens_per_s"] == row[side]["examples_per_s"] * res["setting"]["seq_len"]
    assert row["featurize_vs_train"] > 0 and row["lora_params"] > 0
    parts = json.loads((tmp_path / "gpu_dry_run_parts.json").read_text())
    assert parts["ok"] and {p["status"] for p in parts["parts"].values()} == {"ok"}
    assert set(parts["parts"]) == {"device_tests", "bench", "rehearsal"}
    assert parts["bench"] == res
    assert parts["rehearsal"] == json.loads((tmp_path / "rehearsal_dry_run.json").read_text())
    _check_rehearsal(parts["rehearsal"])
    assert "Warning" not in done.stderr, done.stderr[-2000:]


def _check_rehearsal(res):
    """The dry-run's rehearsal (tiny model, CPU, 1 and 2 layers): every row measured and timed.
    The plan equals the real run's live tensor bytes and FLOPs; the process's high-water mark is
    not compared with it: for a model of a few hundred KiB it is the process's own ~25-35 MiB
    (first-use code and allocator pages), which full-width rows make negligible."""
    stages = ("featurize_pool", "validation", "train", "evaluate")
    assert {(r["stage"], r["layers"]) for r in res["rows"]} == {(s, n) for s in stages for n in (1, 2)}
    for r in res["rows"]:
        assert "error" not in r and "skipped" not in r, r
        assert r["measured_gib"] > 0 and r["timed_peak_gib"] > 0 and r["plan_gib"] > 0
        assert r["live_gib"] == pytest.approx(r["plan_gib"], rel=0.02)
        assert r["plan_tflop"] > 0 and r["traced_tflop"] == pytest.approx(r["plan_tflop"], rel=1e-9)
        assert r["timed_step_s"] > 0 and r["achieved_tflops"] == pytest.approx(
            r["plan_tflop"] / r["timed_step_s"])
        assert r["mfu"] is None  # the CPU has no peak FLOP/s in the plan's device table


def test_gpu_script_survives_a_failing_part(tmp_path):
    """A failing first part (the tests) does not stop the benchmark and the rehearsal (one stage
    here, to keep CI short); the JSON records all three."""
    done = _gpu_sh(tmp_path, TESTS=str(tmp_path / "no_such_test.py"), REHEARSAL_STAGES="evaluate")
    assert done.returncode != 0
    parts = json.loads((tmp_path / "gpu_dry_run_parts.json").read_text())
    assert parts["ok"] is False
    assert parts["parts"]["device_tests"]["status"] == "failed" and parts["parts"]["device_tests"]["exit_code"] != 0
    assert parts["parts"]["bench"]["status"] == "ok" and parts["parts"]["rehearsal"]["status"] == "ok"
    assert parts["bench"]["shapes"]["tiny"]["featurize"]["examples_per_s"] > 0
    assert [(r["stage"], r["layers"]) for r in parts["rehearsal"]["rows"]] == [("evaluate", 1), ("evaluate", 2)]


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
    for extra, keys in (([], ["after_vs_before"]), (["--bf16", "--bf16-mode", "both"],
                                                     ["weights", "autocast"])):
        out = tmp_path / f"r{len(extra)}.json"
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "validation.py"), "--checkpoint", str(ckpt),
                               "--model", str(tiny_model_dir), "--validation", str(prefs), "--pool", str(pool),
                               "--dim", "32", "--max-length", "64", "--rounds", "1", "--out", str(out), *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        res = json.loads(out.read_text())
        for key in keys:
            got = res[key] if key == "after_vs_before" else res[key]["time_vs_float32"]
            assert got > 0
        if extra:
            for mode in keys:
                assert -1 <= res[mode]["spearman_scores"] <= 1 and 0 <= res[mode]["top10_overlap"] <= 1


def test_floor_bench_counts_a_run(tiny_model_dir, tmp_path):
    """``bench/floor.py`` on a tiny run: every stage has a FLOP count and a floor, a forward-only
    evaluation token costs less than a featurized one, and the rows follow the config."""
    pool, prefs, held = tmp_path / "pool.jsonl", tmp_path / "prefs.jsonl", tmp_path / "held.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": "Tell me about bread." * (1 + i % 3)},
        {"role": "assistant", "content": "Bread is baked." + " yes" * i}]}) + "\n" for i in range(10)))
    for path, tag in ((prefs, "How"), (held, "Why")):
        path.write_text("".join(json.dumps({"id": f"{tag}{i}", "subtask": f"s{i % 2}", "prompt": tag + "?" + "!" * i,
                                            "chosen": "Mix flour." + " knead" * i, "rejected": "No."}) + "\n"
                                for i in range(4)))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\npool: {pool}\nvalidation: {prefs}\n"
                      "lora: {r: 4, alpha: 8}\ntokenize: {max_length: 64}\n"
                      "warmup: {fraction: 0.2, epochs: 2, batch_size: 2}\nfeaturize: {dim: 32, batch_size: 2}\n"
                      "select: {methods: [rose, random], fraction: 0.2}\ntrain: {epochs: 3, batch_size: 2}\n"
                      f"evaluate: {{heldout: {held}, batch_size: 2}}\n")
    out = tmp_path / "floor.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "ROSE_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "floor.py"), "--config", str(config),
                           "--sample", "4", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    per = res["flops_per_token"]
    assert all(per[s] > 0 for s in ("pool", "validation", "train", "eval"))
    assert 1.5 < per["pool"] / per["eval"] < 3.5  # forward + backward vs forward only
    assert res["tokens"]["rows"] == {"pool": 20, "validation triples": 8, "train": 2 * 2 + 2 * 3 * 2,
                                     "eval pairs": 4 * 3}
    assert res["gemm_gflops"]["float32"] > 0 and res["floor_seconds"]["float32"] > 0


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rehearsal_rates_and_skips():
    """The rehearsal's arithmetic: TFLOP/s and MFU only where a timed step and a peak exist; a row
    skipped above the cap or the free memory less 1.5 GiB, run where the free memory is unknown."""
    reh, gib = _bench_module("rehearsal"), 2**30
    assert reh.rates(4e14, 2.0, 989e12) == {"achieved_tflops": 200.0, "mfu": pytest.approx(200 / 989)}
    assert reh.rates(4e14, None, 989e12) == {"achieved_tflops": None, "mfu": None}
    assert reh.rates(4e14, 2.0, None) == {"achieved_tflops": 200.0, "mfu": None}
    assert reh.skip_reason(31.8, 79.0 * gib, None) is None
    assert "cap 12.0" in reh.skip_reason(13.0, 79.0 * gib, 12.0)
    assert "78.0 GiB available" in reh.skip_reason(77.0, 78.0 * gib, None)
    assert reh.skip_reason(500.0, None, None) is None  # an out-of-memory row is recorded as an error


def test_rehearsal_on_cuda_without_a_device_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _bench_module("rehearsal").main(["--device", "cuda", "--out", "/nonexistent/x.json"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
