"""The bad-input catalogue of the featurize stage: every malformed input stops with a clear
``RoseError`` naming where (file, line or record) and what (field), and leaves no output behind:
the output directory is never created, and an existing store is unchanged byte for byte."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from rose_select.errors import (CheckpointError, ConfigError, DataError, ModelLoadError, NonFiniteError,
                                StoreMismatchError)
from rose_select.features.stage import FeaturizeConfig, run_featurize
from rose_select.modeling import LoraSettings
from rose_select.tokenization import TokenizeConfig

MSGS = [{"role": "user", "content": "Tell me about bread."}, {"role": "assistant", "content": "Flour and water."}]
GOOD = json.dumps({"id": "p0", "messages": MSGS}) + "\n"
ROSE_OUT_OF_RANGE = json.dumps({
    "Q1?": {"responses": ["a", "b"], "pairs": [[0, 1]], "sft_target": "a", "rejected_target": "b"},
    "Q2?": {"responses": ["a", "b"], "pairs": [[0, 2]], "sft_target": "a", "rejected_target": "b"}}, indent=1)


def _pref(**row) -> str:
    return json.dumps({"id": "v0", "prompt": "How do I bake bread?", "chosen": "Knead.", "rejected": "No.",
                       **row}) + "\n"


# name: (file name, contents, config changes, (line, record, field) expected, message pattern)
DATA_CASES = {
    "bad_json": ("pool.jsonl", GOOD + '{"id": "p1", "messages": [\n', {}, (2, "1", None), "malformed JSON"),
    "wrong_type": ("pool.jsonl", '{"id": "p0", "messages": "hi"}\n', {}, (1, "0", "messages"),
                   "expected a list, got str"),
    "wrong_type_turn": ("pool.jsonl", json.dumps({"id": "p0", "messages": [MSGS[0], {"role": "assistant",
                        "content": 5}]}) + "\n", {}, (1, "0", "messages[1].content"), "expected a string, got int"),
    "wrong_type_id": ("pool.jsonl", json.dumps({"id": [1], "messages": MSGS}) + "\n", {}, (1, "0", "id"),
                      "id must be a string or integer"),
    "missing_field": ("pool.jsonl", '{"id": "p0", "instruction": "Do it."}\n', {"data_format": "alpaca"},
                      (1, "0", "output|response"), "missing field"),
    "empty_field": ("pool.jsonl", '{"id": "p0", "instruction": "  ", "output": "ok"}\n', {}, (1, "0", "instruction"),
                    "empty string"),
    "duplicate_id": ("pool.jsonl", GOOD + GOOD, {}, (2, "1", "id"), r"duplicate id 'p0' \(first at line 1\)"),
    "pref_wrong_type": ("prefs.jsonl", _pref(chosen=5), {"loss": "pairwise"}, (1, "0", "chosen"),
                        "expected a string, got int"),
    "pref_missing_field": ("prefs.jsonl", _pref(rejected=None).replace(', "rejected": null', ""),
                           {"loss": "pairwise"}, (1, "0", "rejected"), "missing field"),
    "pref_empty_field": ("prefs.jsonl", _pref(chosen=" "), {"loss": "sft_chosen"}, (1, "0", "chosen"),
                         "empty string"),
    "pref_duplicate_id": ("prefs.jsonl", _pref() + _pref(), {"loss": "pairwise"}, (2, "1", "id"), "duplicate id 'v0'"),
    "pair_out_of_range": ("val.json", ROSE_OUT_OF_RANGE, {"loss": "pairwise"}, (None, "1", "pairs"),
                          r"pairs\[0\] = \[0, 2\] out of range for 2 responses \(prompt 'Q2\?'\)"),
    "lone_surrogate": ("pool.jsonl", json.dumps({"id": "p0", "messages": [MSGS[0], {
        "role": "assistant", "content": "x \ud800"}]}) + "\n", {}, (1, "0", "messages[1].content"),
        r"lone surrogate \\ud800"),  # issue 11 case 6: was a TypeError traceback in tokenisation
    "all_truncated": ("pool.jsonl", json.dumps({"id": "p0", "messages": [
        {"role": "user", "content": "bread " * 40}, MSGS[1]]}) + "\n", {"tokenize": TokenizeConfig(max_length=16, truncation="keep_start")},
        (None, "p0", "messages"), "no response token left after truncation to max_length=16"),
}


def _cfg(model, data, out, **kw) -> FeaturizeConfig:
    base = dict(model=str(model), data=str(data), output=str(out), adam=False, dim=16, batch_size=8,
                tokenize=TokenizeConfig(max_length=64), lora=LoraSettings(r=2, alpha=4.0, dropout=0.0))
    if kw.get("loss", "sft") != "sft":
        base["adam"] = None
    return FeaturizeConfig(**{**base, **kw})


def _snapshot(path) -> dict:
    """Name -> sha256 of every file under ``path`` (hidden temporaries included)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")


@pytest.mark.parametrize("case", DATA_CASES)
def test_malformed_data_names_file_line_record_field(case, tiny_model_dir, tmp_path):
    name, text, changes, (line, record, field), pattern = DATA_CASES[case]
    data = tmp_path / name
    data.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern) as err:
        run_featurize(_cfg(tiny_model_dir, data, out, **changes))
    e = err.value
    assert (e.path, e.line, e.record, e.field) == (str(data), line, record, field)
    assert str(data) in str(e) and (field is None or f"field {field!r}" in str(e))
    assert list(tmp_path.iterdir()) == [data]  # no output, not even a temporary


def test_non_finite_loss_names_the_example(tmp_path):
    from rose_select.testing import poison_embeddings, write_tiny_model_dir

    model = write_tiny_model_dir(tmp_path / "model")
    poison_embeddings(model, "~~~~")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": [MSGS[0], {
        "role": "assistant", "content": "~~~~" if i == 4 else f"Flour {i}."}]}) + "\n" for i in range(6)))
    with pytest.raises(NonFiniteError, match=r"non-finite loss for 1 item\(s\): \['p4'\]") as err:
        run_featurize(_cfg(model, pool, tmp_path / "out"))
    assert str(pool) in str(err.value) and "NaN/inf weights" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_model_and_checkpoint(tiny_model_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(GOOD)
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match=f"model path not found: {tmp_path / 'no_model'}"):
        run_featurize(_cfg(tmp_path / "no_model", pool, out))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'no_ckpt'}: no adapter_config.json"):
        run_featurize(_cfg(tiny_model_dir, pool, out, checkpoint=str(tmp_path / "no_ckpt"), adam=False))
    with pytest.raises(DataError, match="file not found") as err:
        run_featurize(_cfg(tiny_model_dir, tmp_path / "no_pool.jsonl", out))
    assert err.value.path == str(tmp_path / "no_pool.jsonl")
    assert not out.exists()


def test_adam_needs_optimizer_state(tiny_model_dir, tmp_path):
    from rose_select.modeling import attach_lora, load_model

    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    attach_lora(load_model(str(tiny_model_dir)), LoraSettings(r=2, alpha=4.0)).save_pretrained(ckpt)
    pool = tmp_path / "pool.jsonl"
    pool.write_text(GOOD)
    with pytest.raises(CheckpointError, match=r"no optimizer_state.safetensors \(nor a Trainer.s optimizer.pt/.bin\), needed for Adam.*--adam false"):
        run_featurize(_cfg(tiny_model_dir, pool, tmp_path / "out", checkpoint=str(ckpt), adam=True))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="adam=true needs a checkpoint"):
        _cfg(tiny_model_dir, pool, tmp_path / "out", adam=True)


@pytest.mark.parametrize("partial", [False, True])
def test_store_with_other_settings_is_left_byte_identical(tiny_model_dir, tmp_path, partial):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": MSGS}) + "\n" for i in range(5)))
    out = tmp_path / "store"
    run_featurize(_cfg(tiny_model_dir, pool, out, batch_size=2), stop_after_batches=1 if partial else None)
    before = _snapshot(tmp_path)
    with pytest.raises(StoreMismatchError, match=r"settings.projection.seed: stored 0, requested 1") as err:
        run_featurize(_cfg(tiny_model_dir, pool, out, batch_size=2, seed=1))
    assert f"{out} holds features made with other settings" in str(err.value)
    with pytest.raises(StoreMismatchError, match=r"dim: stored 16, requested 8"):
        run_featurize(_cfg(tiny_model_dir, pool, out, batch_size=2, dim=8))
    pool.write_text(pool.read_text().replace("Flour", "Yeast"))  # same file name, other contents
    with pytest.raises(StoreMismatchError, match="settings.data_sha256"):
        run_featurize(_cfg(tiny_model_dir, pool, out, batch_size=2))
    after = _snapshot(tmp_path)
    del before["pool.jsonl"], after["pool.jsonl"]
    assert after == before


def test_foreign_output_directory_is_untouched(tiny_model_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(GOOD)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(StoreMismatchError, match="exists but is not a feature store"):
        run_featurize(_cfg(tiny_model_dir, pool, out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_cli_prints_the_error_and_exits_2(tiny_model_dir, tmp_path, capsys):
    from rose_select.cli import main

    pool = tmp_path / "pool.jsonl"
    pool.write_text(GOOD + "{not json\n")
    status = main(["featurize", "--model", str(tiny_model_dir), "--data", str(pool), "--adam", "false",
                   "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and f"rose featurize: error: {pool}, line 2, record '1': malformed JSON" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(["featurize", "--nproc", "0", "--data", str(pool), "--output", "x"]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err


class _Payload:
    """Unpickling this runs ``touch <marker>``: a stand-in for code hidden in a pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoints_are_refused_without_running_code(tiny_model_dir, tmp_path):
    """Models, adapters and stores are read as safetensors / plain arrays; a pickle that holds
    anything but tensors is refused by ``torch.load(weights_only=True)`` and its code never runs."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file

    from rose_select.modeling import attach_lora, load_adapter, load_model

    marker = tmp_path / "code_ran"
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save({**weights, "payload": _Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refusing a pickled checkpoint"):
        load_model(str(model_dir))

    adapter = tmp_path / "adapter"
    attach_lora(load_model(str(tiny_model_dir)), LoraSettings(r=2, alpha=4.0)).save_pretrained(adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({**weights, "payload": _Payload(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="refusing a pickled adapter"):
        load_adapter(load_model(str(tiny_model_dir)), adapter)

    pool = tmp_path / "pool.jsonl"
    pool.write_text(GOOD)
    out = tmp_path / "store"
    run_featurize(_cfg(tiny_model_dir, pool, out))
    bad = np.empty((1, 16), dtype=object)
    bad[0, 0] = _Payload(marker)
    np.save(out / "features.npy", bad, allow_pickle=True)
    from rose_select.features.store import open_features

    with pytest.raises(StoreMismatchError, match="not a plain numeric array"):
        open_features(out)
    assert not marker.exists()
