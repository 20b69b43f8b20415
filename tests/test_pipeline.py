"""End to end on the tiny model: warm-up -> featurize -> select -> train -> evaluate, then resume."""

import dataclasses
import json

import pytest

from rose_select.config import from_dict, load_yaml
from rose_select.errors import ConfigError
from rose_select.pipeline import RunConfig, run_pipeline


def _write_inputs(tmp_path):
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w") as f:
        for i in range(40):
            topic = ["bread", "physics", "law", "cats"][i % 4]
            f.write(json.dumps({"dataset": f"src{i % 2}", "id": f"p{i}", "messages": [
                {"role": "user", "content": f"Tell me about {topic} number {i}."},
                {"role": "assistant", "content": f"Here is a fact about {topic}: it is item {i}."}]}) + "\n")
    val = tmp_path / "val.jsonl"
    with open(val, "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Question {i} about bread?", "chosen": "Use good flour and water.",
                                "rejected": "No idea.", "subtask": ["baking", "science"][i % 2]}) + "\n")
    held = tmp_path / "held.jsonl"
    with open(held, "w") as f:
        for i in range(10):
            f.write(json.dumps({"prompt": f"Question {i} about bread?", "chosen": "Knead the dough well.",
                                "rejected": "Never.", "subtask": ["baking", "science"][i % 2]}) + "\n")
    return pool, val, held


def _config(tmp_path, tiny_model_dir, methods=("rose", "less", "random")):
    pool, val, held = _write_inputs(tmp_path)
    return from_dict(RunConfig, {
        "output_dir": str(tmp_path / "run"), "model": str(tiny_model_dir), "pool": str(pool),
        "validation": str(val), "device": "cpu", "seed": 1,
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "tokenize": {"max_length": 64},
        "warmup": {"fraction": 0.25, "epochs": 2, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
        "featurize": {"projection": "sjlt", "dim": 64, "batch_size": 4},
        "select": {"methods": list(methods), "fraction": 0.25},
        "train": {"epochs": 1, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
        "evaluate": {"heldout": str(held), "batch_size": 4},
    })


def _check_costs(run, results, project):
    """The cost table: one row per finished stage, bytes as on disk, a linear projection for the
    stages that grow with the pool, and the validation pass done once (joint stores)."""
    from rose_select.costs import tree_bytes

    costs = results["costs"]
    rows = {r["stage"]: r for r in costs["rows"]}
    assert "featurize/ckpt-1/val_pairwise+val_sft" in rows and "featurize/ckpt-1/val_sft" not in rows
    assert rows["featurize/ckpt-1/pool"]["bytes"] == tree_bytes([run / "features" / "ckpt-1" / "pool"]) > 0
    assert rows["warmup"]["examples"] == 10 and rows["train/rose"]["examples"] == 10
    for r in costs["rows"]:
        assert r["device"] == "cpu" and r["device_count"] >= 1
        assert r["device_hours"] == pytest.approx(r["seconds"] * r["device_count"] / 3600)
    f = project / 40
    pool = rows["featurize/ckpt-1/pool"]
    assert pool["projected_seconds"] == pytest.approx(pool["seconds"] * f)
    assert pool["projected_bytes"] == int(pool["bytes"] * f)
    val = rows["featurize/ckpt-1/val_pairwise+val_sft"]
    assert val["projected_seconds"] == val["seconds"] and val["examples"] == 6
    assert costs["total"]["seconds"] == pytest.approx(sum(r["seconds"] for r in costs["rows"]))
    assert "## Cost per stage" in (run / "report.md").read_text()


def test_run_end_to_end_then_resume_skips_finished_stages(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir)
    cfg.project_pool_size = 270000
    run = run_pipeline(cfg)
    results = json.loads((run / "results.json").read_text())
    _check_costs(run, results, 270000)
    assert [r["method"] for r in results["rows"]] == ["base", "rose", "less", "random"]
    assert results["n_heldout"] == 4  # 10 held-out prompts minus the 6 used for selection
    assert (run / "report.md").exists() and (run / "overlap.png").exists()
    assert (run / "subtask_share.png").exists() and "assigned by `rose`" in (run / "report.md").read_text()
    for m in ("rose", "less", "random"):
        assert len((run / "select" / m / "selected.jsonl").read_text().splitlines()) == 10
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "stages.json"
              and p.parent == run / "select" / "rose"}
    capsys.readouterr()
    run_pipeline(cfg)
    out = capsys.readouterr().out
    assert "warmup: done before, skipped" in out and "select/rose: done before, skipped" in out
    assert "train/less: done before, skipped" in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten


def test_changed_selection_settings_redo_only_downstream(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, methods=("random",))
    run_pipeline(cfg)
    cfg.select.fraction = 0.5
    capsys.readouterr()
    run = run_pipeline(cfg)
    out = capsys.readouterr().out
    assert "warmup: done before, skipped" in out and "select/random: settings or inputs changed, redoing" in out
    assert len((run / "select" / "random" / "selected.jsonl").read_text().splitlines()) == 20


def test_runs_on_other_targets_share_warmup_pool_features_and_full_training(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, methods=("rose", "full"))
    cfg.shared_dir = str(tmp_path / "shared")
    run_pipeline(cfg)
    (shared,) = (tmp_path / "shared").iterdir()
    assert (shared / "warmup" / "ckpt-2").is_dir() and (shared / "features" / "ckpt-1" / "pool").is_dir()
    assert (shared / "train" / "full" / "adapter").is_dir() and not (tmp_path / "run" / "warmup").exists()
    other = tmp_path / "val2.jsonl"  # another target: a different validation set
    other.write_text("".join(json.dumps({"prompt": f"Why is law {i} fair?", "chosen": "Because of precedent.",
                                         "rejected": "It is not.", "subtask": "law"}) + "\n" for i in range(3)))
    cfg2 = _config(tmp_path, tiny_model_dir, methods=("rose", "full"))
    cfg2.shared_dir, cfg2.validation, cfg2.output_dir = cfg.shared_dir, str(other), str(tmp_path / "run2")
    capsys.readouterr()
    run2 = run_pipeline(cfg2)
    out = capsys.readouterr().out
    assert "warmup: done before, skipped" in out and "featurize/ckpt-1/pool: done before, skipped" in out
    assert "train/full: done before, skipped" in out and "select/rose: done before" not in out
    assert len(list((tmp_path / "shared").iterdir())) == 1
    assert json.loads((run2 / "results.json").read_text())["rows"][1]["method"] == "rose"


def test_unknown_method_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(RunConfig, {"select": {"methods": ["rose", "magic"]}})


def test_demo_config_loads():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_yaml(RunConfig, configs / "demo.yaml")  # the default methods on a planted pool
    assert cfg.model == "smollm2-135m" and cfg.select.methods == RunConfig().select.methods and cfg.plant
    assert RunConfig().select.methods == ["rose_plus", "rose", "less", "random"]  # the default
    old = load_yaml(RunConfig, configs / "demo_shp.yaml")  # the previous demo, kept for comparison
    assert old.select.methods == ["rose", "less", "random"] and old.plant is None and "shp_5_shot" in old.validation


def test_default_methods_run_end_to_end(tmp_path, tiny_model_dir):
    """A run config without ``select.methods`` runs rose_plus (first), rose, less and random, with
    one joint validation pass feeding rose_plus's two validation stores."""
    cfg = _config(tmp_path, tiny_model_dir)
    cfg.select = dataclasses.replace(cfg.select, methods=RunConfig().select.methods)
    run = run_pipeline(cfg)
    results = json.loads((run / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["base", "rose_plus", "rose", "less", "random"]
    summary = json.loads((run / "select" / "rose_plus" / "summary.json").read_text())
    assert summary["method"] == "rose_plus" and summary["n_selected"] == 10
    assert (run / "features" / "ckpt-1" / "val_sft" / "meta.json").exists()
    assert (run / "eval" / "rose_plus" / "metrics.json").exists()


def test_a_second_run_into_a_live_runs_directory_is_refused_and_a_killed_one_blocks_nothing(tmp_path, tiny_model_dir):
    """Two `rose run`s into one directory would interleave their stages' files: the second is
    refused before it writes anything, naming the holder. The lock dies with its process, so a
    run killed with SIGKILL leaves nothing that blocks the rerun."""
    import os
    import subprocess
    import sys

    from rose_select.errors import BusyError
    from rose_select.io import hold_directory

    cfg = _config(tmp_path, tiny_model_dir)
    first = hold_directory(cfg.output_dir, "rose run")
    with pytest.raises(BusyError, match=rf"in use by another rose run \(pid {os.getpid()}, since "):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
    first.close()
    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys\nfrom rose_select.io import hold_directory\n"
                             "h = hold_directory(sys.argv[1], 'rose run')\nos.kill(os.getpid(), signal.SIGKILL)",
                             cfg.output_dir])
    assert killed.returncode == -9
    hold_directory(cfg.output_dir, "rose run").close()  # free again
