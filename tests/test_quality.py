"""The selection benchmark (``rose experiment quality``) and the selection options it measures:
metric arithmetic on hand-built cases, the variants' score math against brute force, and the
``--quick`` benchmark end to end on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rose_select.errors import ConfigError
from rose_select.experiments import DEFAULT_TARGETS
from rose_select.stats import fmt_interval
from rose_select.quality_length import length_figures
from rose_select.quality import (
    PlantedRow,
    auc,
    length_scores,
    mean_interval,
    paired_wins,
    plant_pool,
    selection_metrics,
    spearman,
    wilson_interval,
)
from rose_select.records import InstructionRecord, Message, PreferenceTriple
from rose_select.select.scoring import standardize_groups, validation_directions
from rose_select.select.topk import select_balanced, select_top


def _truth():
    """10 rows: 4 generic, 2 planted pairs of domain "t", 1 planted pair of domain "u"."""
    rows = [PlantedRow(f"g{i}", "generic", -1, None, 100 + i) for i in range(4)]
    rows += [PlantedRow("t0w", "t", 0, True, 50), PlantedRow("t0l", "t", 0, False, 10),
             PlantedRow("t1w", "t", 1, True, 5), PlantedRow("t1l", "t", 1, False, 40),
             PlantedRow("u2w", "u", 2, True, 7), PlantedRow("u2l", "u", 2, False, 9)]
    return rows


def test_metrics_on_a_hand_built_case():
    truth = _truth()
    #                 g0  g1  g2  g3  t0w t0l t1w t1l u2w u2l
    scores = np.array([0., 1., 2., 3., 9., 8., 4., 4., 7., 6.])
    sel = select_top(scores, count=4)  # t0w(9) t0l(8) u2w(7) u2l(6)
    m = selection_metrics(scores, sel, truth, "t")
    assert m["domain_precision"] == 0.5 and m["base_rate"] == 0.4 and m["precision_over_base"] == 1.25
    assert m["n_selected_domain"] == 2 and m["preferred_share"] == 0.5
    assert paired_wins(scores, truth, "t").tolist() == [1.0, 0.5]  # pair 1 is a tie
    assert m["paired_accuracy"] == 0.75 and m["n_pairs"] == 2
    assert m["paired_ci"] == pytest.approx(list(wilson_interval(1.5, 2)))
    # AUC by brute force: every (target row, other row) comparison, ties 1/2
    pos = [s for s, r in zip(scores, truth) if r.domain == "t"]
    neg = [s for s, r in zip(scores, truth) if r.domain != "t"]
    brute = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])
    assert m["auc"] == pytest.approx(brute)


def test_a_scorer_that_ranks_by_length_gets_the_length_rule_figures_exactly():
    truth = _truth()
    rule = length_scores(truth)
    by_length = np.log(rule) * 3 + 1  # any increasing function of the length: the same ranking
    for domain in ("t", "u"):
        a = selection_metrics(rule, select_top(rule, count=3), truth, domain)
        b = selection_metrics(by_length, select_top(by_length, count=3), truth, domain)
        assert a == b
    assert selection_metrics(rule, select_top(rule, count=3), truth, "t")["paired_accuracy"] == 0.5
    assert spearman(by_length, rule) == pytest.approx(1.0)


def test_interval_helpers():
    lo, hi = wilson_interval(7, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.3968, 0.8922)  # the textbook Wilson interval
    m = mean_interval([0.5, 0.7, 0.6])
    assert m["mean"] == pytest.approx(0.6) and m["hi"] - m["mean"] == pytest.approx(4.303 * 0.1 / np.sqrt(3))
    assert mean_interval([0.4])["lo"] is None
    assert np.isnan(auc([1, 2, 3], [True, True, True]))  # undefined without negatives


def test_plant_pool_is_opaque_and_complete():
    generic = [InstructionRecord(f"sg{i}", "sharegpt", [Message("user", f"q{i}"), Message("assistant", "a" * i)])
               for i in range(3)]
    t = [PreferenceTriple(f"x{i}", "s", [Message("user", f"p{i}")], "good answer", "bad") for i in range(2)]
    records, truth = plant_pool(generic, {"dom": t}, seed=3)
    assert len(records) == 7 and [r.id for r in records] == [r.id for r in truth]
    assert {r.source for r in records} == {"pool"} and all(r.id.startswith("r") for r in records)
    for rec, row in zip(records, truth):
        answer = rec.messages[-1].content
        if row.domain == "dom":
            assert answer == ("good answer" if row.preferred else "bad") and row.length == len(answer)
    assert sorted(r.pair for r in truth if r.domain == "dom") == [0, 0, 1, 1]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_validation_directions_match_their_definitions():
    rng = np.random.default_rng(0)
    p, c, r = rng.normal(size=(3, 5, 8))
    np.testing.assert_allclose(validation_directions("pairwise", pairwise=p), _unit(p))
    np.testing.assert_allclose(validation_directions("pairwise_ln", chosen=c, rejected=r), _unit(c - r))
    np.testing.assert_allclose(validation_directions("pairwise", pairwise=p, chosen=c, chosen_weight=0.5),
                               _unit(p) + 0.5 * _unit(c))
    with pytest.raises(ConfigError, match="needs the"):
        validation_directions("pairwise_ln", chosen=c)
    with pytest.raises(ConfigError, match="direction"):
        validation_directions("diff")


def test_centered_scores_against_brute_force():
    from rose_select.select.scoring import rose_scores

    rng = np.random.default_rng(2)
    common = rng.normal(size=16) * 3
    train = [rng.normal(size=(40, 16)) + common, rng.normal(size=(40, 16)) + common]
    val = [rng.normal(size=(6, 16)), rng.normal(size=(6, 16))]
    groups = ["a", "a", "b", "b", "b", "c"]
    got = rose_scores(train, val, [0.25, 0.75], groups, center=True, dtype=np.float64, chunk_rows=7, progress=False)
    brute = np.zeros((40, 3))
    for w, t, v in zip([0.25, 0.75], train, val):
        cos = _unit(t - t.mean(axis=0)) @ _unit(v).T
        brute += w * np.stack([cos[:, [g == s for g in groups]].mean(axis=1) for s in "abc"], axis=1)
    np.testing.assert_allclose(got.per_group, brute, atol=1e-12)
    np.testing.assert_allclose(got.scores, brute.max(axis=1), atol=1e-12)


def test_standardize_and_balanced_selection_against_references():
    rng = np.random.default_rng(1)
    pg = rng.normal(size=(30, 3)) * np.array([1.0, 5.0, 0.1]) + np.array([0.0, 2.0, -1.0])
    z = standardize_groups(pg)
    for s in range(3):
        col = pg[:, s]
        np.testing.assert_allclose(z[:, s], (col - col.mean()) / col.std())
    # round robin reference: a plain loop over subtasks, each taking its best untaken row
    taken, ref = set(), []
    while len(ref) < 10:
        for s in range(3):
            best = max((i for i in range(30) if i not in taken), key=lambda i: (pg[i, s], -i))
            taken.add(best)
            ref.append(best)
            if len(ref) == 10:
                break
    assert select_balanced(pg, 10).tolist() == ref


def test_pairwise_store_is_the_summed_difference_of_the_sft_stores(tiny_model_dir, tmp_path):
    """What the variants rely on: the DPO gradient of a triple points along
    n_w * grad(mean NLL of y_w) - n_l * grad(mean NLL of y_l) (summed log-probs), and the
    length-normalised direction is sft_chosen - sft_rejected."""
    from rose_select.data import load_preferences
    from rose_select.features.stage import FeaturizeConfig, run_featurize
    from rose_select.features.store import open_features
    from rose_select.modeling import load_tokenizer
    from rose_select.testing import write_lora_checkpoint
    from rose_select.tokenization import TokenizeConfig, encode_triple

    ckpt = write_lora_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"id": f"v{i}", "subtask": "s", "prompt": "How do I bake bread?" + "!" * i,
                                         "chosen": "Mix flour and water." + " knead" * i, "rejected": "No" + "o" * i})
                             + "\n" for i in range(3)))
    feats = {}
    for loss in ("pairwise", "sft_chosen", "sft_rejected"):
        run_featurize(FeaturizeConfig(model=str(tiny_model_dir), checkpoint=str(ckpt), data=str(prefs), loss=loss,
                                      projection="none", batch_size=2, tokenize=TokenizeConfig(max_length=64), store_dtype="float32",
                                      output=str(tmp_path / loss)))
        feats[loss] = np.array(open_features(tmp_path / loss)[0], dtype=np.float64)
    tok = load_tokenizer(str(tiny_model_dir))
    n = np.array([[sum(l != -100 for l in encode_triple(t, tok, TokenizeConfig(max_length=64))[s]["labels"])
                   for s in ("chosen", "rejected")] for t in load_preferences(str(prefs))], dtype=np.float64)
    summed = n[:, :1] * feats["sft_chosen"] - n[:, 1:] * feats["sft_rejected"]
    np.testing.assert_allclose(_unit(feats["pairwise"]), _unit(summed), atol=1e-5)
    np.testing.assert_allclose(validation_directions("pairwise_ln", chosen=feats["sft_chosen"],
                                                     rejected=feats["sft_rejected"]),
                               _unit(feats["sft_chosen"] - feats["sft_rejected"]))


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # exact, NaN == NaN


def test_quick_benchmark_end_to_end(tiny_model_dir, tmp_path, capsys):
    """``rose experiment quality --quick`` on the tiny model: every method's figures are recomputed
    from its saved scores and the ground truth, and the length rule row is the length scorer's."""
    import yaml

    from rose_select.cli import main

    base = {"model": str(tiny_model_dir), "device": "cpu", "seed": 1, "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
            "tokenize": {"max_length": 48},
            "warmup": {"fraction": 0.25, "epochs": 2, "lr": 1e-3, "batch_size": 4, "grad_accum": 1},
            "featurize": {"projection": "sjlt", "dim": 32, "batch_size": 8}, "select": {"fraction": 0.1}}
    cfg = tmp_path / "q.yaml"
    base["train"] = {"epochs": 1, "lr": 1e-3, "batch_size": 4, "grad_accum": 1}
    tests = tmp_path / "test_prompts"  # golden answers: two subtasks of the SE set, three prompts each
    tests.mkdir()
    for sub in ("apple", "gaming"):
        (tests / f"se_{sub}.json").write_text(json.dumps(
            [{"prompt": f"\n\nHuman: {sub} question {i}?\n\nAssistant:", "golden_answer": f"answer {i} " * (i + 1)}
             for i in range(3)]))
    cfg.write_text(yaml.safe_dump({"base": base, "output_dir": str(tmp_path / "exp"),
                                   "targets": DEFAULT_TARGETS[:2], "downstream_methods": ["rose_plus", "length", "less"],
                                   "downstream_test_prompts": {"se": str(tests)}, "downstream_test_per_subtask": 2}))
    assert main(["experiment", "quality", "--config", str(cfg), "--quick", "true", "--seeds", "2"]) == 0
    out = tmp_path / "exp" / "quality"
    res = json.loads((out / "results.json").read_text())
    assert (out / "table.md").exists() and (out / "quality_paired_accuracy.png").exists()
    methods = {r["method"] for r in res["rows"]}
    assert {"rose", "rose+std", "rose+balanced", "rose_plus", "less", "random", "bm25", "rds", "dsir",
            "influence", "shapley", "length", "rose_plus-len1", "rose-len1"} <= methods
    for seed in (0, 1):
        sdir = out / f"seed-{seed}"
        truth = [PlantedRow(**r) for r in json.loads((sdir / "truth.json").read_text())]
        ids = [r.id for r in truth]
        for row in (r for r in res["rows"] if r["seed"] == seed and r["method"] != "length"):
            sel_dir = sdir / row["target"] / "select" / row["method"]
            scores = np.load(sel_dir / "scores.npy")
            sel = [ids.index(json.loads(line)["id"]) for line in open(sel_dir / "selected.jsonl")]
            again = {**selection_metrics(scores, sel, truth, row["domain"]), **length_figures(scores, truth, row["domain"])}
            assert _same({k: row[k] for k in again}, again)
        for row in (r for r in res["rows"] if r["seed"] == seed and r["method"] == "length"):
            lengths = length_scores(truth)
            expect = {**selection_metrics(lengths * 2 + 7, select_top(lengths * 2 + 7, count=row["k"]), truth,
                                          row["domain"]), **length_figures(lengths * 2 + 7, truth, row["domain"])}
            assert _same({k: row[k] for k in expect}, expect) and row["length_balanced"] == 0.5
    _check_length_report(res, out)
    _check_length_removed(out / "seed-0")
    agg = {(a["target"], a["method"]): a for a in res["aggregate"]}
    a = agg[("shp_5_shot", "rose")]
    pair_rows = [r for r in res["rows"] if r["target"] == "shp_5_shot" and r["method"] == "rose"]
    assert a["seeds"] == 2 and a["pairs"]["n"] == sum(r["n_pairs"] for r in pair_rows)
    assert a["domain_precision"]["mean"] == pytest.approx(np.mean([r["domain_precision"] for r in pair_rows]))
    _check_downstream(res, out)
    # a rerun trains and evaluates nothing again (every step is stamped with its config and inputs)
    stamps = sorted(out.glob("seed-*/*/downstream/*/*/done.json"))
    before = [p.stat().st_mtime_ns for p in stamps]
    assert main(["experiment", "quality", "--config", str(cfg), "--quick", "true", "--seeds", "2"]) == 0
    assert [p.stat().st_mtime_ns for p in stamps] == before and len(stamps) == 2 * 2 * 3 * 2


def _check_length_removed(sdir) -> None:
    """With no direction removed, the length-removed scorer is its method (the saved scores), and
    the saved length-removed rows are the scorer's with one direction."""
    from rose_select.quality_geometry import length_removed_scores
    from rose_select.select.scoring import load_store_features

    truth = [PlantedRow(**r) for r in json.loads((sdir / "truth.json").read_text())]
    run, feats = sdir / "se_2_shot", lambda p: load_store_features(p).features
    ckpts = sorted(p.name for p in (sdir / "features").iterdir())
    val = {"pairwise": [feats(run / "features" / c / "val_pairwise") for c in ckpts],
           "chosen": [feats(run / "features" / c / "val_sft") for c in ckpts],
           "groups": load_store_features(run / "features" / ckpts[0] / "val_pairwise").groups}
    pool = [feats(sdir / "features" / c / "pool") for c in ckpts]
    for method in ("rose_plus", "rose"):
        summary = json.loads((run / "select" / method / "summary.json").read_text())
        saved = np.load(run / "select" / method / "scores.npy")
        got = length_removed_scores(pool, val, summary, length_scores(truth), 0)
        assert np.allclose(got, saved, rtol=1e-4, atol=1e-5)
        one = np.load(run / "select" / f"{method}-len1" / "scores.npy")
        assert np.array_equal(one, length_removed_scores(pool, val, summary, length_scores(truth), 1))


def _check_length_report(res: dict, out) -> None:
    """The pooled length report is the two seeds' saved scores and truths, recomputed here."""
    from rose_select.quality_length import collect_items, load_scores, target_report

    per_seed = []
    for seed in (0, 1):
        truth = [PlantedRow(**r) for r in json.loads((out / f"seed-{seed}" / "truth.json").read_text())]
        per_seed.append((truth, {**load_scores(out / f"seed-{seed}", "se_2_shot", ["rose_plus", "less"]),
                                 "length": 3 * length_scores(truth) + 1}))
    again = target_report(collect_items(per_seed, "se"), references=("less", "length"))
    report = res["length"]["se_2_shot"]
    for m in again["methods"]:
        assert _same(m, next(x for x in report["methods"] if x["method"] == m["method"]))
    for p in again["paired"]:
        assert _same(p, next(x for x in report["paired"] if (x["method"], x["vs"]) == (p["method"], p["vs"])))
    assert next(m for m in report["methods"] if m["method"] == "length")["length_balanced"]["mean"] == 0.5


def _check_downstream(res: dict, out) -> None:
    """Every downstream row is its model's metrics.json; the evaluation pairs exclude the validation
    and the planted prompts and are the same for every method of a seed and target."""
    from rose_select.data import find_heldout_file, load_preferences
    from rose_select.data.builtin import resolve_input
    from rose_select.data.heldout import prompt_key

    rows = res["downstream_rows"]
    assert {(r["seed"], r["target"], r["method"]) for r in rows} == {
        (s, t, m) for s in (0, 1) for t in ("shp_5_shot", "se_2_shot") for m in ("rose_plus", "length", "less")}
    for target in DEFAULT_TARGETS[:2]:
        larger = load_preferences(str(find_heldout_file(resolve_input(target))))
        name = "shp_5_shot" if "shp" in target else "se_2_shot"
        for seed in (0, 1):
            sdir = out / f"seed-{seed}"
            truth = json.loads((sdir / "truth.json").read_text())
            pool = [json.loads(line) for line in open(sdir / "pool.jsonl")]
            planted = {tuple((m["role"], m["content"]) for m in rec["messages"][:-1])
                       for rec, t in zip(pool, truth) if t["domain"] == name.split("_")[0]}
            assert planted
            seen = []
            for method in ("rose_plus", "length"):
                edir = sdir / name / "downstream" / method / "eval"
                metrics = json.loads((edir / "metrics.json").read_text())["overall"]
                row = next(r for r in rows if (r["seed"], r["target"], r["method"]) == (seed, name, method))
                assert row["accuracy"] == metrics["rewards/accuracies"] and row["n_pairs"] == metrics["n"]
                items = np.load(edir / "items.npz")
                assert items["pair_right"].mean() == pytest.approx(row["accuracy"])
                if name == "se_2_shot":  # 2 golden prompts of each of its 2 test subtasks
                    assert len(items["golden_logp_per_token"]) == 4 and row["n_golden"] == 4
                    assert items["golden_logp_per_token"].mean() == pytest.approx(row["golden"])
                seen.append(metrics["n"])
            n_subtasks = len({t.subtask for t in larger})
            assert seen[0] == seen[1] and 0 < seen[0] <= 2 * n_subtasks
    from rose_select.quality_downstream import evaluation_pairs
    target = DEFAULT_TARGETS[1]
    planted = {prompt_key(t) for t in load_preferences(str(find_heldout_file(resolve_input(target))))[:5]}
    pairs = evaluation_pairs(load_preferences(str(find_heldout_file(resolve_input(target)))),
                             load_preferences(resolve_input(target)), planted, None)
    validation = {prompt_key(t) for t in load_preferences(resolve_input(target))}
    assert pairs and all(prompt_key(t) not in planted | validation and t.chosen != t.rejected for t in pairs)
    agg = {(a["target"], a["method"]): a for a in res["downstream"]}
    a = agg[("se_2_shot", "length")]
    accs = [r["accuracy"] for r in rows if (r["target"], r["method"]) == ("se_2_shot", "length")]
    assert a["seeds"] == 2 and a["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert (out / "quality_downstream_accuracy.png").exists()
    table = (out / "table.md").read_text()
    glance = table.split("At a glance (means over seeds):")[1].split("\n\n")[1].splitlines()
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    rose_plus = dict(zip(cells(glance[0]), cells(next(x for x in glance if x.startswith("| rose_plus |")))))
    assert rose_plus["se_2_shot: trained model's accuracy"] == fmt_interval(agg[("se_2_shot", "rose_plus")]["accuracy"], 3)
    # paired downstream differences: the per-pair files of both models, seed after seed
    right = {m: np.concatenate([np.load(out / f"seed-{s}" / "se_2_shot" / "downstream" / m / "eval" / "items.npz")
                                ["pair_right"] for s in (0, 1)]) for m in ("rose_plus", "less")}
    vs = agg[("se_2_shot", "rose_plus")]["vs"]["less"]
    assert vs["pairs"]["mean"] == pytest.approx((right["rose_plus"] - right["less"]).mean())
    assert vs["better"] == int((right["rose_plus"] > right["less"]).sum()) and vs["golden"] is not None
    assert agg[("shp_5_shot", "rose_plus")]["vs"]["less"]["golden"] is None  # no SHP test prompts given


def test_selection_summary_has_the_length_diagnostic(tmp_path):
    from rose_select.select.topk import write_selection

    pool = [InstructionRecord(f"p{i}", "s", [Message("user", "q"), Message("assistant", "a" * (i + 1))]) for i in range(8)]
    scores = np.arange(8, dtype=np.float64) * 2.0  # ranks exactly by answer length
    with pytest.warns(RuntimeWarning, match="answer length"):
        table = write_selection(tmp_path / "sel", pool, scores, np.array([7, 6]), echo=False)
    summary = json.loads((tmp_path / "sel" / "summary.json").read_text())
    assert summary["length_spearman"] == pytest.approx(1.0) and "WARNING" in table
    write_selection(tmp_path / "sel2", pool, -np.cos(np.arange(8)), np.array([0]), echo=False)
    rho = json.loads((tmp_path / "sel2" / "summary.json").read_text())["length_spearman"]
    assert rho == pytest.approx(spearman(-np.cos(np.arange(8)), np.arange(1, 9)))


def test_stores_each_method_needs():
    from rose_select.select.methods import stores_needed
    from rose_select.select.stage import SelectConfig

    assert stores_needed("rose") == {"pairwise"} and stores_needed("less") == {"sft_chosen"}
    assert stores_needed("rose_plus") == {"pairwise", "sft_chosen"}
    assert stores_needed("rose_ln") == {"sft_chosen", "sft_rejected"}
    assert stores_needed("rose", "pairwise", 0.5) == {"pairwise", "sft_chosen"} and stores_needed("bm25") == set()
    cfg = SelectConfig(method="rose_plus", pool="x", validation="y")
    assert (cfg.direction, cfg.chosen_weight, cfg.center) == ("pairwise", 2.0, True)
    with pytest.raises(ConfigError, match="chosen_weight: not options of method .less."):
        SelectConfig(method="less", chosen_weight=1.0)
    with pytest.raises(ConfigError, match="balanced: not options of method .bm25."):
        SelectConfig(method="bm25", balanced=True)


def test_gpu_scale_script_dry_run_starts_and_resumes(tmp_path):
    """``bench/quality_gpu.sh --dry-run``: the GPU config with a tiny model's scale, end to end
    (every target, a length-removed row trained downstream); the same call again reuses every
    training and evaluation."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run = lambda: subprocess.run(["bash", str(root / "bench" / "quality_gpu.sh"), "--dry-run"], capture_output=True,
                                 text=True, env=env, timeout=1200)
    done = run()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "quality_gpu_dry_run" / "quality"
    res = json.loads((out / "results.json").read_text())
    assert {r["target"] for r in res["rows"]} == {"shp_5_shot", "se_2_shot", "hh_1_shot", "hh_5_shot"}
    assert {"rose_plus-len1", "length"} <= {r["method"] for r in res["downstream_rows"]}
    assert res["config"]["base"]["lora"]["r"] == 2 and res["config"]["generic_records"] == 20000  # --quick: 30 drawn
    stamps = sorted(out.glob("seed-0/*/downstream/*/*/done.json"))
    before = [p.stat().st_mtime_ns for p in stamps]
    assert run().returncode == 0 and [p.stat().st_mtime_ns for p in stamps] == before and stamps
