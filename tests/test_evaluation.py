"""Evaluation metrics against a direct per-token computation; base model = zero rewards; judges."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rose_select import modeling
from rose_select.judges import pairwise_outcome, reward_outcome
from rose_select.evaluation import (EvalConfig, evaluate_preferences,
                                    preference_metrics, run_evaluate)
from rose_select.data import parse_transcript
from rose_select.modeling import LoraSettings
from rose_select.records import Message, PreferenceTriple
from rose_select.tokenization import TokenizeConfig, encode_triple


def triples():
    p = lambda q: [Message("user", q)]
    return [PreferenceTriple("t0", "bread", p("How do I bake bread?"), "Mix flour, water and yeast.", "No."),
            PreferenceTriple("t1", "bread", p("Is it yes?"), "I think the answer is yes.", "The fox jumps over it."),
            PreferenceTriple("t2", "france", p("What is the capital of France?"), "Paris.", "It is the lazy dog, not Paris.")]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (nonzero) B so that π differs from π_ref."""
    torch.manual_seed(1)
    model = modeling.attach_lora(modeling.load_model(str(tiny_model_dir)), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in modeling.lora_parameters(model).items():
            p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out))
    return out


def manual_logp(model, enc) -> tuple[float, int]:
    """Summed response log-prob by an explicit loop over positions."""
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total, n = 0.0, 0
    for t in range(1, len(enc["labels"])):
        if enc["labels"][t] != -100:
            total += float(logp[t - 1, enc["labels"][t]])
            n += 1
    return total, n


def test_metrics_match_direct_computation(tiny_model_dir, adapter_dir, tmp_path):
    cfg = EvalConfig(model=str(tiny_model_dir), adapter=str(adapter_dir), tokenize=TokenizeConfig(max_length=64), batch_size=2,
                     device="cpu", output=str(tmp_path / "eval"))
    run = run_evaluate(cfg, triples=triples())
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "metrics.md").read_text().startswith("| subtask |")
    tok = modeling.load_tokenizer(str(tiny_model_dir))
    base = modeling.load_model(str(tiny_model_dir))
    tuned = modeling.load_adapter(modeling.load_model(str(tiny_model_dir)), adapter_dir, trainable=False).merge_and_unload()
    rows = []
    for t in triples():
        enc = encode_triple(t, tok, TokenizeConfig(max_length=64))
        (pw, nw), (pl, nl) = manual_logp(tuned, enc["chosen"]), manual_logp(tuned, enc["rejected"])
        (rw, _), (rl, _) = manual_logp(base, enc["chosen"]), manual_logp(base, enc["rejected"])
        rows.append((pw, pl, rw, rl, nw, nl, -pw / nw))
    b = 0.1
    acc = np.mean([b * (pw - rw) > b * (pl - rl) for pw, pl, rw, rl, *_ in rows])
    margin = np.mean([b * (pw - rw) - b * (pl - rl) for pw, pl, rw, rl, *_ in rows])
    loss = np.mean([-math.log(1 / (1 + math.exp(-(b * (pw - rw) - b * (pl - rl))))) for pw, pl, rw, rl, *_ in rows])
    o = metrics["overall"]
    assert o["n"] == 3 and o["rewards/accuracies"] == pytest.approx(acc)
    assert o["rewards/margins"] == pytest.approx(margin, rel=1e-4, abs=1e-5)
    assert o["loss/pairwise"] == pytest.approx(loss, rel=1e-4)
    assert o["loss/sft"] == pytest.approx(np.mean([r[6] for r in rows]), rel=1e-4)
    assert o["logps/accuracy"] == pytest.approx(np.mean([r[0] > r[1] for r in rows]))
    assert o["logps/accuracy_normalized"] == pytest.approx(np.mean([r[0] / r[4] > r[1] / r[5] for r in rows]))
    assert metrics["per_subtask"]["bread"]["n"] == 2 and metrics["per_subtask"]["france"]["n"] == 1
    assert o["rewards/margins"] != 0


def test_reference_cache_is_reused_and_gives_the_same_metrics(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    from rose_select import evaluation

    common = dict(model=str(tiny_model_dir), tokenize=TokenizeConfig(max_length=64), batch_size=2, device="cpu")
    plain = json.loads((run_evaluate(EvalConfig(**common, adapter=str(adapter_dir), output=str(tmp_path / "a")),
                                     triples=triples()) / "metrics.json").read_text())
    cache = tmp_path / "ref.npz"
    run_evaluate(EvalConfig(**common, reference_cache=str(cache), output=str(tmp_path / "base")), triples=triples())
    assert cache.exists()
    calls = []
    real = evaluation.sequence_stats
    monkeypatch.setattr(evaluation, "sequence_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = json.loads((run_evaluate(EvalConfig(**common, adapter=str(adapter_dir), reference_cache=str(cache),
                                                 output=str(tmp_path / "b")), triples=triples()) / "metrics.json").read_text())
    assert len(calls) == 1  # the policy pass only; the reference came from the cache
    for k in ("rewards/accuracies", "rewards/margins", "loss/pairwise", "loss/sft"):
        assert cached["overall"][k] == pytest.approx(plain["overall"][k], rel=1e-6, abs=1e-9)
    calls.clear()  # other pairs: the key differs, so the reference is computed again
    run_evaluate(EvalConfig(**common, adapter=str(adapter_dir), reference_cache=str(cache), output=str(tmp_path / "c")),
                 triples=triples()[:2])
    assert len(calls) == 2


def test_base_model_has_zero_rewards(tiny_model_dir):
    tok, model = modeling.load_tokenizer(str(tiny_model_dir)), modeling.load_model(str(tiny_model_dir))
    out = evaluate_preferences(model, tok, triples(), EvalConfig(tokenize=TokenizeConfig(max_length=64)))["overall"]
    assert out["rewards/margins"] == 0.0 and out["rewards/chosen"] == 0.0 and out["rewards/accuracies"] == 0.0
    assert out["loss/pairwise"] == pytest.approx(math.log(2))


def test_pure_helpers():
    m = preference_metrics([-1.0, -5.0], [-2.0, -4.0], [-1.5, -5.0], [-1.5, -5.0], [2, 10], [4, 2], [0.5, 1.5], beta=0.1)
    assert m["rewards/accuracies"] == 0.5 and m["rewards/margins"] == pytest.approx((0.1 + -0.1) / 2)
    assert m["logps/accuracy"] == 0.5 and m["logps/accuracy_normalized"] == 0.5 and m["loss/sft"] == 1.0
    assert reward_outcome(2.0, 1.0) == 1.0 and reward_outcome(1.0, 1.0) == 0.5 and reward_outcome(0.0, 1.0) == 0.0
    assert pairwise_outcome(True, False) == 1.0 and pairwise_outcome(False, True) == 0.0
    assert pairwise_outcome(True, True) == 0.5 and pairwise_outcome(False, False) == 0.5
    msgs = parse_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bake?\n\nAssistant:")
    assert [m.role for m in msgs] == ["user", "assistant", "user"] and msgs[-1].content == "bake?"


def write_test_prompts(root):
    d = root / "tst"
    d.mkdir()
    rows = [{"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:", "golden_answer": "Mix flour and water."},
            {"prompt": "\n\nHuman: Capital of France?\n\nAssistant:", "golden_answer": "Paris."}]
    (d / "tst_cooking.json").write_text(json.dumps(rows))
    return d


def write_reward_model(path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = modeling.load_tokenizer(str(tiny_model_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["reward", "pairwise"])
def test_judge_win_rate(kind, tiny_model_dir, adapter_dir, tmp_path):
    judge = write_reward_model(tmp_path / "rm", tiny_model_dir) if kind == "reward" else tiny_model_dir
    cfg = EvalConfig(model=str(tiny_model_dir), adapter=str(adapter_dir), test_prompts=str(write_test_prompts(tmp_path)),
                     judge=str(judge), max_new_tokens=4, tokenize=TokenizeConfig(max_length=64), device="cpu", output=str(tmp_path / "eval"))
    run = run_evaluate(cfg, triples=triples())
    metrics = json.loads((run / "metrics.json").read_text())
    sub = metrics["per_subtask"]["cooking"]
    assert sub["n_prompts"] == 2 and 0.0 <= sub["judge/win_rate"] <= 1.0
    assert np.isfinite(sub["golden/logp"]) and sub["golden/logp"] < 0
    assert 0.0 <= metrics["overall"]["judge/win_rate"] <= 1.0
    gens = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 and all(g["win"] in (0.0, 0.5, 1.0) for g in gens)
