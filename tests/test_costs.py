"""The cost table's planned columns: the plan of the run's own pool stages beside the measured
figures, and a plan that fails leaves them empty with one warning instead of breaking the run."""

from __future__ import annotations

import json
import logging

import pytest
from test_pipeline import _config
from test_plan import _pool_file

from rose_select import costs as C
from rose_select.config import from_dict


def _costs(rows):
    entries = {k: {"done": True, "seconds": s, "bytes": 0, "threads": 1} for k, s in rows}
    counts = {"pool": 40, "heldout": 4, "warmup": 10, "validation": 6, "selected": {"less": 10}}
    return C.cost_table(entries, counts, "cpu")


ROWS = [("warmup", 2.0), ("featurize/ckpt-1/pool", 4.0), ("featurize/ckpt-1/val_pairwise+val_sft", 1.0),
        ("select/less", 0.5), ("train/less", 1.0), ("evaluate/less", 1.0)]


def test_plan_stages_of_cost_rows():
    assert [C.plan_stage(k) for k, _ in ROWS] == ["warmup", "featurize_pool", None, None, "train", None]


def test_planned_columns_are_per_example_figures_times_examples():
    plan = {"stages": {"warmup": {"tflop_per_example": 2e-3, "peak_gib": 3.0},
                       "featurize_pool": {"tflop_per_example": 1e-3, "peak_gib": 4.0}}, "flops_rate": 1e12}
    costs = C.add_plan_columns(_costs(ROWS), lambda: plan)
    rows = {r["stage"]: r for r in costs["rows"]}
    assert rows["warmup"]["planned_tflop"] == pytest.approx(10 * 2e-3)
    assert rows["warmup"]["achieved_tflops"] == pytest.approx(10 * 2e-3 / 2.0)
    assert rows["featurize/ckpt-1/pool"]["planned_tflop"] == pytest.approx(40 * 1e-3)
    assert rows["featurize/ckpt-1/pool"]["planned_device_hours"] == pytest.approx(40 * 1e-3 * 1e12 / 1e12 / 3600)
    assert rows["train/less"]["planned_tflop"] is None and rows["evaluate/less"]["achieved_tflops"] is None
    assert costs["total"]["planned_tflop"] == pytest.approx(0.06)
    text = C.cost_markdown(costs, lambda rows, cols: " | ".join(cols))
    assert "planned_tflop | achieved_tflops | planned_peak_gib | planned_device_hours" in text


def test_a_failing_plan_leaves_the_columns_empty_with_one_warning(caplog):
    def fails():
        raise RuntimeError("no such model")

    with caplog.at_level(logging.WARNING, logger="rose_select.costs"):
        costs = C.add_plan_columns(_costs(ROWS), fails)
    assert [r.message for r in caplog.records] == [
        "cost table: planned columns left empty, the plan failed: RuntimeError: no such model"]
    assert all(r[k] is None for r in costs["rows"] for k in C.PLANNED)
    text = C.cost_markdown(costs, lambda rows, cols: " | ".join(cols))
    assert "planned_tflop | achieved_tflops" in text and "planned_peak_gib" not in text and "The plan failed" in text


def _run_config(tmp_path, tiny_model_dir, **over):
    from rose_select.pipeline import RunConfig

    return from_dict(RunConfig, {
        "output_dir": str(tmp_path / "run"), "model": str(tiny_model_dir), "device": "cpu",
        "pool": str(_pool_file(tmp_path / "pool.jsonl")), "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "tokenize": {"max_length": 48}, "featurize": {"dim": 64, "batch_size": 2},
        "warmup": {"epochs": 2, "batch_size": 1}, "train": {"epochs": 1, "batch_size": 1}, **over})


def test_run_figures_plan_the_runs_own_pool_stages(tiny_model_dir, tmp_path):
    """On the CPU: planned TFLOP per example for each pool stage, the warm-up's over its epochs
    (the same step as the final training's), no memory and no device rate."""
    from rose_select.plan import run_figures

    figures = run_figures(_run_config(tmp_path, tiny_model_dir), str(tmp_path / "pool.jsonl"), "cpu")
    stages = figures["stages"]
    assert set(stages) == {"warmup", "featurize_pool", "train"} and figures["flops_rate"] is None
    assert stages["warmup"]["tflop_per_example"] == pytest.approx(2 * stages["train"]["tflop_per_example"])
    assert stages["featurize_pool"]["tflop_per_example"] > 0 and stages["featurize_pool"]["peak_gib"] is None
    assert figures["lengths"]["n"] == 4 and figures["lengths"]["max"] == 48


def test_the_cost_table_of_a_tiny_run_has_the_plan_columns(tiny_model_dir, tmp_path):
    """On a GPU, or on the CPU when asked for a projection (the plan takes ~15 s of a 2-core CPU,
    too much for every small run); the CPU run without a projection has no planned columns."""
    from rose_select.pipeline import run_pipeline

    cfg = _config(tmp_path, tiny_model_dir, methods=("less",))
    cfg.project_pool_size = 1000
    run = run_pipeline(cfg)
    rows = {r["stage"]: r for r in json.loads((run / "results.json").read_text())["costs"]["rows"]}
    for key in ("warmup", "featurize/ckpt-1/pool", "featurize/ckpt-2/pool", "train/less"):
        assert rows[key]["planned_tflop"] > 0 and rows[key]["achieved_tflops"] > 0, key
    assert rows["evaluate/less"]["planned_tflop"] is None
    assert "planned_tflop" in (run / "report.md").read_text()


def test_a_cpu_run_without_a_projection_is_not_planned(tiny_model_dir, tmp_path, monkeypatch):
    import rose_select.pipeline as P

    monkeypatch.setattr(P, "run_figures", lambda *a, **k: pytest.fail("planned without being asked"))
    run = P.run_pipeline(_config(tmp_path, tiny_model_dir, methods=("random",)))
    costs = json.loads((run / "results.json").read_text())["costs"]
    assert "plan" not in costs and all("planned_tflop" not in r for r in costs["rows"])
