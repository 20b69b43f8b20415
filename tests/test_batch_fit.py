"""Batches that fit: a batch that runs out of memory is split and retried (never skipped), and the
store comes out byte-identical to an uninterrupted run; ``auto_batch`` takes the largest batch
the plan fits into the device's memory, and a resumed store keeps its batch."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from rose_select import plan
from rose_select.errors import ConfigError
from rose_select.features import gradients as G, joint
from rose_select.features.stage import FeaturizeConfig, run_featurize
from rose_select.tokenization import TokenizeConfig


def _write(d, same_length: bool) -> dict:
    """A pool and a preference file; ``same_length``: every sequence of a kind has one length."""
    k = (lambda i: 2) if same_length else (lambda i: i)
    pool, prefs = d / f"pool{same_length}.jsonl", d / f"prefs{same_length}.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": f"What is the capital of France{i}?" * (1 + k(i) % 3)},
        {"role": "assistant", "content": "Paris is the capital." + " yes" * k(i)}]}) + "\n" for i in range(9)))
    prefs.write_text("".join(json.dumps({"id": f"v{i}", "subtask": f"s{i % 2}", "prompt": f"How{i}?" + "!" * k(i),
                                         "chosen": "Mix flour." + " knead" * k(i), "rejected": "No."}) + "\n"
                             for i in range(7)))
    return {"sft": pool, "pairwise": prefs}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("data"), same_length=False)


@pytest.fixture(scope="module")
def even_files(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("even"), same_length=True)


def _cfg(tiny_model_dir, ckpt, data, out, loss, **kw):
    kw = {"auto_batch": "never", **(dict(chosen_output=str(out) + "_chosen") if loss == "pairwise" else {}), **kw}
    return FeaturizeConfig(model=str(tiny_model_dir), checkpoint=str(ckpt), data=str(data), output=str(out), loss=loss,
                           dim=32, batch_size=4, tokenize=TokenizeConfig(max_length=64), store_dtype="float32", **kw)


def _bytes(out):
    return {name: (out / name).read_bytes() for name in ("features.npy", "done.npy", "rows.json")}


def _oom_above(monkeypatch, module, rows: int, calls: list):
    real = module.per_example_features

    def fake(model, batch, *a, **kw):
        calls.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, batch, *a, **kw)
    monkeypatch.setattr(module, "per_example_features", fake)


def _whole_and_split(tiny_model_dir, ckpt, data, tmp_path, loss, monkeypatch, caplog):
    import rose_select.features.stage as S

    whole = run_featurize(_cfg(tiny_model_dir, ckpt, data, tmp_path / "whole", loss))
    calls: list = []
    _oom_above(monkeypatch, joint if loss == "pairwise" else S.G, 2 if loss == "pairwise" else 1, calls)
    with caplog.at_level(logging.WARNING, logger="rose_select.features.stage"):
        split = run_featurize(_cfg(tiny_model_dir, ckpt, data, tmp_path / "split", loss))
    assert max(calls) > min(calls)  # whole batches were tried, then halves
    assert "out of memory" in caplog.text and "retrying" in caplog.text
    return whole, split


@pytest.mark.parametrize("loss", ["sft", "pairwise"])
def test_out_of_memory_splits_and_the_store_is_byte_identical(tiny_model_dir, ckpt, even_files, tmp_path, loss,
                                                               monkeypatch, caplog):
    whole, split = _whole_and_split(tiny_model_dir, ckpt, even_files[loss], tmp_path, loss, monkeypatch, caplog)
    assert _bytes(split) == _bytes(whole)
    if loss == "pairwise":
        assert _bytes(tmp_path / "split_chosen") == _bytes(tmp_path / "whole_chosen")


@pytest.mark.parametrize("loss", ["sft", "pairwise"])
def test_split_padded_batches_agree_to_the_last_bits(tiny_model_dir, ckpt, files, tmp_path, loss, monkeypatch, caplog):
    """Parts keep the batch's padding width, but a part with no padding left takes the causal
    attention kernel where its batch took the masked one: the same features to rounding."""
    import numpy as np

    whole, split = _whole_and_split(tiny_model_dir, ckpt, files[loss], tmp_path, loss, monkeypatch, caplog)
    a, b = (np.load(p / "features.npy") for p in (whole, split))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert _bytes(split)["done.npy"] == _bytes(whole)["done.npy"]


def test_one_item_that_does_not_fit_is_an_error(tiny_model_dir, ckpt, files, tmp_path, monkeypatch):
    import rose_select.features.stage as S

    _oom_above(monkeypatch, S.G, 0, [])
    with pytest.raises(ConfigError, match="does not fit"):
        run_featurize(_cfg(tiny_model_dir, ckpt, files["sft"], tmp_path / "s", "sft"))
    assert not (tmp_path / "s").exists()


def test_auto_batch_takes_the_largest_planned_batch(tiny_model_dir, ckpt, files, tmp_path, monkeypatch):
    from rose_select.features.stage import _load_lora_model

    cfg = _cfg(tiny_model_dir, ckpt, files["sft"], tmp_path / "a", "sft", auto_batch="always")
    model, _ = _load_lora_model(cfg, torch.device("cpu"))
    small, large = (plan.fitting_batch(cfg, model, 40, budget) for budget in (2**21, 2**23))
    assert 1 <= small < large
    monkeypatch.setattr(plan, "free_device_bytes", lambda device: 2**21)
    out = run_featurize(cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["batch_size"] == plan.fitting_batch(cfg, model, _longest(cfg), 2**21) >= 1
    # a resumed store keeps the batch it started with, whatever the device has free now
    monkeypatch.setattr(plan, "free_device_bytes", lambda device: 2**30)
    from rose_select.features.stage import resolve_batch_size

    assert resolve_batch_size(cfg, model, [], torch.device("cpu")) == meta["settings"]["batch_size"]


def _longest(cfg) -> int:
    from rose_select.features.stage import _load_items
    from rose_select.modeling import load_tokenizer

    _, _, encs = _load_items(cfg, load_tokenizer(cfg.model))
    return max(len(e["input_ids"]) for enc in encs for e in enc)
