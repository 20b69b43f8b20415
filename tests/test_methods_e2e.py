"""Every selection method on the real embedded SmolLM2, a real (ShareGPT) pool and a real
validation set (HH-RLHF 1-shot), end to end: warm-up -> featurize -> select."""

import json

import numpy as np
import pytest

from rose_select.config import from_dict
from rose_select.pipeline import RunConfig, _checkpoints, featurize_jobs, resolve_input, select_config, training_configs
from rose_select.select.stage import METHODS, run_select


@pytest.mark.slow
def test_every_method_selects_from_a_real_pool_on_the_embedded_model(tmp_path):
    from rose_select.features.stage import run_featurize
    from rose_select.train.stage import run_warmup

    cfg = from_dict(RunConfig, {
        "output_dir": str(tmp_path / "run"), "model": "smollm2-135m", "pool_limit": 24, "device": "cpu",
        "validation": "builtin:rose_data/validation/hh/hh_1_shot/hh_1_shot_preference.json",
        "lora": {"r": 4, "alpha": 8}, "tokenize": {"max_length": 96},
        "warmup": {"fraction": 0.25, "epochs": 1, "lr": 1e-4, "batch_size": 2, "grad_accum": 1},
        "featurize": {"dim": 256, "batch_size": 4}, "select": {"methods": list(METHODS), "fraction": 0.25}})
    run = tmp_path / "run"
    pool, validation = resolve_input(cfg.pool), resolve_input(cfg.validation)
    warm, _ = training_configs(cfg, run, pool)
    run_warmup(warm)
    ckpts = _checkpoints(cfg, run / "warmup")
    for _, fcfg in featurize_jobs(cfg, run, run, pool, validation, ckpts):
        run_featurize(fcfg)
    picked = {}
    for method in METHODS:
        out = run_select(select_config(cfg, run, run, method, pool, validation, ckpts))
        rows = [json.loads(l) for l in (out / "selected.jsonl").read_text().splitlines()]
        scores = np.load(out / "scores.npy")
        assert scores.shape == (24,) and np.isfinite(scores).all(), method
        assert len(rows) == (24 if method == "full" else 6), method
        assert all("messages" in r and "id" in r for r in rows), method  # the pool's own record format
        picked[method] = [r["id"] for r in rows]
    summary = json.loads((run / "select" / "rose" / "summary.json").read_text())
    assert set(summary["share_per_subtask"]) <= {"harmless-base", "red-team-attempts"}
    assert len({tuple(sorted(v)) for k, v in picked.items() if k != "full"}) > 1  # methods differ
