"""The run's outline: work per stage in training row-steps, and the estimate timed on the warm-up."""

import pytest

from rose_select.outline import ROW_STEPS, Work, outline, seconds_per_row_step, stage_row_steps

WORK = Work(pool=180, warmup=9, warmup_epochs=2, checkpoints=1, validation=20,
            methods=("rose_plus", "rose", "less", "random"), selected=18, train_epochs=2, heldout=40)


def test_row_steps_per_stage():
    steps = stage_row_steps(WORK)
    assert steps["warmup"] == 18
    assert steps["pool features"] == pytest.approx(180 * ROW_STEPS["pool"])
    assert steps["validation features"] == pytest.approx(20 * ROW_STEPS["validation"])
    assert steps["training"] == pytest.approx(4 * 18 * 2)
    assert steps["evaluation"] == pytest.approx(5 * 40 * ROW_STEPS["evaluate"])


def test_estimate_is_the_warmup_rate_times_the_work_left():
    rate = seconds_per_row_step(36.0, WORK)
    assert rate == 2.0
    text = outline(WORK, "runs/demo", "pool.jsonl", rate, done=("warmup",))
    left = sum(v for k, v in stage_row_steps(WORK).items() if k != "warmup") * rate
    assert f"~{left / 60:.0f} min" in text and "[done]" in text and "runs/demo/report.html" in text
    assert "estimated once the warm-up" in outline(WORK, "runs/demo", "pool.jsonl")
