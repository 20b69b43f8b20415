"""The paper's experiments on the tiny models: each writes its table, JSON and plots, and runs on
different targets share the warm-up and pool features."""

import json

import numpy as np
import pytest

from rose_select.config import from_dict
from rose_select.data import load_preferences
from rose_select.errors import ConfigError
from rose_select.experiments import (
    ExperimentConfig,
    checkpoint_sets,
    correlations,
    first_k_prompts,
    run_experiment,
    target_name,
    write_triples_jsonl,
)
from rose_select.records import Message, PreferenceTriple

TOPICS = ["bread", "physics", "law", "cats"]


def _inputs(tmp_path):
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w") as f:
        for i in range(24):
            t = TOPICS[i % 4]
            f.write(json.dumps({"dataset": f"src{i % 2}", "id": f"p{i}", "messages": [
                {"role": "user", "content": f"Tell me about {t} number {i}."},
                {"role": "assistant", "content": f"Here is a fact about {t}: it is item {i}."}]}) + "\n")
    targets = []
    for name, subtasks in (("bake", ["baking", "science"]), ("court", ["law"])):
        rows = [{"prompt": f"{name} question {i}?", "chosen": "A careful, correct answer.", "rejected": "No.",
                 "subtask": subtasks[i % len(subtasks)]} for i in range(12)]
        val, held = tmp_path / f"{name}_val.jsonl", tmp_path / f"{name}_held.jsonl"
        val.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
        held.write_text("".join(json.dumps(r) + "\n" for r in rows))
        targets.append((val, held))
    return pool, targets


def _config(tmp_path, tiny_model_dir, **kw):
    pool, targets = _inputs(tmp_path)
    base = {"model": str(tiny_model_dir), "pool": str(pool), "validation": str(targets[0][0]), "device": "cpu",
            "seed": 1, "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "tokenize": {"max_length": 48},
            "warmup": {"fraction": 0.25, "epochs": 2, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
            "featurize": {"projection": "sjlt", "dim": 32, "batch_size": 4},
            "select": {"fraction": 0.25},
            "train": {"epochs": 1, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
            "evaluate": {"heldout": str(targets[0][1]), "batch_size": 4}}
    return from_dict(ExperimentConfig, {"base": base, "output_dir": str(tmp_path / "exp"), **kw}), targets


def test_pure_helpers():
    assert checkpoint_sets(3) == [[3], [2, 3], [1, 2, 3]]
    assert target_name("/x/shp_5_shot_preference.json") == "shp_5_shot" and target_name("a/b.jsonl") == "b"
    c = correlations([1, 2, 3, 4], [2, 4, 6, 8.5])
    assert c["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [2, 4, 6, 8.5])[0, 1]) and c["spearman"] == 1.0
    assert correlations([1, 2], [3, 4])["pearson"] is None
    p = lambda q: [Message("user", q)]
    triples = [PreferenceTriple(f"t{i}", s, p(f"q{q}"), "y", "n") for i, (s, q) in
               enumerate([("a", 1), ("a", 1), ("a", 2), ("a", 3), ("b", 4), ("b", 5)])]
    assert [t.id for t in first_k_prompts(triples, 2)] == ["t0", "t1", "t2", "t4", "t5"]


def test_written_triples_round_trip(tmp_path):
    t = [PreferenceTriple("x1", "s", [Message("user", "hi"), Message("assistant", "yo"), Message("user", "and?")],
                          "good", "bad")]
    back = load_preferences(str(write_triples_jsonl(t, tmp_path / "t.jsonl")))
    assert [(b.id, b.subtask, b.prompt, b.chosen, b.rejected) for b in back] == \
           [(a.id, a.subtask, a.prompt, a.chosen, a.rejected) for a in t]


def test_table1_subtasks_figure3_share_runs(tmp_path, tiny_model_dir, capsys):
    cfg, targets = _config(tmp_path, tiny_model_dir, methods=["rose", "random", "full"])
    cfg.targets, cfg.heldouts = [str(v) for v, _ in targets], [str(h) for _, h in targets]
    out = run_experiment(cfg)
    res = json.loads((out / "results.json").read_text())
    assert [(r["target"], r["method"]) for r in res["rows"]] == [
        (t, m) for t in ("bake_val", "court_val") for m in ("base", "rose", "random", "full")]
    assert (out / "table1.png").exists() and "| method | bake_val | court_val |" in (out / "table.md").read_text()
    shared = list((tmp_path / "exp" / "shared").iterdir())
    assert len(shared) == 1 and (shared[0] / "train" / "full" / "adapter").is_dir()

    capsys.readouterr()
    cfg.experiment = "subtasks"
    out = run_experiment(cfg)
    assert "run bake_val: finished before with this config, reused" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["target"], r["subtask"]) for r in rows] == [("bake_val", "baking"), ("bake_val", "science"),
                                                          ("court_val", "law")]
    assert all(isinstance(r["rose"], float) for r in rows)

    cfg.experiment = "figure3"
    out = run_experiment(cfg)
    res = json.loads((out / "results.json").read_text())
    assert [p["method"] for p in res["rows"]] == ["rose", "random", "full"] * 2
    for p in res["rows"]:
        assert p["val/loss_pairwise"] > 0 and p["val/loss_sft"] > 0
    assert res["correlations"]["val/loss_pairwise vs accuracy [all]"]["n"] == 6
    assert (out / "figure3_sft.png").exists() and (out / "figure3_pairwise.png").exists()

    # --seeds 2: seed 0 reuses the runs above; seed 1 offsets the run's and the projection's seeds
    capsys.readouterr()
    cfg.experiment, cfg.seeds = "table1", 2
    out = run_experiment(cfg)
    printed = capsys.readouterr().out
    assert "run bake_val: finished before" in printed and "run seed-1/bake_val\n" in printed
    res = json.loads((out / "results.json").read_text())
    assert sorted({(r["seed"], r["target"]) for r in res["rows"]}) == [
        (s, t) for s in (0, 1) for t in ("bake_val", "court_val")]
    import yaml
    seed1 = yaml.safe_load((tmp_path / "exp" / "runs" / "seed-1" / "bake_val" / "config.yaml").read_text())
    assert seed1["seed"] == cfg.base.seed + 1 and seed1["featurize"]["seed"] == cfg.base.featurize.seed + 1
    stat = next(s for s in res["seed_statistics"] if (s["method"], s["target"]) == ("random", "court_val"))
    accs = [r["rewards/accuracies"] for r in res["rows"] if (r["method"], r["target"]) == ("random", "court_val")]
    assert stat["seeds"] == 2 and stat["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert "mean [95% t-interval over seeds]" in (out / "table.md").read_text()


def test_table3_and_figure4(tmp_path, tiny_model_dir):
    cfg, _ = _config(tmp_path, tiny_model_dir, experiment="table3")
    out = run_experiment(cfg)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["checkpoints"] for r in rows] == ["2", "1,2"] and (out / "table3_rose.png").exists()

    cfg.experiment, cfg.shots, cfg.methods = "figure4", [1, 2], ["rose", "random"]
    cfg.shots_source = str(tmp_path / "bake_held.jsonl")
    out = run_experiment(cfg)
    res = json.loads((out / "results.json").read_text())
    assert [(r["shots"], r["method"]) for r in res["rows"]] == [(1, "rose"), (1, "random"), (2, "rose"), (2, "random")]
    held = load_preferences(str(out / "data" / "heldout.jsonl"))
    assert len(held) == 12 - 2 * 2  # two subtasks, the first two prompts of each are validation candidates
    assert len({r["n_heldout"] for r in res["rows"]}) == 1 and (out / "figure4.png").exists()


def test_table2_and_table9_across_models(tmp_path, tiny_model_dir, tiny_chat_model_dir):
    cfg, _ = _config(tmp_path, tiny_model_dir, experiment="table2", methods=["rose", "random"],
                     models=[str(tiny_model_dir), str(tiny_chat_model_dir)])
    out = run_experiment(cfg)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [str(tiny_model_dir)] * 3 + [str(tiny_chat_model_dir)] * 3
    assert len(list((tmp_path / "exp" / "shared").iterdir())) == 2  # one warm-up per model

    cfg.experiment, cfg.models = "table9", [str(tiny_chat_model_dir)]
    out = run_experiment(cfg)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["train_model"] == str(tiny_chat_model_dir), r["method"]) for r in rows] == [
        (False, "base"), (False, "rose"), (False, "random"), (True, "base"), (True, "rose"), (True, "random")]
    assert rows[3]["rewards/margins"] == 0.0 and rows[4]["rewards/margins"] != 0.0


def test_config_errors():
    with pytest.raises(ConfigError, match="experiment must be"):
        ExperimentConfig(experiment="table7")
    with pytest.raises(ConfigError, match="needs models"):
        ExperimentConfig(experiment="table2")
    with pytest.raises(ConfigError, match="unknown"):
        ExperimentConfig(methods=["rose", "oracle"])
    with pytest.raises(ConfigError, match="held-out files for 3 targets"):
        ExperimentConfig(heldouts=["a.json"])


@pytest.mark.parametrize("name", ["cpu_small.yaml", "gpu_paper.yaml"])
def test_shipped_experiment_configs_load(name):
    from pathlib import Path

    from rose_select.config import load_yaml

    cfg = load_yaml(ExperimentConfig, Path(__file__).resolve().parents[1] / "configs" / "experiments" / name)
    assert cfg.base.model == "smollm2-135m" and len(cfg.targets) == 3 and "rose" in cfg.method_list()
