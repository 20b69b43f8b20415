import time

import pytest
import torch

from rose_select.errors import CheckpointError, ModelLoadError
from rose_select.checkpoint import load_optimizer_state, save_optimizer_state
from rose_select.modeling import (LoraSettings, attach_lora, canonical_name, load_model, load_tokenizer,
                                  lora_parameters, resolve_model)


def test_canonical_name_strips_prefix_and_adapter():
    assert canonical_name("base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight") == \
        "model.layers.3.self_attn.v_proj.lora_B.weight"
    assert canonical_name("base_model.model.model.layers.3.self_attn.v_proj.lora_A.other.weight") == \
        "model.layers.3.self_attn.v_proj.lora_A.weight"


def test_missing_local_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model path not found"):
        resolve_model(str(tmp_path / "nope"))


def test_lora_defaults_are_the_papers():
    s = LoraSettings()
    assert (s.r, s.alpha, s.dropout, s.target_modules) == (128, 512.0, 0.1, ["q_proj", "k_proj", "v_proj", "o_proj"])


def test_optimizer_state_roundtrips_by_name(tiny_model_dir, tmp_path):
    model = attach_lora(load_model(str(tiny_model_dir)), LoraSettings(r=4, alpha=8))
    params = lora_parameters(model)
    assert len(params) == 2 * 4 * 2  # 2 layers x 4 modules x (A, B)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    tok = load_tokenizer(str(tiny_model_dir))
    ids = torch.tensor([tok("hello world")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    save_optimizer_state(tmp_path / "optimizer_state.safetensors", model, opt, step=1)
    moments, meta = load_optimizer_state(tmp_path, list(params))
    for name, p in params.items():
        torch.testing.assert_close(moments[name][0], opt.state[p]["exp_avg"])
        torch.testing.assert_close(moments[name][1], opt.state[p]["exp_avg_sq"])
    assert meta["step"] == "1" and float(meta["beta2"]) == 0.999
    with pytest.raises(CheckpointError, match="lacks 1 of"):
        load_optimizer_state(tmp_path, list(params) + ["model.layers.9.q_proj.lora_A.weight"])


def test_missing_optimizer_state_names_the_fix(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"\x80pickle")
    with pytest.raises(CheckpointError, match=r"no optimizer_state.safetensors.*optimizer.pt"):
        load_optimizer_state(tmp_path, ["x"])


@pytest.mark.slow
def test_embedded_smollm2_answers_and_cached_load_is_fast():
    from rose_select.records import Message
    from rose_select.tokenization import TokenizeConfig, encode_prompt

    resolve_model("smollm2-135m")  # converts once (about 15 s) if not cached
    t0 = time.perf_counter()
    path = resolve_model("smollm2-135m")
    model = load_model("smollm2-135m")
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"cached load took {elapsed:.2f}s"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    tok = load_tokenizer(path)
    ids = encode_prompt([Message("user", "What is the capital of France?")], tok, TokenizeConfig())
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][len(ids):])
