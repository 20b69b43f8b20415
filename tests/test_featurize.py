"""The featurize stage end to end on the tiny model: store, resume, byte-identical restarts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rose_select.errors import ConfigError, StoreMismatchError
from rose_select.features.stage import FeaturizeConfig, run_featurize
from rose_select.tokenization import TokenizeConfig
from rose_select.modeling import load_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    pool = d / "pool.jsonl"
    with open(pool, "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": f"p{i}", "messages": [
                {"role": "user", "content": "What is the capital of France?" * (1 + i % 3)},
                {"role": "assistant", "content": "Paris is the capital." + " yes" * i}]}) + "\n")
    prefs = d / "prefs.jsonl"
    with open(prefs, "w") as f:
        for i in range(5):
            f.write(json.dumps({"id": f"v{i}", "subtask": f"s{i % 2}", "prompt": "How do I bake bread?" + "!" * i,
                                "chosen": "Mix flour and water." + " knead" * i, "rejected": "No."}) + "\n")
    return pool, prefs


def _cfg(tiny_model_dir, ckpt, data, out, **kw):
    base = dict(model=str(tiny_model_dir), checkpoint=str(ckpt), data=str(data), output=str(out),
                dim=32, batch_size=3, tokenize=TokenizeConfig(max_length=64), store_dtype="float32")
    base.update(kw)
    return FeaturizeConfig(**base)


def _read(out):
    from rose_select.features.store import open_features

    feats, meta, rows = open_features(out)
    return np.array(feats), meta, rows


@pytest.mark.parametrize("loss", ["sft", "pairwise", "sft_chosen"])
def test_end_to_end_resume_and_restart(tiny_model_dir, ckpt, files, tmp_path, loss, monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    data = files[0] if loss == "sft" else files[1]
    cfg = _cfg(tiny_model_dir, ckpt, data, tmp_path / "full", loss=loss)
    run_featurize(cfg)
    full, meta, rows = _read(tmp_path / "full")
    assert full.shape == (7 if loss == "sft" else 5, 32) and np.isfinite(full).all()
    assert np.abs(full).min(axis=1).max() > 0
    if loss != "sft":
        assert rows["groups"] == ["s0", "s1", "s0", "s1", "s0"]

    import rose_select.features.gradients as G
    calls = []
    orig = G.per_example_features
    monkeypatch.setattr(G, "per_example_features", lambda *a, **k: calls.append(1) or orig(*a, **k))
    run_featurize(cfg)  # complete: no new work
    assert calls == []

    part = _cfg(tiny_model_dir, ckpt, data, tmp_path / "part", loss=loss)
    run_featurize(part, stop_after_batches=1)
    assert calls == [1]
    run_featurize(part)
    resumed, _, _ = _read(tmp_path / "part")
    assert resumed.tobytes() == full.tobytes()


def test_mismatch_and_validation(tiny_model_dir, ckpt, files, tmp_path, monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    out = tmp_path / "s"
    run_featurize(_cfg(tiny_model_dir, ckpt, files[0], out, limit=3))
    with pytest.raises(StoreMismatchError):
        run_featurize(_cfg(tiny_model_dir, ckpt, files[0], out, limit=3, seed=1))
    with pytest.raises(ConfigError, match="adam"):
        _cfg(tiny_model_dir, ckpt, files[1], out, loss="pairwise", adam=True)
    with pytest.raises(ConfigError):
        _cfg(tiny_model_dir, ckpt, files[1], out, loss="sft", data_kind="preference")


def test_sft_features_match_loop_projection(tiny_model_dir, ckpt, files, tmp_path, monkeypatch):
    """Stored (projected, Adam) features == the LESS-style loop on the same rows."""
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    from rose_select.features import gradients as G
    from rose_select.data import load_pool
    from rose_select.modeling import load_adapter, load_tokenizer
    from rose_select.features.projection import make_projector
    from rose_select.tokenization import TokenizeConfig, collate, encode_record

    out = tmp_path / "f"
    run_featurize(_cfg(tiny_model_dir, ckpt, files[0], out, padding_side="left"))
    feats, _, _ = _read(out)
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_adapter(load_model(str(tiny_model_dir)), ckpt).eval()
    adam = G.load_adam_state(ckpt, model)
    proj = make_projector("sjlt", 32, 0, dict(G.param_numels(model)))
    encs = [encode_record(r, tok, TokenizeConfig(max_length=64)) for r in load_pool(files[0])]
    ref = G.loop_features(model, [collate([e], tok.pad_token_id) for e in encs], G.sft_loss_fn, proj, adam=adam)
    np.testing.assert_allclose(feats, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_cpu_autocast_is_applied_and_auto_stays_float32(tiny_model_dir, ckpt, files, tmp_path, monkeypatch):
    """``autocast: bfloat16`` on the CPU runs the forward in bf16 (it used to be ignored there in
    silence): its features differ from float32's, yet point the same way; ``auto`` on the CPU is
    float32, byte for byte."""
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    runs = {}
    for name in ("none", "auto", "bfloat16"):
        run_featurize(_cfg(tiny_model_dir, ckpt, files[0], tmp_path / name, autocast=name))
        runs[name] = _read(tmp_path / name)[0]
    assert runs["auto"].tobytes() == runs["none"].tobytes()
    full, bf16 = runs["none"], runs["bfloat16"]
    assert not np.array_equal(full, bf16)
    cos = (full * bf16).sum(1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() > 0.98, cos


def test_a_store_records_its_precision_and_the_fidelity_measured_for_it(tiny_model_dir, ckpt, files, tmp_path,
                                                                        monkeypatch):
    """meta.json says what the features were computed in (weights, adapter, autocast, storage) and
    what bench/bf16_fidelity.py measured for that precision against float32; float32 is the exact
    path itself."""
    from rose_select.data.builtin import asset_path
    from rose_select.features.stage import PRECISION_FIDELITY

    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    table = json.loads(asset_path(PRECISION_FIDELITY).read_text())
    expected = {"none": ("float32", "float32", None, "float32"),
                "bfloat16": ("float32", "float32", "bfloat16", "bf16_autocast"),
                "weights": ("bfloat16", None, None, "bf16_weights")}
    for name, (weights, adapter, autocast, mode) in expected.items():
        kw = {"model_dtype": "bfloat16"} if name == "weights" else {"autocast": name}
        run_featurize(_cfg(tiny_model_dir, ckpt, files[0], tmp_path / name, store_dtype="float16", **kw))
        got = _read(tmp_path / name)[1]["precision"]
        assert (got["base_weights"], got["autocast"], got["mode"], got["store"]) == (weights, autocast, mode, "float16")
        if adapter:
            assert got["adapter"] == adapter
        assert got["fidelity"]["source"] == table["source"]
        assert got["fidelity"]["compute"] == ({"exact": True} if mode == "float32" else table["modes"].get(mode))
        assert got["fidelity"]["store"] == table["modes"].get("float16_store")


def test_a_store_resumes_from_its_inputs_at_another_path_and_refuses_other_content(tiny_model_dir, ckpt, files,
                                                                                  tmp_path, monkeypatch):
    """Paths say where the inputs were read, not what they were: the same data file and checkpoint
    copied elsewhere (a reinstalled package, a moved run) reuse the finished store; a data file of
    other content at the first path is refused, naming its hash."""
    import shutil

    import rose_select.features.gradients as G

    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    out = tmp_path / "store"
    run_featurize(_cfg(tiny_model_dir, ckpt, files[0], out))
    before = (out / "features.npy").read_bytes()
    moved = tmp_path / "moved"
    moved.mkdir()
    data, checkpoint = shutil.copy(files[0], moved / "pool.jsonl"), shutil.copytree(ckpt, moved / "ckpt")
    calls = []
    orig = G.per_example_features
    monkeypatch.setattr(G, "per_example_features", lambda *a, **k: calls.append(1) or orig(*a, **k))
    run_featurize(_cfg(tiny_model_dir, checkpoint, data, out))
    assert calls == [] and (out / "features.npy").read_bytes() == before
    other = tmp_path / "other.jsonl"
    other.write_text(open(files[0]).read().replace("Paris", "Lyon"))
    with pytest.raises(StoreMismatchError, match="data_sha256"):
        run_featurize(_cfg(tiny_model_dir, checkpoint, other, out))
