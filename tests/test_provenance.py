"""Artifacts that are each valid but were not made together are refused (issue 22): every
relation ``rose select`` (and featurize, evaluate) relies on gets a well-formed pair, the same pair
with exactly one key broken (refused, naming the key and both sides), and the documented
well-formed combinations still select."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from rose_select import compat
from rose_select.config import from_dict
from rose_select.errors import IncompatibleError
from rose_select.features.stage import run_featurize
from rose_select.pipeline import RunConfig, _checkpoints, featurize_jobs, select_config, training_configs
from rose_select.select.stage import run_select
from rose_select.tokenization import TokenizeConfig
from rose_select.train.stage import run_warmup

SHP = Path(__file__).resolve().parents[1] / "src/rose_select/assets/rose_data/validation/shp/shp_5_shot/shp_5_shot_preference.json"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")


def write_rose_file(path: Path, start: int, n: int, *, edit: str = "") -> Path:
    """A ROSE-format preference file (prompt -> responses/pairs) under a name that is not one of the
    published sets, so its subtask layout comes from the settings alone."""
    prompts = list(json.loads(SHP.read_text()).items())[start:start + n]
    if edit:  # other answers to the first prompt (its targets are answers too)
        first = prompts[0][1]
        first["responses"] = [r + edit for r in first["responses"]]
        first.update({k: first[k] + edit for k in ("sft_target", "rejected_target")})
    path.write_text(json.dumps(dict(prompts)))
    return path


def write_pool(path: Path, edit: str = "") -> Path:
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me about {t} number {i}."},
                                         {"role": "assistant", "content": f"A fact about {t}: item {i}.{edit}"}]}
            for i, t in enumerate(["bread", "physics", "law", "cats"] * 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(d: Path, model, **kw) -> RunConfig:
    return from_dict(RunConfig, {
        "output_dir": str(d / "run"), "model": str(model), "pool": str(d / "pool.jsonl"),
        "validation": str(d / "mytask_preference.json"), "device": "cpu", "seed": 1,
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "tokenize": {"max_length": 64},
        "warmup": {"fraction": 0.25, "epochs": 2, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
        "featurize": {"projection": "sjlt", "dim": 64, "batch_size": 4},
        "select": {"methods": ["rose_plus", "less", "rose"], "fraction": 0.25}, **kw})


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """A warm-up (2 checkpoints) and every store rose, rose_plus and less read, made together."""
    d = tmp_path_factory.mktemp("provenance")
    pool, val = write_pool(d / "pool.jsonl"), write_rose_file(d / "mytask_preference.json", 0, 8)
    cfg = run_config(d, tiny_model_dir)
    run = Path(cfg.output_dir)
    run_warmup(training_configs(cfg, run, str(pool))[0])
    ckpts = _checkpoints(cfg, run / "warmup")
    jobs = dict(featurize_jobs(cfg, run, run, str(pool), str(val), ckpts))
    for job in jobs.values():
        run_featurize(job)
    return SimpleNamespace(cfg=cfg, run=run, pool=str(pool), val=str(val), ckpts=ckpts, jobs=jobs, dir=d)


def select(b, out: Path, method: str = "rose", **changes):
    scfg = select_config(b.cfg, b.run, b.run, method, b.pool, b.val, b.ckpts)
    return run_select(dataclasses.replace(scfg, plots=False, output=str(out), **changes))


def featurize(b, out: Path, job: str = "val_pairwise+val_sft", ckpt: int = 0, **changes) -> str:
    """One store as the run made it, with ``changes`` (a pairwise job writes no chosen store)."""
    base = b.jobs[f"featurize/{b.ckpts[ckpt].name}/{job}"]
    extra = {"chosen_output": None} if base.loss == "pairwise" else {}
    run_featurize(dataclasses.replace(base, output=str(out), **{**extra, **changes}))
    return str(out)


def stores(b, kind: str) -> list[str]:
    return [str(b.run / "features" / c.name / kind) for c in b.ckpts]


def refused(fn, key: str, *sides: str) -> str:
    with pytest.raises(IncompatibleError) as e:
        fn()
    message = str(e.value)
    assert key in message and all(s in message for s in sides), message
    return message

# ----------------------------------------------------------------------------- the comparison


def test_differences_name_the_deepest_key_and_both_values():
    a = {"model": "m", "projection": {"kind": "sjlt", "dim": 64, "seed": 0}, "lora": None}
    b = {"model": "m", "projection": {"kind": "sjlt", "dim": 64, "seed": 1}}
    assert compat.differences(a, b, ["model", "projection"]) == [("projection.seed", 0, 1)]
    assert compat.differences(a, b, ["lora"])[0][:2] == ("lora", None)  # null vs absent differs
    with pytest.raises(IncompatibleError, match=r"projection.seed: left has 0, right has 1"):
        compat.require_same("x", ("left", a), ("right", b), ["projection"])
    compat.require_same("x", ("left", a), ("right", dict(a)), compat.PAIRED_STORE_KEYS)

# ----------------------------------------------------------------------------- well-formed


def test_well_formed_stores_select_as_the_scores_say(built, tmp_path):
    """Two checkpoints, every gradient method: the checks pass and change nothing in the scores."""
    from rose_select.select.methods import lr_weights
    from rose_select.select.scoring import score_stores

    out = select(built, tmp_path / "rose")
    cfg = select_config(built.cfg, built.run, built.run, "rose", built.pool, built.val, built.ckpts)
    want, _ = score_stores(cfg.pool_features, cfg.val_features, lr_weights(cfg, 2), progress=False)
    np.testing.assert_allclose(np.load(out / "scores.npy"), want.scores, rtol=1e-6)
    for method in ("rose_plus", "less"):
        assert (select(built, tmp_path / method, method) / "selected.jsonl").exists()


def test_a_subset_of_checkpoints_with_explicit_weights(built, tmp_path):
    out = select(built, tmp_path / "sub", pool_features=stores(built, "pool")[1:],
                 val_features=stores(built, "val_pairwise")[1:], checkpoint_weights=[1.0])
    assert json.loads((out / "summary.json").read_text())["n_selected"] == 6


def test_a_pool_featurized_once_scores_against_two_targets(built, tmp_path):
    other = write_rose_file(tmp_path / "othertask_preference.json", 20, 6)
    vals = [featurize(built, tmp_path / f"other-{i}", ckpt=i, data=str(other)) for i in range(2)]
    out = select(built, tmp_path / "other", validation=str(other), val_features=vals)
    assert len((out / "selected.jsonl").read_text().splitlines()) == 6
    # the other target's stores with this target's file: refused
    refused(lambda: select(built, tmp_path / "x", val_features=vals), "data_sha256", "--validation", vals[0])

# ----------------------------------------------------------------------------- one key broken


def test_pool_and_validation_stores_pair_checkpoint_by_checkpoint(built, tmp_path):
    pool = stores(built, "pool")
    refused(lambda: select(built, tmp_path / "o", val_features=stores(built, "val_pairwise")[::-1]),
            "adapter_sha256", pool[0], "val_pairwise")


@pytest.mark.parametrize("change,key", [
    ({"seed": 1}, "projection.seed"), ({"dim": 32}, "projection.dim"), ({"projection": "rademacher"}, "projection.kind"),
    ({"tokenize": TokenizeConfig(max_length=48)}, "max_length")], ids=["seed", "dim", "kind", "tokenisation"])
def test_a_validation_store_with_another_projection_or_tokenisation(built, tmp_path, change, key):
    val = featurize(built, tmp_path / "val", **change)
    refused(lambda: select(built, tmp_path / "o", val_features=[val, stores(built, "val_pairwise")[1]]),
            key, stores(built, "pool")[0], val)


def test_a_validation_store_of_another_model(built, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(stores(built, "val_pairwise")[0], val)
    meta = json.loads((val / "meta.json").read_text())
    meta["settings"]["model"] = "sha256:another-model"
    (val / "meta.json").write_text(json.dumps(meta))
    refused(lambda: select(built, tmp_path / "o", val_features=[str(val), stores(built, "val_pairwise")[1]]),
            "model: ", "sha256:another-model", stores(built, "pool")[0])


def test_fresh_adapters_with_other_lora_settings(built, tmp_path, tiny_model_dir):
    from rose_select.modeling import LoraSettings

    fresh = dict(checkpoint=None, adam=False)
    pool = featurize(built, tmp_path / "pool", "pool", **fresh, lora=LoraSettings(r=2, alpha=4, dropout=0.0))
    val = featurize(built, tmp_path / "val", **fresh, lora=LoraSettings(r=4, alpha=4, dropout=0.0))
    refused(lambda: select(built, tmp_path / "o", pool_features=[pool], val_features=[val], warmup_dir=None),
            "lora.r", pool, val)


def test_a_validation_store_of_another_file(built, tmp_path):
    other = write_rose_file(tmp_path / "mytask_preference.json", 0, 8, edit=" (edited)")  # same prompts
    val = featurize(built, tmp_path / "val", data=str(other))
    refused(lambda: select(built, tmp_path / "o", val_features=[val, stores(built, "val_pairwise")[1]]),
            "data_sha256", val, built.val)


def test_a_validation_store_with_another_subtask_layout(built, tmp_path):
    val = [featurize(built, tmp_path / f"val{i}", ckpt=i, num_subtasks=2) for i in range(2)]
    refused(lambda: select(built, tmp_path / "o", val_features=val), "subtask_layout", val[0], "--validation")
    # the found bug: select splits the file in two, the stores were made with one subtask
    refused(lambda: select(built, tmp_path / "p", num_subtasks=2), "subtask_layout", "subtask_1", "default")
    out = select(built, tmp_path / "q", val_features=val, num_subtasks=2)  # made together: scored per subtask
    shares = json.loads((out / "summary.json").read_text())["share_per_subtask"]
    assert set(shares) <= {"subtask_0", "subtask_1"} and sum(shares.values()) == pytest.approx(1.0)


def test_a_pool_store_of_another_pool_file(built, tmp_path):
    other = write_pool(tmp_path / "pool.jsonl", edit=" (edited)")  # same ids, other content
    pool = featurize(built, tmp_path / "pool", "pool", data=str(other))
    refused(lambda: select(built, tmp_path / "o", pool_features=[pool, stores(built, "pool")[1]]),
            "data_sha256", pool, "--pool")


def test_checkpoint_weights_from_another_warm_up(built, tmp_path):
    other = dataclasses.replace(training_configs(built.cfg, built.run, built.pool)[0], seed=7,
                                output=str(tmp_path / "warmup"))
    run_warmup(other)
    refused(lambda: select(built, tmp_path / "o", warmup_dir=other.output), "adapter_sha256",
            stores(built, "pool")[0], "ckpt-1 of the warm-up")
    refused(lambda: select(built, tmp_path / "p", warmup_dir=other.output, pool_features=stores(built, "pool")[1:],
                           val_features=stores(built, "val_pairwise")[1:], checkpoint_weights=[1.0]),
            "adapter_sha256", stores(built, "pool")[1], other.output)


def test_chosen_answer_and_pairwise_stores_of_a_variant(built, tmp_path):
    from rose_select.select.provenance import check_same_triples, read_store

    sft = featurize(built, tmp_path / "sft", loss="sft_chosen", seed=1)
    refused(lambda: select(built, tmp_path / "o", "rose_plus", val_chosen_features=[sft, stores(built, "val_sft")[1]]),
            "projection.seed", sft)  # the pool store's pair check sees it first
    pairwise = stores(built, "val_pairwise")[0]
    refused(lambda: check_same_triples([read_store(pairwise, "pairwise")], [read_store(sft, "chosen")]),
            "projection.seed", pairwise, sft)
    swapped = stores(built, "val_sft")[::-1]
    refused(lambda: select(built, tmp_path / "p", "rose_plus", val_chosen_features=swapped), "adapter_sha256", swapped[0])


def test_a_store_of_the_wrong_loss(built, tmp_path):
    refused(lambda: select(built, tmp_path / "o", "less", val_features=stores(built, "val_pairwise")),
            "loss", "sft_chosen", "pairwise")

# ----------------------------------------------------------------------------- adapters and base models


def test_an_adapter_is_used_only_with_its_base_model(built, tmp_path, tiny_chat_model_dir):
    from rose_select.evaluation import EvalConfig, run_evaluate

    ckpt = built.ckpts[0]
    assert json.loads((ckpt / "base_model.json").read_text())["model"] == built.cfg.model
    refused(lambda: featurize(built, tmp_path / "f", "pool", model=str(tiny_chat_model_dir)), "identity",
            str(ckpt), str(tiny_chat_model_dir))
    cfg = EvalConfig(model=str(tiny_chat_model_dir), adapter=str(ckpt), preferences=[built.val], device="cpu",
                     output=str(tmp_path / "e"))
    refused(lambda: run_evaluate(cfg), "identity", "rose evaluate")
    assert not (tmp_path / "e").exists()
    run_evaluate(dataclasses.replace(cfg, model=built.cfg.model))  # its own base model: evaluated
    assert (tmp_path / "e" / "metrics.json").exists()

# ----------------------------------------------------------------------------- rose run


def test_rose_run_num_subtasks_scores_two_subtasks_and_resume_rereads_its_inputs(tiny_model_dir, tmp_path, capsys):
    """The found bug: ``rose run --num-subtasks 2`` on a ROSE file with an unknown name scored one
    subtask (``default``). The layout now reaches featurize; a resumed run redoes a stage whose
    input changed in place instead of trusting its ledger."""
    from rose_select.cli import main
    from rose_select.config import save_yaml

    write_pool(tmp_path / "pool.jsonl")
    val = write_rose_file(tmp_path / "mytask_preference.json", 0, 8)
    held = write_rose_file(tmp_path / "mytask_heldout.json", 0, 12)
    cfg = run_config(tmp_path, tiny_model_dir, select={"methods": ["rose"], "fraction": 0.25},
                     train={"epochs": 1, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
                     evaluate={"heldout": str(held), "batch_size": 4})
    save_yaml(cfg, tmp_path / "run.yaml")
    argv = ["run", "--config", str(tmp_path / "run.yaml"), "--num-subtasks", "2"]
    assert main(argv) == 0
    run = tmp_path / "run"
    for ckpt in ("ckpt-1", "ckpt-2"):
        rows = json.loads((run / "features" / ckpt / "val_pairwise" / "rows.json").read_text())
        assert rows["groups"] == ["subtask_0"] * 4 + ["subtask_1"] * 4
    shares = json.loads((run / "select" / "rose" / "summary.json").read_text())["share_per_subtask"]
    assert set(shares) <= {"subtask_0", "subtask_1"} and sum(shares.values()) == pytest.approx(1.0)
    best = {json.loads(line)["best_subtask"] for line in (run / "select" / "rose" / "scores.jsonl").read_text().splitlines()}
    assert best <= {"subtask_0", "subtask_1"}
    # the final model's adapter names its base model, which evaluate checked and used as reference
    assert json.loads((run / "train" / "rose" / "adapter" / "base_model.json").read_text())["model"] == str(tiny_model_dir)

    write_rose_file(val, 0, 8, edit=" (edited)")  # the same prompts, other answers, same path
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warmup: done before, skipped" in out and "featurize/ckpt-1/pool: done before, skipped" in out
    assert "featurize/ckpt-1/val_pairwise: settings or inputs changed, redoing" in out
    assert "select/rose: settings or inputs changed, redoing" in out


def test_selections_compared_come_from_one_pool(built, tmp_path, capsys):
    from rose_select.cli import main

    rose, rand = select(built, tmp_path / "rose"), select(built, tmp_path / "random", "random")
    other = write_pool(tmp_path / "pool.jsonl", edit=" (edited)")
    elsewhere = select(built, tmp_path / "elsewhere", "random", pool=str(other))
    assert main(["select", "--compare", str(rose), str(rand)]) == 0
    capsys.readouterr()
    assert main(["select", "--compare", str(rose), str(elsewhere)]) == 2
    err = capsys.readouterr().err
    assert "pool_sha256" in err and str(rose) in err and str(elsewhere) in err
