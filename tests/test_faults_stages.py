"""Fault catalogue, class *stages* (issue 11): each stage directory is complete or absent whenever
the stage is killed, records the settings it was made with, and refuses (never mixes) a rerun with
other settings; a failed first run leaves nothing that blocks the corrected rerun."""

from __future__ import annotations

import json

import pytest
from killing import hidden_leftovers, one_thread, run_killed, snapshot
from test_training import small_cfg, write_pool

from rose_select.errors import DataError, ModelLoadError, StoreMismatchError
from rose_select.select.stage import SelectConfig, run_select
from rose_select.train.stage import TrainConfig, WarmupConfig, run_train, run_warmup


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


# ------------------------------------------------------------------------------------ train

@pytest.fixture(scope="module")
def train_reference(tiny_model_dir, tmp_path_factory):
    return run_train(small_cfg(TrainConfig, tiny_model_dir, tmp_path_factory.mktemp("ref"), fraction=0.25))


# mid-training; during the adapter's write (complete temporary, not renamed); right after it,
# before train_log.json (case 12: the rerun returned at once and the log was never written)
TRAIN_POINTS = [("step", 4), ("before", "adapter"), ("after", "adapter")]


@pytest.mark.parametrize("point", TRAIN_POINTS, ids=[f"{k}-{a}" for k, a in TRAIN_POINTS])
def test_train_killed_anywhere_reruns_to_the_uninterrupted_result(point, train_reference, tiny_model_dir, tmp_path):
    cfg = small_cfg(TrainConfig, tiny_model_dir, tmp_path, fraction=0.25)
    run_killed(lambda: run_train(cfg), point)
    run = run_train(cfg)
    assert snapshot(run, skip=("config.json",)) == snapshot(train_reference, skip=("config.json",))
    assert hidden_leftovers(run) == []  # no stale temporary (case 12)
    assert len(json.loads((run / "train_log.json").read_text())["steps"]) == 6


# ------------------------------------------------------------------------------------ select

@pytest.fixture(scope="module")
def select_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("select_inputs")
    pool = write_pool(d / "pool.jsonl", 30)
    val = d / "val.jsonl"
    val.write_text("".join(json.dumps({"id": f"v{i}", "subtask": f"s{i % 2}", "prompt": f"What about {w}?",
                                       "chosen": f"{w} bread flour", "rejected": "no"}) + "\n"
                           for i, w in enumerate(["fox", "yeast", "paris", "water"])))
    return pool, val


def _select(inputs, out, **kw) -> SelectConfig:
    pool, val = inputs
    return SelectConfig(**{**dict(method="bm25", pool=str(pool), validation=str(val), fraction=0.2, plots=False,
                                  output=str(out)), **kw})


SELECT_POINTS = [("after", "scores.npy"), ("after", "selected.jsonl"), ("after", "summary.json"), ("before", "sel")]


@pytest.mark.parametrize("point", SELECT_POINTS, ids=[f"{k}-{a}" for k, a in SELECT_POINTS])
def test_select_killed_anywhere_leaves_a_complete_or_no_directory(point, select_inputs, tmp_path):
    ref = run_select(_select(select_inputs, tmp_path / "ref"))
    out = tmp_path / "sel"
    run_killed(lambda: run_select(_select(select_inputs, out)), point)
    assert not out.exists()  # never a directory with some of the files (case 5)
    run_select(_select(select_inputs, out))
    assert snapshot(out) == snapshot(ref) and hidden_leftovers(tmp_path) == []


def test_select_records_its_config_and_refuses_other_settings(select_inputs, tmp_path):
    """Case 5: select overwrote a different method's output and left the old summary.json."""
    out = tmp_path / "sel"
    run_select(_select(select_inputs, out, method="random"))
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["config"]["method"] == "random" and recorded["inputs"]["pool_sha256"]
    before = snapshot(out)
    with pytest.raises(StoreMismatchError, match=rf"{out} holds a selection made with other settings or inputs "
                       r"\(differing: config.method\); use another output directory or delete"):
        run_select(_select(select_inputs, out, method="bm25"))
    assert snapshot(out) == before
    assert run_select(_select(select_inputs, out, method="random")) == out and snapshot(out) == before


def test_select_refuses_a_directory_it_did_not_make(select_inputs, tmp_path):
    out = tmp_path / "sel"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # e.g. an older selection without config.json
    with pytest.raises(StoreMismatchError, match="holds no selection config.json"):
        run_select(_select(select_inputs, out))
    assert [p.name for p in out.iterdir()] == ["summary.json"]


# ------------------------------------------------------------------------------------ failed first runs

def test_mistyped_model_leaves_nothing_and_the_corrected_rerun_runs(tiny_model_dir, tmp_path):
    """Case 9: the failed run left config.json, and the corrected rerun was refused."""
    cfg = small_cfg(WarmupConfig, tmp_path / "no_such_model", tmp_path, fraction=0.25, epochs=1)
    with pytest.raises(ModelLoadError, match=f"model path not found: {tmp_path / 'no_such_model'}"):
        run_warmup(cfg)
    assert not (tmp_path / "run").exists()
    run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25, epochs=1))
    assert (tmp_path / "run" / "ckpt-1").is_dir()


def test_too_long_example_names_the_file_and_leaves_nothing(tiny_model_dir, tmp_path):
    """Case 9: the error named no file, and the leftover config blocked the corrected rerun."""
    from rose_select.tokenization import TokenizeConfig

    cfg = small_cfg(WarmupConfig, tiny_model_dir, tmp_path, full=True, epochs=1,
                    tokenize=TokenizeConfig(max_length=8, truncation="keep_start"))
    with pytest.raises(DataError, match=rf"{tmp_path / 'pool.jsonl'}, record 'ex\d+', field 'messages': no "
                       r"response token left after truncation to max_length=8 .*\(or train with on_too_long=skip\)"):
        run_warmup(cfg)
    assert not (tmp_path / "run").exists()
    run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, full=True, epochs=1))


def test_a_config_without_results_is_replaced_not_a_block(tiny_model_dir, tmp_path):
    """Killed before its first checkpoint, a run leaves only its config: a rerun with other
    settings replaces it (nothing to mix), while a directory with results is still refused."""
    cfg = small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25, epochs=1)
    run_killed(lambda: run_warmup(cfg), ("step", 1))
    assert (tmp_path / "run" / "config.json").exists()
    run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25, epochs=1, lr=5e-3))
    with pytest.raises(StoreMismatchError, match=r"holds a run with other settings \(differing keys: \['lr'\]\)"):
        run_warmup(cfg)


def test_warmup_full_is_accepted(tiny_model_dir, tmp_path):
    """Case 13: --full true was always refused because fraction had a default."""
    from rose_select.config import from_dict

    cfg = from_dict(WarmupConfig, {"full": "true", "model": str(tiny_model_dir), "data": "x.jsonl"})
    assert cfg.full and cfg.fraction is None
    assert WarmupConfig().fraction == 0.05
    run = run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp_path, full=True, epochs=1))
    assert len(json.loads((run / "warmup_ids.json").read_text())["ids"]) == 40


def test_run_with_a_missing_pool_writes_nothing(tmp_path, capsys):
    """Case 8: FileNotFoundError traceback, and config.yaml left behind."""
    from rose_select.cli import main

    status = main(["run", "--output-dir", str(tmp_path / "run"), "--pool", str(tmp_path / "nope.jsonl")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"rose run: error: {tmp_path / 'nope.jsonl'}, field 'pool': file not found" in err
    assert not (tmp_path / "run").exists()
