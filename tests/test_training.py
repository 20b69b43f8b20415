"""Warm-up / final LoRA training on the tiny model: checkpoint format, lr weights, exact resume,
parameters change, and the training loss is the featurizer's SFT loss."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rose_select import checkpoint, modeling
from rose_select.errors import ConfigError, StoreMismatchError
from rose_select.modeling import LoraSettings
from rose_select.tokenization import TokenizeConfig
from rose_select.train.stage import TrainConfig, WarmupConfig, choose_subset, run_train, run_warmup

WORDS = "the quick brown fox jumps over lazy dog bread flour water salt yeast paris france".split()


def write_pool(path, n=40):
    rows = []
    for i in range(n):
        q = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
        a = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(3 + i % 4))
        rows.append({"id": f"ex{i}", "messages": [{"role": "user", "content": f"What about {q}?"},
                                                  {"role": "assistant", "content": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_cfg(cls, model_dir, tmp_path, **kw):
    base = dict(model=str(model_dir), data=str(write_pool(tmp_path / "pool.jsonl")),
                lora=LoraSettings(r=4, alpha=8, dropout=0.1), tokenize=TokenizeConfig(max_length=64),
                epochs=2, lr=1e-2, batch_size=2, grad_accum=2, device="cpu", output=str(tmp_path / "run"))
    base.update(kw)
    return cls(**base)


def adapter_tensors(d):
    return {modeling.canonical_name(k): v for k, v in load_file(str(d / "adapter_model.safetensors")).items()}


def linear_schedule(step: int, total: int, warmup: int, base: float) -> float:
    """Reference: linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return base * step / warmup
    return base * max(0.0, (total - step) / (total - warmup))


def test_subset_helper():
    assert choose_subset(40, 0.25, 3) == choose_subset(40, 0.25, 3) and len(choose_subset(40, 0.25, 3)) == 10


def test_config_validation():
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="one of"):
        TrainConfig(selection="x.jsonl", fraction=0.1)
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    assert WarmupConfig().fraction == 0.05 and WarmupConfig().save_every_epoch


def test_mixed_precision_needs_cuda(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs device cuda"):
        run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, mixed_precision="bf16"))
    assert not (tmp_path / "run").exists()


def test_warmup_checkpoints_and_resume(tiny_model_dir, tmp_path):
    cfg = small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25)
    run = run_warmup(cfg)
    ids = json.loads((run / "warmup_ids.json").read_text())["ids"]
    assert len(ids) == 10
    for e in (1, 2):
        ck = run / f"ckpt-{e}"
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer_state.safetensors",
                "trainer_state.json", "hf_trainer_state.json"} <= {p.name for p in ck.iterdir()}
        state = json.loads((ck / "trainer_state.json").read_text())
        assert state["step"] == 3 * e and [s["step"] for s in state["steps"]] == [3 * e - 2, 3 * e - 1, 3 * e]
        hf = json.loads((ck / "hf_trainer_state.json").read_text())  # the Trainer's own, for resume
        assert hf["global_step"] == 3 * e and len([h for h in hf["log_history"] if "learning_rate" in h]) == 3 * e
    # Adam moments load by canonical name, shapes match the LoRA parameters
    model = modeling.load_adapter(modeling.load_model(str(tiny_model_dir)), run / "ckpt-2")
    params = modeling.lora_parameters(model)
    moments, meta = checkpoint.load_optimizer_state(run / "ckpt-2", list(params))
    assert meta["step"] == "6" and float(meta["eps"]) == 1e-8
    for name, p in params.items():
        m, v = moments[name]
        assert m.shape == v.shape == p.shape and (v >= 0).all() and v.abs().max() > 0
    # the lr of every step: the paper's linear schedule (10 examples, batch 2 x 2 -> 3 steps/epoch,
    # 6 steps, ceil(0.03 * 6) = 1 warm-up step)
    log = json.loads((run / "lr_log.json").read_text())
    assert [s["lr"] for s in log["steps"]] == pytest.approx([linear_schedule(s, 6, 1, 1e-2) for s in range(6)])
    assert [s["epoch"] for s in log["steps"]] == [1, 1, 1, 2, 2, 2]
    assert log["epoch_mean_lr"] == pytest.approx([0.006, 0.004])
    assert log["checkpoint_weights"] == pytest.approx([0.6, 0.4])
    # resume: drop the last checkpoint, rerun: the same bytes of weights and moments as uninterrupted
    full = adapter_tensors(run / "ckpt-2")
    full_opt = load_file(str(run / "ckpt-2" / "optimizer_state.safetensors"))
    shutil.rmtree(run / "ckpt-2")
    run_warmup(cfg)
    resumed = adapter_tensors(run / "ckpt-2")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    for k, v in load_file(str(run / "ckpt-2" / "optimizer_state.safetensors")).items():
        assert torch.equal(v, full_opt[k]), k
    assert json.loads((run / "lr_log.json").read_text()) == log
    # a kill after the last checkpoint but before the run-level logs: a rerun restores them from it
    (run / "lr_log.json").write_text("{}")
    run_warmup(cfg)
    assert json.loads((run / "lr_log.json").read_text()) == log
    # a fresh run with the same seed in another directory: the same bytes (deterministic on CPU)
    again = run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25, output=str(tmp_path / "again")))
    assert all(torch.equal(adapter_tensors(again / "ckpt-2")[k], full[k]) for k in full)
    # other settings in the same dir are refused
    with pytest.raises(StoreMismatchError, match="lr"):
        run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25, lr=5e-3))


def test_final_training_changes_adapter(tiny_model_dir, tmp_path):
    cfg = small_cfg(TrainConfig, tiny_model_dir, tmp_path, fraction=0.25, epochs=1)
    run = run_train(cfg)
    trained = adapter_tensors(run / "adapter")
    torch.manual_seed(cfg.seed)
    fresh = modeling.lora_parameters(modeling.attach_lora(modeling.load_model(str(tiny_model_dir)), cfg.lora))
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[k], fresh[k].detach()) for k in trained if ".lora_A." in k)
    for k in trained:
        if ".lora_B." in k:
            assert fresh[k].abs().max() == 0 and trained[k].abs().max() > 0
    log = json.loads((run / "train_log.json").read_text())
    assert len(log["steps"]) == 3 and all("loss" in s for s in log["steps"])


def test_selection_file_training(tiny_model_dir, tmp_path):
    sel = tmp_path / "selected.jsonl"
    rows = [json.loads(line) for line in write_pool(tmp_path / "p.jsonl", 6).read_text().splitlines()]
    sel.write_text("".join(json.dumps({**r, "score": 0.5}) + "\n" for r in rows))
    cfg = small_cfg(TrainConfig, tiny_model_dir, tmp_path, selection=str(sel), epochs=1, data="")
    run = run_train(cfg)
    assert (run / "adapter" / "adapter_config.json").exists()
    assert len(json.loads((run / "train_log.json").read_text())["steps"]) == 2


def test_training_loss_is_featurizer_sft_loss(tiny_model_dir, tmp_path):
    from rose_select import data
    from rose_select.losses import sft_loss_per_example
    from rose_select.tokenization import collate, encode_record

    # one step over the whole (5-example) subset, no dropout: the logged loss is the mean per-example
    # response-token CE of the initial model (LoRA B = 0, so the base model)
    cfg = small_cfg(TrainConfig, tiny_model_dir, tmp_path, fraction=0.125, epochs=1, batch_size=2, grad_accum=3,
                    lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    run = run_train(cfg)
    pool = data.load_pool(cfg.data)
    chosen = [pool[i] for i in choose_subset(len(pool), 0.125, cfg.seed)]
    model, tok = modeling.load_model(str(tiny_model_dir)), modeling.load_tokenizer(str(tiny_model_dir))
    b = collate([encode_record(r, tok, cfg.tokenize) for r in chosen], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    expected = sft_loss_per_example(logits, b["labels"]).mean().item()
    steps = json.loads((run / "train_log.json").read_text())["steps"]
    assert len(steps) == 1
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-5)


def _warmup_argv(model_dir, pool, out, **kw):
    flags = {"model": model_dir, "data": pool, "fraction": 0.25, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
             "tokenize.max-length": 64, "epochs": 2, "lr": 1e-2, "grad-accum": 2, "device": "cpu", "output": out, **kw}
    return ["warmup", *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]]


def _rose(argv, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "rose_select", *argv], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_two_processes_equal_one_process(tiny_model_dir, tmp_path, one_thread):
    """DDP over 2 gloo processes with batch 1 each == 1 process with batch 2 (same effective batch
    of 2 x 2 accumulation): the same examples in every step, the loss averaged over the same 4.
    Tolerance: float sums in another order, |dW| <= 1e-6 and moments within 1e-4 of their scale."""
    pool = write_pool(tmp_path / "pool.jsonl")
    one = _rose(_warmup_argv(tiny_model_dir, pool, tmp_path / "one", batch_size=2))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _rose(["warmup", "--nproc", "2", *_warmup_argv(tiny_model_dir, pool, tmp_path / "two", batch_size=1)[1:]])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]  # printed once, by rank 0
    for e in (1, 2):
        a, b = adapter_tensors(tmp_path / "one" / f"ckpt-{e}"), adapter_tensors(tmp_path / "two" / f"ckpt-{e}")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        ma = load_file(str(tmp_path / "one" / f"ckpt-{e}" / "optimizer_state.safetensors"))
        mb = load_file(str(tmp_path / "two" / f"ckpt-{e}" / "optimizer_state.safetensors"))
        assert ma.keys() == mb.keys()
        for k in ma:
            assert (ma[k] - mb[k]).abs().max() <= 1e-4 * ma[k].abs().max(), k
    la, lb = (json.loads((tmp_path / n / "lr_log.json").read_text()) for n in ("one", "two"))
    assert la == lb
    config = json.loads((tmp_path / "two" / "config.json").read_text())["config"]
    assert config["processes"] == 2 and config["engine"]
    # resuming in another number of processes would change the per-step batch: refused
    again = _rose(_warmup_argv(tiny_model_dir, pool, tmp_path / "two", batch_size=1))
    assert again.returncode == 2 and "differing keys: ['processes']" in again.stderr, again.stderr[-2000:]


def test_sigkill_then_resume_continues_the_schedule(tiny_model_dir, tmp_path, one_thread):
    pool = write_pool(tmp_path / "pool.jsonl")
    argv = _warmup_argv(tiny_model_dir, pool, tmp_path / "killed", epochs=3, fraction=1.0, batch_size=1, grad_accum=1)
    proc = subprocess.Popen([sys.executable, "-m", "rose_select", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    first = tmp_path / "killed" / "ckpt-1"
    deadline = time.monotonic() + 240
    try:
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert first.exists() and not (tmp_path / "killed" / "ckpt-3").exists()  # killed inside the run
    resumed = _rose(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _rose(_warmup_argv(tiny_model_dir, pool, tmp_path / "whole", epochs=3, fraction=1.0, batch_size=1,
                               grad_accum=1))
    assert whole.returncode == 0, whole.stderr[-3000:]
    logs = [json.loads((tmp_path / n / "lr_log.json").read_text()) for n in ("killed", "whole")]
    assert logs[0] == logs[1] and len(logs[0]["steps"]) == 3 * 40
    a, b = adapter_tensors(tmp_path / "killed" / "ckpt-3"), adapter_tensors(tmp_path / "whole" / "ckpt-3")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "killed").glob(".ckpt-*"))  # no temporary left behind after the resume


def test_gradient_checkpointing_changes_memory_not_the_result(tiny_model_dir, tmp_path):
    plain = run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25, epochs=1))
    ckpt = run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25, epochs=1,
                                gradient_checkpointing=True, output=str(tmp_path / "ckpt")))
    a, b = adapter_tensors(plain / "ckpt-1"), adapter_tensors(ckpt / "ckpt-1")
    for k in a:  # LoRA dropout 0.1 included: the recomputed forward replays the same masks
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_non_finite_training_loss_names_the_example_and_leaves_nothing(tmp_path):
    from rose_select.errors import NonFiniteError
    from rose_select.testing import poison_embeddings, write_tiny_model_dir

    model = write_tiny_model_dir(tmp_path / "model")
    poison_embeddings(model, "~~~~")
    pool = tmp_path / "poisoned.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": f"Question {i}?"},
        {"role": "assistant", "content": "~~~~" if i == 3 else f"Flour {i}."}]}) + "\n" for i in range(6)))
    cfg = small_cfg(WarmupConfig, model, tmp_path, data=str(pool), fraction=1.0, batch_size=6, grad_accum=1)
    with pytest.raises(NonFiniteError, match=r"non-finite training loss for example\(s\) \['p3'\]"):
        run_warmup(cfg)
    assert not (tmp_path / "run").exists()  # a first run that failed before its first checkpoint
