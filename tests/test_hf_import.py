"""Bring your own warm-up: a checkpoint written by a plain transformers.Trainer + peft run (its
native pickled optimizer.pt, integer-keyed state) featurizes to the same features as the project's
own checkpoint of the same weights and moments; `rose warmup --import` converts such a run; counts,
shapes and pickles that do not fit are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rose_select import checkpoint, data, modeling
from rose_select.errors import CheckpointError
from rose_select.features.stage import FeaturizeConfig, run_featurize
from rose_select.features.store import open_features
from rose_select.checkpoint import import_trainer_run, read_trainer_moments
from rose_select.modeling import LoraSettings
from rose_select.select.methods import warmup_lrs
from rose_select.tokenization import TokenizeConfig, collate, encode_record

from test_training import write_pool

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def hf_run(tiny_model_dir, tmp_path_factory):
    """A plain Trainer + peft run (2 epochs, a checkpoint per epoch) and the project's own
    checkpoint of its final weights and moments, taken from the live optimizer by name."""
    from transformers import Trainer, TrainingArguments

    tmp = tmp_path_factory.mktemp("hf")
    pool = write_pool(tmp / "pool.jsonl", 12)
    tok = modeling.load_tokenizer(str(tiny_model_dir))
    rows = [encode_record(r, tok, TokenizeConfig(max_length=64)) for r in data.load_pool(pool)]
    torch.manual_seed(0)
    model = modeling.attach_lora(modeling.load_model(str(tiny_model_dir)), LORA)
    args = TrainingArguments(output_dir=str(tmp / "run"), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, warmup_steps=0.03, save_strategy="epoch", logging_steps=1,
                             report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=lambda b: collate(b, tok.pad_token_id))
    trainer.train()
    ours = tmp / "ours"
    trainer.model.save_pretrained(str(ours))
    checkpoint.save_optimizer_state(ours / "optimizer_state.safetensors", trainer.model, trainer.optimizer,
                                  step=trainer.state.global_step)
    return {"run": tmp / "run", "last": tmp / "run" / "checkpoint-6", "ours": ours, "pool": pool,
            "log": trainer.state.log_history}


def _features(model_dir, ckpt, pool, out):
    run_featurize(FeaturizeConfig(model=str(model_dir), checkpoint=str(ckpt), data=str(pool), loss="sft",
                                  projection="none", batch_size=4, tokenize=TokenizeConfig(max_length=64), store_dtype="float32",
                                  output=str(out)))
    feats, _, rows = open_features(out)
    return np.asarray(feats), rows


def test_trainer_checkpoint_featurizes_like_our_checkpoint(tiny_model_dir, hf_run, tmp_path):
    last = hf_run["last"]
    assert (last / "optimizer.pt").exists() and not (last / "optimizer_state.safetensors").exists()
    theirs, rows = _features(tiny_model_dir, last, hf_run["pool"], tmp_path / "theirs")
    ours, rows2 = _features(tiny_model_dir, hf_run["ours"], hf_run["pool"], tmp_path / "ours")
    assert rows == rows2 and np.abs(ours).sum(axis=1).min() > 0
    assert np.array_equal(theirs, ours)


def test_moments_map_by_param_group_order_and_refuse_misfits(tiny_model_dir, hf_run, tmp_path):
    model = modeling.load_adapter(modeling.load_model(str(tiny_model_dir)), hf_run["last"])
    moments, meta = read_trainer_moments(hf_run["last"], model)
    mine, _ = checkpoint.load_optimizer_state(hf_run["ours"], list(moments))
    for name, (m, v) in moments.items():
        assert torch.equal(m, mine[name][0]) and torch.equal(v, mine[name][1])
    assert meta["step"] == 6 and meta["eps"] == 1e-8
    bad = tmp_path / "bad"
    shutil.copytree(hf_run["last"], bad)
    sd = torch.load(bad / "optimizer.pt", weights_only=True)
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    torch.save(sd, bad / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer holds 15 parameters, the adapter has 16"):
        read_trainer_moments(bad, model)
    small = modeling.attach_lora(modeling.load_model(str(tiny_model_dir)), LoraSettings(r=2, alpha=4, dropout=0.0))
    with pytest.raises(CheckpointError, match=r"has shape \(4, 32\), the adapter's parameter \(2, 32\)"):
        read_trainer_moments(hf_run["last"], small)
    torch.save({"state": {}, "param_groups": [], "code": LoraSettings()}, bad / "optimizer.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_trainer_moments(bad, model)


def test_warmup_import_converts_a_trainer_run(tiny_model_dir, hf_run, tmp_path):
    out = tmp_path / "imported"
    proc = subprocess.run([sys.executable, "-m", "rose_select", "warmup", "--import", str(hf_run["run"]),
                           "--model", str(tiny_model_dir), "--output", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-1", "ckpt-2"]
    imported, own = (load_file(str(d / "optimizer_state.safetensors")) for d in (out / "ckpt-2", hf_run["ours"]))
    assert imported.keys() == own.keys() and all(torch.equal(imported[k], own[k]) for k in own)
    # checkpoint weights: the mean logged lr of each epoch (3 steps each), from log_history
    lrs = [h["learning_rate"] for h in hf_run["log"] if "learning_rate" in h]
    log = json.loads((out / "lr_log.json").read_text())
    assert log["epoch_mean_lr"] == pytest.approx([np.mean(lrs[:3]), np.mean(lrs[3:6])])
    assert sum(log["checkpoint_weights"]) == pytest.approx(1.0)
    assert warmup_lrs(str(out)) == pytest.approx(log["epoch_mean_lr"])  # what rose select reads
    theirs, _ = _features(tiny_model_dir, hf_run["last"], hf_run["pool"], tmp_path / "f_theirs")
    conv, _ = _features(tiny_model_dir, out / "ckpt-2", hf_run["pool"], tmp_path / "f_conv")
    assert np.array_equal(theirs, conv)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="nor a run with checkpoint-"):
        import_trainer_run(tmp_path / "empty", tmp_path / "x", model=str(tiny_model_dir))
