"""`rose run` with a `plant` section (the demo's setting) on the tiny model: the planted pool, the
held-out pairs no method saw, and the figures against the ground truth."""

import json

import numpy as np

from rose_select.data import load_pool, load_preferences
from rose_select.data.heldout import prompt_key
from rose_select.pipeline import PlantSection, run_pipeline
from rose_select.planted import read_truth
from rose_select.stats import wilson_interval
from test_pipeline import _config


def _planted_run(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, methods=("rose_plus", "random"))
    cfg.plant = PlantSection(generic_records=20, per_subtask=1)
    return cfg, run_pipeline(cfg)


def test_planted_run_builds_the_pool_and_measures_against_its_truth(tmp_path, tiny_model_dir, capsys):
    cfg, run = _planted_run(tmp_path, tiny_model_dir)
    out = capsys.readouterr().out
    before, after = out.split("[rose run] plan:")[1:3]  # printed first, then again after the warm-up
    assert "24 rows x 2 checkpoint(s)" in before and "6 triples" in before and "2 held-out pairs" in before
    assert "estimated once the warm-up" in before and f"{run}/report.html" in before
    assert "warmup" in after and "[done]" in after and "estimate for what is left" in after
    truth = read_truth(run / "planted")
    records = load_pool(run / "planted" / "pool.jsonl", format="messages")
    assert [r.id for r in records] == [t.id for t in truth] and len(truth) == 20 + 2 * 2
    planted = {tuple((m.role, m.content) for m in r.messages[:-1]) for r, t in zip(records, truth) if t.domain != "generic"}
    validation = {prompt_key(t) for t in load_preferences(cfg.validation)}
    assert len(planted) == 2 and not planted & validation  # one prompt per subtask, none a validation prompt
    results = json.loads((run / "results.json").read_text())
    assert results["n_heldout"] == 2  # 10 held-out prompts - 6 validation - 2 planted
    for method, fig in results["planted"].items():
        scores = np.load(run / "select" / method / "scores.npy")
        chosen = [i for i, t in enumerate(truth) if t.id in
                  {json.loads(line)["id"] for line in (run / "select" / method / "selected.jsonl").read_text().splitlines()}]
        target = [truth[i] for i in chosen if truth[i].domain != "generic"]
        assert fig["k"] == len(chosen) == 6 and fig["domain_precision"] == len(target) / 6
        assert fig["precision_ci"] == list(wilson_interval(len(target), 6))
        pairs = {}
        for s, t in zip(scores, truth):
            if t.domain != "generic":
                pairs.setdefault(t.pair, {})[t.preferred] = s
        wins = [1.0 if p[True] > p[False] else 0.5 if p[True] == p[False] else 0.0 for p in pairs.values()]
        assert fig["paired_accuracy"] == np.mean(wins) and fig["n_pairs"] == 2
    report = (run / "report.md").read_text()
    assert "The selections against the planted truth" in report and "pairs ranked right" in report
    page = (run / "report.html").read_text()
    assert "The selections against the planted truth" in page and "target row" in page and "preferred answer" in page
