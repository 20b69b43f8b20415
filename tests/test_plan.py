"""``rose plan``: the fake-tensor plan of the tiny model equals what real runs of the same step
functions measure (FLOPs exactly; peak live memory within 2%), at a batch and a depth the plan
extrapolates to; named shapes load without a download; the CLI prints a table."""

from __future__ import annotations

import json

import pytest
import torch

from rose_select import plan as P
from rose_select.features.stage import FeatureSettings
from rose_select.modeling import LoraSettings, attach_lora, load_model
from rose_select.tokenization import TokenizeConfig
from rose_select.train.stage import Schedule

MEMORY_BOUND = 0.02  # plan vs real live-tensor peak, relative


def _cfg(tiny_model_dir, **kw):
    return P.PlanConfig(model=str(tiny_model_dir / "config.json"), model_dtype="float32",
                        lora=LoraSettings(r=4, alpha=8.0, dropout=0.0), tokenize=TokenizeConfig(max_length=48),
                        featurize=FeatureSettings(dim=64, autocast="none"),
                        warmup=Schedule(mixed_precision="none", epochs=2), train=Schedule(mixed_precision="none"),
                        pool_size=100, validation_size=10, heldout_size=10, gpu=str(2**30), peak_flops=1e12, **kw)


def _real_trace(cfg, tiny_model_dir, stage, items):
    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_model_dir)), cfg.lora)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return P.stage_trace(cfg, stage, model, items, cfg.tokenize.max_length)


@pytest.mark.parametrize("stage", P.GPU_STAGES)
def test_plan_equals_a_real_run(tiny_model_dir, stage):
    cfg = _cfg(tiny_model_dir)
    config = P.model_config(cfg.model)
    fits, _ = P.stage_fits(cfg, config, [stage], cfg.tokenize.max_length)
    peak, flops = fits[stage]
    layers = config.num_hidden_layers
    for items in (1, 3):  # 3: beyond the fitted batches
        real = _real_trace(cfg, tiny_model_dir, stage, items)
        assert real.flops > 0
        assert flops.at(layers, items) == pytest.approx(real.flops, rel=1e-12)
        assert abs(peak.at(layers, items) / real.peak_bytes - 1) < MEMORY_BOUND, (peak.at(layers, items), real)


def test_named_shapes_are_shipped():
    assert {"llama-3.1-8b", "llama-2-7b", "llama-2-13b", "mistral-7b"} <= set(P.named_shapes())
    c = P.model_config("llama-3.1-8b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.vocab_size) == (32, 4096, 8, 128256)
    with pytest.raises(Exception, match="named shape"):
        P.model_config("/no/such/model-dir")


def test_largest_batch_fits_the_budget():
    peak = P.Affine(a=10.0, b=1.0, c=2.0, d=0.5)  # at 4 layers: 14 fixed + 4 per item
    assert P.largest_batch(peak, 4, 14 + 4 * 7 + 3) == 7
    assert P.largest_batch(peak, 4, 13) == 0
    fit = P.Affine.fit(peak.at(1, 1), peak.at(1, 2), peak.at(2, 1), peak.at(2, 2))
    assert fit == peak


def test_plan_cli_prints_and_writes(tiny_model_dir, tmp_path, capsys):
    from rose_select.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir / "config.json"), "--model-dtype", "float32",
                 "--lora.r", "4", "--featurize.dim", "64", "--tokenize.max-length", "32",
                 "--gpu", str(2**28), "--reserve-gib", "0", "--peak-flops", "1e12", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "featurize_pool" in text and "device-hours" in text
    plan = json.loads(out.read_text())
    rows = {r["stage"]: r for r in plan["rows"]}
    assert set(rows) == set(P.STAGES)
    assert rows["featurize_pool"]["batch"] >= 1 and rows["featurize_pool"]["device_hours"] > 0
    assert rows["featurize_pool"]["disk_bytes"] == 4 * 270679 * (64 * 2 + 1)  # 4 checkpoints, float16 rows of dim 64 + the done mask
