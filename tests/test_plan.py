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

# --------------------------------------------------------------------------- --pool: a pool's own lengths

ANSWERS = ["Yes.", "Knead it.", "The quick brown fox.", "bread " * 40]  # 24, 27, 35 and 140 tokens


def _pool_file(path, answers=ANSWERS):
    path.write_text("".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": "Bake?"}, {"role": "assistant", "content": a}]}) + "\n"
        for i, a in enumerate(answers)))
    return path


def _real_flops(cfg, tiny_model_dir, stage, encs):
    """FLOPs of one real step of ``stage`` on the items ``encs``, collated as the stages collate."""
    from rose_select.plan_trace import trace
    from rose_select.tokenization import collate

    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_model_dir)), cfg.lora)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    step, held = P.STEPS[stage][0](cfg, model, collate(encs, 0))
    return trace(step, held).flops


@pytest.mark.parametrize("stage, batch", [("warmup", None), ("featurize_pool", 2)])
def test_pool_flops_are_the_sum_of_real_steps_over_its_items(tiny_model_dir, tmp_path, stage, batch):
    """Four items of different lengths (one truncated): the plan's FLOPs, fitted at other
    lengths, equal real steps on the items themselves, padded as featurization's sorted batches."""
    from rose_select.data import load_pool
    from rose_select.features.stage import plan_batches
    from rose_select.modeling import load_tokenizer
    from rose_select.tokenization import encode_record

    cfg, tok = _cfg(tiny_model_dir), load_tokenizer(str(tiny_model_dir))
    records = load_pool(_pool_file(tmp_path / "pool.jsonl"))
    lengths = P.pool_lengths(records, tok, cfg.tokenize, "pool.jsonl")
    assert len(set(lengths.tokens)) == 4 and max(lengths.tokens) == 48
    fits, _ = P.pool_fits(cfg, P.model_config(cfg.model), [stage], max(lengths.tokens))
    encs = [encode_record(r, tok, cfg.tokenize) for r in records]
    groups = plan_batches([[e] for e in encs], batch) if batch else [[i] for i in range(len(encs))]
    real = sum(_real_flops(cfg, tiny_model_dir, stage, [encs[i] for i in rows]) for rows in groups)
    assert P.mean_item_flops(fits[stage][1], lengths, batch) * len(encs) == pytest.approx(real, rel=1e-9)


def test_length_summary_counts_what_truncation_cut(tiny_model_dir):
    """An item of exactly ``max_length`` tokens is not truncated; longer ones are, to the cap."""
    from rose_select.modeling import load_tokenizer
    from rose_select.records import InstructionRecord, Message
    from rose_select.tokenization import encode_record

    tok, tcfg = load_tokenizer(str(tiny_model_dir)), TokenizeConfig(max_length=48)
    rec = lambda i, a: InstructionRecord(id=f"r{i}", source="s", messages=[  # noqa: E731
        Message("user", "How do I bake bread?"), Message("assistant", a)])
    uncut = lambda a: len(encode_record(rec(0, a), tok, TokenizeConfig(max_length=10**6))["input_ids"])  # noqa: E731
    exact = next(a for k in range(1, 60) for a in ("ab " * k, "x" * k) if uncut(a) == 48)
    lengths = P.pool_lengths([rec(i, a) for i, a in enumerate([exact, "bread " * 40, "Yes.", "loaf " * 50])],
                             tok, tcfg, "pool.jsonl")
    assert lengths.tokens[0] == lengths.tokens[1] == lengths.tokens[3] == 48 and lengths.tokens[2] < 48
    s = lengths.summary()
    assert (s["n"], s["max"], s["truncated_share"]) == (4, 48, 0.5)
    assert s["p50"] == 48 and s["mean"] == pytest.approx(sum(lengths.tokens) / 4)


def test_padded_widths_follow_featurization_batches():
    assert P.padded_widths([5, 1, 3, 9, 2], 2) == [5, 2, 5, 9, 2]  # sorted 1 2 | 3 5 | 9
    assert P.padded_widths([5, 1, 3], 1) == [5, 1, 3]


def test_length_flops_fit_recovers_its_polynomial():
    truth = P.LengthFlops((7.0, 3.0, 0.5, 11.0))
    points = P.length_points(100)
    assert len(set(points)) == 4 and points[0] == (100, 99)
    assert P.LengthFlops.fit(points, [truth.at(t, r) for t, r in points]).at(37, 20) == pytest.approx(truth.at(37, 20))


def _plan_args(tiny_model_dir, *extra):
    return ["plan", "--model", str(tiny_model_dir / "config.json"), "--model-dtype", "float32", "--lora.r", "4",
            "--featurize.dim", "64", "--tokenize.max-length", "48", "--gpu", str(2**28), "--reserve-gib", "0",
            "--peak-flops", "1e12", *extra]


def test_plan_cli_with_a_pool_prints_its_lengths(tiny_model_dir, tmp_path, capsys):
    from rose_select.cli import main

    out, pool = tmp_path / "plan.json", _pool_file(tmp_path / "pool.jsonl")
    assert main(_plan_args(tiny_model_dir, "--pool", str(pool), "--pool-size", "1000", "--output", str(out))) == 0
    text = capsys.readouterr().out
    assert "4 records, scaled to a pool of 1,000" in text and "25.0% truncated at 48" in text
    plan = json.loads(out.read_text())
    assert plan["pool_lengths"]["n"] == 4 and plan["pool_lengths"]["max"] == 48 and plan["pool_size"] == 1000
    rows = {r["stage"]: r for r in plan["rows"]}
    assert rows["featurize_pool"]["items"] == 4 * 1000 and rows["warmup"]["items"] == 50 * 4
    assert 0 < rows["warmup"]["tflop_per_item"] < rows["validation"]["tflop_per_item"]  # short items vs 48-token pairs


def test_plan_cli_refuses_a_bad_pool_naming_file_and_line(tiny_model_dir, tmp_path, capsys):
    from rose_select.cli import main

    pool = _pool_file(tmp_path / "pool.jsonl")
    pool.write_text(pool.read_text().replace("\n", "\n{not json\n", 1))
    assert main(_plan_args(tiny_model_dir, "--pool", str(pool))) == 2
    err = capsys.readouterr().err
    assert f"{pool}, line 2" in err and "malformed JSON" in err


def test_a_named_shape_needs_a_tokenizer_for_a_pool(tmp_path):
    from rose_select.errors import ConfigError

    with pytest.raises(ConfigError, match="named shape without a tokenizer: give --tokenizer"):
        P.make_plan(P.PlanConfig(model="llama-3.1-8b", pool=str(_pool_file(tmp_path / "pool.jsonl"))))


def test_gpu_kind_from_device_names():
    assert P.gpu_kind("NVIDIA H100 80GB HBM3", 80 * P.GIB) == "h100-80gb"
    assert P.gpu_kind("NVIDIA A100-SXM4-40GB", 40 * P.GIB) == "a100-40gb"
    assert P.gpu_kind("NVIDIA A10", 24 * P.GIB) == "a10-24gb" and P.gpu_kind("Tesla T4", 16 * P.GIB) is None
