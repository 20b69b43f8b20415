"""One shape of config: sections composed whole, settings reach every stage, renamed keys named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rose_select.cli import STAGES, main
from rose_select.config import compose, from_dict, load_yaml
from rose_select.errors import ConfigError
from rose_select.evaluation import EvalConfig
from rose_select.features.stage import FeatureSettings, FeaturizeConfig
from rose_select.modeling import ModelSettings
from rose_select.pipeline import RunConfig, eval_config, featurize_jobs, select_config, training_configs
from rose_select.select import methods as select_methods
from rose_select.select.stage import METHODS, SelectConfig, run_select
from rose_select.tokenization import TokenizeConfig
from rose_select.train.stage import TrainConfig

TOKENIZE = {"max_length": 77, "template": "less", "truncation": "keep_start"}


def _run_config(tmp_path, **extra) -> RunConfig:
    return from_dict(RunConfig, {"output_dir": str(tmp_path / "run"), "model": "some/model", "model_dtype": "bfloat16",
                                 "device": "cpu", "tokenize": TOKENIZE, "lora": {"r": 4, "alpha": 8},
                                 "select": {"methods": list(METHODS), "fraction": 0.2, "knn_k": 3},
                                 "featurize": {"dim": 64, "store_dtype": "float32", "ref": "self"}, "beta": 0.2,
                                 "num_subtasks": 3, **extra})


def test_run_tokenisation_and_model_reach_every_stage(tmp_path):
    """max length, template and truncation of `rose run` reach warm-up, training, featurization
    (pool and both validation kinds), every selection method and evaluation, with the model settings."""
    cfg = _run_config(tmp_path)
    run, ckpts = tmp_path / "run", [tmp_path / "run" / "warmup" / "ckpt-1"]
    warm, train = training_configs(cfg, run, "pool.jsonl")
    jobs = featurize_jobs(cfg, run, run, "pool.jsonl", "val.json", ckpts)
    selects = [select_config(cfg, run, run, m, "pool.jsonl", "val.json", ckpts) for m in METHODS]
    evals = [eval_config(cfg, output=run / "eval", reference_cache=run / "ref.npz")]
    stages = [warm, train, *(c for _, c in jobs), *selects, *evals]
    assert {k.split("/")[-1] for k, _ in jobs} == {"pool", "val_pairwise+val_sft", "val_sft_rejected"}  # one pass for both
    for stage in stages:
        assert dataclasses.asdict(stage.tokenize) == TOKENIZE, type(stage).__name__
        assert (stage.model, stage.model_dtype, stage.device) == ("some/model", "bfloat16", "cpu")
    for _, fcfg in jobs:  # the featurize section is handed over whole
        assert (fcfg.dim, fcfg.store_dtype, fcfg.ref, fcfg.beta, fcfg.lora.r) == (64, "float32", "self", 0.2, 4)
        # the subtask layout reaches the validation stores (a pool has none)
        assert fcfg.num_subtasks == (None if fcfg.data_kind == "pool" else 3)
    assert all((s.fraction, s.knn_k, s.num_subtasks) == (0.2, 3, 3) for s in selects)
    assert evals[0].beta == 0.2  # one DPO beta for the features and the evaluation


@pytest.mark.parametrize("section", ["featurize", "evaluate"])
def test_beta_is_one_setting_of_the_run(tmp_path, section):
    with pytest.raises(ConfigError, match=rf"{section}.beta was renamed: use beta \(the run's top level"):
        _run_config(tmp_path, **{section: {"beta": 0.3}})


def test_rds_embeds_with_the_runs_tokenisation(tmp_path, tiny_model_dir, monkeypatch):
    """rds truncates its texts to the run's max length (it used to embed 512 tokens whatever the run said)."""
    pool = tmp_path / "pool.jsonl"
    long = "word " * 200
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": f"question {i} {long}"}, {"role": "assistant", "content": f"answer {long}"}]}) + "\n"
        for i in range(4)))
    val = tmp_path / "val.json"
    val.write_text(json.dumps({"q1": {"responses": ["good " * 50, "bad"], "pairs": [[0, 1]], "sft_target": "good " * 50,
                                          "rejected_target": "bad"}}))
    lengths = []
    real = select_methods.representations

    def spy(model, tokenizer, encodings, **kw):
        lengths.extend(len(e["input_ids"]) for e in encodings)
        return real(model, tokenizer, encodings, **kw)

    monkeypatch.setattr(select_methods, "representations", spy)
    cfg = SelectConfig(method="rds", model=str(tiny_model_dir), device="cpu", pool=str(pool), validation=str(val),
                       tokenize=TokenizeConfig(max_length=24), count=1, plots=False, output=str(tmp_path / "sel"))
    run_select(cfg)
    assert len(lengths) == 5 and max(lengths) == 24


def test_compose_takes_whole_sections_and_refuses_a_field_twice():
    settings = FeatureSettings(dim=32, projection="rademacher")
    cfg = compose(FeaturizeConfig, ModelSettings(model="m"), settings, data="d", output="o", adam=False)
    assert (cfg.dim, cfg.projection, cfg.model) == (32, "rademacher", "m")
    with pytest.raises(TypeError, match="given twice"):
        compose(FeaturizeConfig, settings, dim=8, data="d", output="o", adam=False)


@pytest.mark.parametrize("cls,key,new", [
    (FeaturizeConfig, "dtype", "store_dtype"), (FeaturizeConfig, "max_length", "tokenize.max_length"),
    (FeaturizeConfig, "truncation", "tokenize.truncation"), (TrainConfig, "dtype", "model_dtype"),
    (EvalConfig, "max_length", "tokenize.max_length"), (EvalConfig, "template", "tokenize.template"),
    (SelectConfig, "max_length", "tokenize.max_length"),
])
def test_renamed_keys_name_the_new_key(cls, key, new):
    with pytest.raises(ConfigError, match=f"{key} was renamed: use {new}"):
        from_dict(cls, {key: "float16" if "dtype" in key else 64, "data": "d", "output": "o"})


def test_renamed_yaml_key_and_flag_name_the_new_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("featurize: {dtype: float32}\n")
    with pytest.raises(ConfigError, match=r"featurize\.dtype was renamed: use store_dtype"):
        load_yaml(RunConfig, path)
    assert main(["featurize", "--data", "x.jsonl", "--output", str(tmp_path / "o"), "--max-length", "64"]) != 0
    assert "max_length was renamed: use tokenize.max_length" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in [root / "demo.yaml", *sorted((root / "experiments").glob("*.yaml"))]:
        data = path.read_text()
        assert "dtype:" not in data.replace("model_dtype:", "").replace("store_dtype:", ""), path
    load_yaml(RunConfig, root / "demo.yaml")


def test_run_select_options_reach_the_methods_that_use_them(tmp_path):
    """One select section serves every method: rose takes every option, less its own, a preset keeps
    its direction, and methods without per-subtask scores get the defaults instead of an error."""
    cfg = _run_config(tmp_path, select={"methods": list(METHODS), "direction": "pairwise_ln", "chosen_weight": 0.5,
                                        "center": True, "standardize": True, "balanced": True})
    run, ckpts = tmp_path / "run", [tmp_path / "run" / "warmup" / "ckpt-1"]
    sel = {m: select_config(cfg, run, run, m, "pool.jsonl", "val.json", ckpts) for m in METHODS}
    options = lambda c: (c.direction, c.chosen_weight, c.center, c.standardize, c.balanced)
    assert options(sel["rose"]) == ("pairwise_ln", 0.5, True, True, True)
    assert options(sel["less"]) == ("pairwise", 0.0, True, True, True)
    assert options(sel["rose_plus"]) == ("pairwise", 2.0, True, True, True)  # the preset
    assert options(sel["bm25"]) == options(sel["influence"]) == ("pairwise", 0.0, False, False, False)
    with pytest.raises(ConfigError, match="not options of method 'bm25'"):
        SelectConfig(method="bm25", standardize=True)


def test_the_console_carries_no_third_party_noise(tmp_path, tiny_model_dir):
    """`rose` runs with the libraries' weight-loading bars and deprecation notices silenced."""
    import subprocess
    import sys

    out = tmp_path / "eval"
    pref = tmp_path / "p.json"
    pref.write_text(json.dumps({"q": {"responses": ["yes", "no"], "pairs": [[0, 1]], "sft_target": "yes",
                                      "rejected_target": "no"}}))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS",
                                                                          "TRANSFORMERS_VERBOSITY")}
    proc = subprocess.run([sys.executable, "-m", "rose_select", "evaluate", "--model", str(tiny_model_dir),
                           "--preferences", str(pref), "--device", "cpu", "--output", str(out)],
                          capture_output=True, text=True, env={**env, "ROSE_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


def test_run_training_sections_reach_warmup_and_final_training(tmp_path):
    """Every schedule setting of the run's warmup/train sections, the Trainer's own included."""
    cfg = _run_config(tmp_path, warmup={"epochs": 3, "gradient_checkpointing": True, "report_to": "tensorboard"},
                      train={"lr": 3e-4, "mixed_precision": "none", "weight_decay": 0.1})
    warm, train = training_configs(cfg, tmp_path / "run", "pool.jsonl")
    assert (warm.epochs, warm.gradient_checkpointing, warm.report_to) == (3, True, "tensorboard")
    assert (train.lr, train.mixed_precision, train.weight_decay, train.gradient_checkpointing) == (3e-4, "none", 0.1, False)


@pytest.mark.parametrize("command", [*STAGES, "data", "answer"])
def test_every_command_prints_its_help(command, capsys):
    """``rose X --help`` prints and exits 0 (a help text with a bare "%" once crashed argparse)."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"rose {command}" in capsys.readouterr().out
