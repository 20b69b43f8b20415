"""The joint validation pass and ``ref: auto``: equal to the separate passes and to a brute-force
backward per triple; ROSE scores with ``auto`` equal those with ``base``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rose_select.errors import ConfigError
from rose_select.tokenization import TokenizeConfig
from rose_select.features.gradients import loop_features, pairwise_loss_fn, sft_loss_fn
from rose_select.features.joint import joint_features
from rose_select.features.stage import FeaturizeConfig, run_featurize
from rose_select.features.store import open_features
from rose_select.modeling import LoraSettings, attach_lora, load_model, lora_parameters
from rose_select.tokenization import collate

LOOSE = dict(rtol=1e-5, atol=1e-7)  # features come out in float32; RMSNorm computes in float32


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_model_dir), dtype="float64"), LoraSettings(r=3, alpha=6.0))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.3)
    return model.eval()


def _pairs(n, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2 * n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows[:n], rows[n:]


@pytest.mark.parametrize("ref", ["base", "self", "auto"])
def test_joint_equals_brute_force_per_triple(lora_model, ref):
    """One pass over chosen + rejected rows == a batch-1 ``loss.backward()`` per triple (DPO) and
    per chosen answer (mean token loss), exact features (no projection)."""
    chosen, rejected = _pairs(4)
    batch = collate(chosen + rejected, 0)
    got = joint_features(lora_model, batch, None, ref="self" if ref == "auto" else ref, beta=0.3,
                         item_ids=range(4))
    d = got.shape[1] // 2
    loss = pairwise_loss_fn(0.3, "self" if ref == "auto" else ref)
    want_pair = loop_features(lora_model, [collate([c, r], 0) for c, r in zip(chosen, rejected)], loss)
    want_sft = loop_features(lora_model, [collate([c], 0) for c in chosen], sft_loss_fn)
    torch.testing.assert_close(got[:, :d].double(), want_pair.double(), **LOOSE)
    torch.testing.assert_close(got[:, d:].double(), want_sft.double(), **LOOSE)
    assert want_pair.abs().max() > 0 and want_sft.abs().max() > 0


def test_auto_differs_from_base_only_by_a_positive_scalar(lora_model):
    chosen, rejected = _pairs(5, seed=3)
    batch = collate(chosen + rejected, 0)
    base = joint_features(lora_model, batch, None, ref="base", beta=0.5, item_ids=range(5))
    auto = joint_features(lora_model, batch, None, ref="self", beta=0.5, item_ids=range(5))
    d = base.shape[1] // 2
    ratio = (base[:, :d] * auto[:, :d]).sum(1) / (auto[:, :d] ** 2).sum(1)
    assert (ratio > 0).all() and not torch.allclose(ratio, torch.ones_like(ratio))
    torch.testing.assert_close(base[:, :d], ratio[:, None] * auto[:, :d], **LOOSE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    pool, prefs = d / "pool.jsonl", d / "prefs.jsonl"
    with open(pool, "w") as f:
        for i in range(9):
            f.write(json.dumps({"id": f"p{i}", "messages": [
                {"role": "user", "content": "Tell me about bread." + " more" * (i % 4)},
                {"role": "assistant", "content": "Bread is baked." + " flour" * i}]}) + "\n")
    with open(prefs, "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": f"v{i}", "subtask": f"s{i % 3}", "prompt": "How do I bake bread?" + "!" * i,
                                "chosen": "Mix flour and water." + " knead" * i,
                                "rejected": "No." + " stop" * (3 - i % 4)}) + "\n")
    return pool, prefs


def _cfg(tiny_model_dir, ckpt, data, out, **kw):
    return FeaturizeConfig(**{**dict(model=str(tiny_model_dir), checkpoint=str(ckpt), data=str(data),
                                     output=str(out), dim=48, batch_size=3, tokenize=TokenizeConfig(max_length=64), store_dtype="float32"), **kw})


def _feats(path):
    f, meta, rows = open_features(path)
    return np.array(f), meta, rows


def test_joint_stage_equals_separate_stores(tiny_model_dir, ckpt, files, tmp_path, monkeypatch):
    """``chosen_output``: the two stores of one pass == the separate pairwise and sft_chosen stores."""
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    for ref in ("base", "auto"):
        run_featurize(_cfg(tiny_model_dir, ckpt, files[1], tmp_path / f"pair_{ref}", loss="pairwise", ref=ref))
        run_featurize(_cfg(tiny_model_dir, ckpt, files[1], tmp_path / f"joint_{ref}", loss="pairwise", ref=ref,
                           chosen_output=str(tmp_path / f"joint_sft_{ref}")))
    run_featurize(_cfg(tiny_model_dir, ckpt, files[1], tmp_path / "sft", loss="sft_chosen"))
    sft, sft_meta, sft_rows = _feats(tmp_path / "sft")
    for ref in ("base", "auto"):
        pair, pair_meta, pair_rows = _feats(tmp_path / f"pair_{ref}")
        jp, jp_meta, jp_rows = _feats(tmp_path / f"joint_{ref}")
        js, js_meta, js_rows = _feats(tmp_path / f"joint_sft_{ref}")
        np.testing.assert_allclose(jp, pair, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(js, sft, rtol=1e-4, atol=1e-6)
        assert jp_rows == pair_rows and js_rows == sft_rows
        assert jp_meta["settings"]["pair_scale"] == ("unweighted" if ref == "auto" else "dpo")
        assert js_meta["settings"]["loss"] == "sft_chosen" and "pair_scale" not in js_meta["settings"]
        assert {k for k in js_meta["settings"] if js_meta["settings"][k] != sft_meta["settings"].get(k)} == {"pass"}


@pytest.fixture(scope="module")
def stores(tiny_model_dir, ckpt, files, tmp_path_factory):
    """A pool store and pairwise validation stores made with ref base and auto."""
    d = tmp_path_factory.mktemp("stores")
    run_featurize(_cfg(tiny_model_dir, ckpt, files[0], d / "pool", loss="sft"))
    for ref in ("base", "auto"):
        run_featurize(_cfg(tiny_model_dir, ckpt, files[1], d / ref, loss="pairwise", ref=ref))
    return d


def test_rose_scores_auto_equal_base(stores):
    """The per-triple DPO weight cancels in ROSE's cosine score: auto (no reference forward) == base."""
    from rose_select.select.scoring import score_stores

    scores = {ref: score_stores([stores / "pool"], [stores / ref], np.ones(1), reduce="max", progress=False)[0]
              for ref in ("base", "auto")}
    np.testing.assert_allclose(scores["auto"].scores, scores["base"].scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["auto"].per_group, scores["base"].per_group, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores["base"].scores) > 1e-3
    base, _, _ = _feats(stores / "base")
    auto, _, _ = _feats(stores / "auto")
    assert not np.allclose(base, auto, rtol=1e-3)  # the raw scale differs: only the direction is the same


def test_influence_refuses_unweighted_store(stores, files, tmp_path):
    from rose_select.select.stage import SelectConfig, run_select

    kw = dict(method="influence", pool=str(files[0]), validation=str(files[1]), pool_features=[str(stores / "pool")],
              fraction=0.5, plots=False)
    with pytest.raises(ConfigError, match="ref: base"):
        run_select(SelectConfig(**kw, val_features=[str(stores / "auto")], output=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()
    run_select(SelectConfig(**kw, val_features=[str(stores / "base")], output=str(tmp_path / "b")))
    assert (tmp_path / "b" / "selected.jsonl").exists()


@pytest.mark.parametrize("methods, jobs, ref", [
    (["rose", "less", "random"], ["pool", "val_pairwise+val_sft"], "auto"),
    (["rose", "influence"], ["pool", "val_pairwise"], "base"),
    (["less"], ["pool", "val_sft"], None),
])
def test_pipeline_makes_one_validation_pass(tmp_path, methods, jobs, ref):
    from pathlib import Path

    from rose_select.config import from_dict
    from rose_select.pipeline import RunConfig, featurize_jobs

    cfg = from_dict(RunConfig, {"select": {"methods": methods}})
    got = featurize_jobs(cfg, tmp_path, tmp_path, "pool.jsonl", "val.json", [tmp_path / "ckpt-1"])
    assert [k.split("/")[-1] for k, _ in got] == jobs
    val = got[-1][1]
    if len(jobs[-1].split("+")) == 2:
        assert Path(val.output).name == "val_pairwise" and Path(val.chosen_output).name == "val_sft"
    assert (val.ref if val.loss == "pairwise" else None) == ref


def test_chosen_output_needs_pairwise(tiny_model_dir, ckpt, files, tmp_path):
    with pytest.raises(ConfigError, match="pairwise"):
        _cfg(tiny_model_dir, ckpt, files[1], tmp_path / "a", loss="sft_chosen", chosen_output=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="same directory"):
        _cfg(tiny_model_dir, ckpt, files[1], tmp_path / "a", loss="pairwise", chosen_output=str(tmp_path / "a"))
