"""Fault catalogue, class *checkpoints* (issue 11): a warm-up killed anywhere resumes to exactly
the uninterrupted run (checkpoints, learning rates, checkpoint weights), because each checkpoint
carries its own learning rates; what the checkpoints lack is refused, never guessed."""

from __future__ import annotations

import json
import shutil

import pytest
from killing import hidden_leftovers, one_thread, run_killed, snapshot
from test_training import small_cfg

from rose_select.errors import CheckpointError, ConfigError
from rose_select.select.methods import lr_weights
from rose_select.select.stage import SelectConfig
from rose_select.train.stage import WarmupConfig, run_warmup


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted warm-up (3 steps per epoch, 2 epochs)."""
    tmp = tmp_path_factory.mktemp("ref")
    return run_warmup(small_cfg(WarmupConfig, tiny_model_dir, tmp, fraction=0.25))


def _same_run(run, ref) -> None:
    mine, theirs = (json.loads((d / "config.json").read_text())["config"] for d in (run, ref))
    assert {**mine, "data": "", "output": ""} == {**theirs, "data": "", "output": ""}
    assert snapshot(run, skip=("config.json",)) == snapshot(ref, skip=("config.json",))
    assert hidden_leftovers(run) == []


# (after the rename of ckpt-1, before lr_log.json: case 1), mid-epoch 2, during ckpt-2's write
# (complete temporary, not yet renamed), and after ckpt-2 but before the logs
POINTS = [("after", "ckpt-1"), ("step", 5), ("before", "ckpt-2"), ("after", "ckpt-2"), ("after", "lr_log.json")]


@pytest.mark.parametrize("point", POINTS, ids=[f"{k}-{a}" for k, a in POINTS])
def test_warmup_killed_anywhere_resumes_to_the_uninterrupted_run(point, reference, tiny_model_dir, tmp_path):
    cfg = small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25)
    run_killed(lambda: run_warmup(cfg), point)
    run_warmup(cfg)
    _same_run(tmp_path / "run", reference)
    lrs = json.loads((tmp_path / "run" / "lr_log.json").read_text())["epoch_mean_lr"]
    assert len(lrs) == 2 and min(lrs) > 0


def test_killed_after_a_checkpoint_rename_keeps_that_epochs_weight(reference, tiny_model_dir, tmp_path):
    """Case 1 as the user saw it: the weights select uses, after a kill between ckpt-1's rename
    and the logs, equal the uninterrupted run's (they were [0, 1.0] instead of [0.73, 0.27])."""
    cfg = small_cfg(WarmupConfig, tiny_model_dir, tmp_path, fraction=0.25)
    run_killed(lambda: run_warmup(cfg), ("after", "ckpt-1"))
    run = run_warmup(cfg)
    scfg = SelectConfig(method="rose", warmup_dir=str(run))
    expected = lr_weights(SelectConfig(method="rose", warmup_dir=str(reference)), 2)
    assert lr_weights(scfg, 2).tolist() == expected.tolist() and min(expected) > 0.1


def test_checkpoints_record_their_own_learning_rates(reference):
    from rose_select.checkpoint import read_warmup_checkpoints

    ckpts = read_warmup_checkpoints(reference)
    assert [(e, p.name) for e, p, _ in ckpts] == [(1, "ckpt-1"), (2, "ckpt-2")]
    for e, path, lr in ckpts:
        state = json.loads((path / "trainer_state.json").read_text())
        assert [s["epoch"] for s in state["steps"]] == [e] * 3
        assert lr == pytest.approx(sum(s["lr"] for s in state["steps"]) / 3)


def test_select_refuses_weights_it_cannot_read(reference, tmp_path):
    """A checkpoint without learning rates (older format) or an unfinished warm-up: an error, not
    weights made up from whatever is there."""
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    state = json.loads((old / "ckpt-2" / "trainer_state.json").read_text())
    del state["epoch_mean_lr"], state["steps"]
    (old / "ckpt-2" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"ckpt-2/trainer_state.json records no learning rates"):
        lr_weights(SelectConfig(method="rose", warmup_dir=str(old)), 2)
    shutil.rmtree(old / "ckpt-2")
    with pytest.raises(ConfigError, match=r"the warm-up has 1 of 2 checkpoints; run the warm-up again"):
        lr_weights(SelectConfig(method="rose", warmup_dir=str(old)), 1)
