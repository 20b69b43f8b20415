"""The benchmark's figures where length cannot help (quality_length.py) and the paired statistics
under them (stats.py): hand-built cases, the length scorers' exact 1/2, the bootstrap against
direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rose_select.quality import PlantedRow
from rose_select.quality_length import (
    balanced_accuracy,
    collect_items,
    length_figures,
    pair_table,
    pair_wins,
    target_report,
)
from rose_select.stats import cluster_bootstrap_counts, partial_spearman, percentile_interval, sign_test


def _pool(lengths: list[tuple[int, int]], generic: int = 3, domain: str = "t") -> list[PlantedRow]:
    """Generic rows, then per pair (preferred length, dispreferred length) two planted rows."""
    rows = [PlantedRow(f"g{i}", "generic", -1, None, 100 + i) for i in range(generic)]
    for k, (a, b) in enumerate(lengths):
        rows += [PlantedRow(f"p{k}w", domain, k, True, a), PlantedRow(f"p{k}l", domain, k, False, b)]
    return rows


# preferred longer in 5 pairs, shorter in 3, equal in 1; pairs 2, 5, 7 and 8 within 20% of each other
LENGTHS = [(50, 10), (5, 40), (100, 90), (30, 60), (70, 20), (44, 40), (8, 80), (33, 33), (90, 85)]


def test_length_scorers_get_exactly_one_half_length_balanced():
    truth = _pool(LENGTHS)
    lengths = np.array([r.length for r in truth], np.float64)
    for scorer in (lengths, -lengths, 3 * lengths + 1, np.log(lengths)):
        f = length_figures(scorer, truth, "t")
        assert f["length_balanced"] == 0.5
        assert {f["longer"], f["shorter"]} == {0.0, 1.0}
        assert math.isnan(f["partial_spearman"])  # nothing is left of a length scorer given length
    assert (f["n_longer"], f["n_shorter"]) == (5, 3)


def test_figures_on_a_hand_built_case():
    truth = _pool(LENGTHS)
    t = pair_table(truth, "t")
    assert t.stratum.tolist() == [1, -1, 1, -1, 1, 1, -1, 0, 1]
    assert t.matched().tolist() == [False, False, True, False, False, True, False, True, True]
    scores = np.zeros(len(truth))
    # right on pairs 0, 1, 3 (two shorter-preferred), a tie on pair 2, wrong on the rest
    for k, (w, l) in {0: (2, 1), 1: (5, 0), 3: (1, 0), 2: (4, 4), 4: (0, 3), 5: (0, 1), 6: (0, 1),
                      7: (0, 1), 8: (0, 1)}.items():
        scores[3 + 2 * k], scores[4 + 2 * k] = w, l
    wins = pair_wins(scores, t)
    assert wins.tolist() == [1, 1, 0.5, 1, 0, 0, 0, 0, 0]
    f = length_figures(scores, truth, "t")
    assert f["longer"] == pytest.approx(1.5 / 5) and f["shorter"] == pytest.approx(2 / 3)
    assert f["length_balanced"] == pytest.approx((1.5 / 5 + 2 / 3) / 2)
    assert f["matched"] == pytest.approx(0.5 / 4) and f["n_matched"] == 4
    assert balanced_accuracy(wins, t.stratum) == f["length_balanced"]


def test_partial_spearman_keeps_what_length_does_not_explain():
    rng = np.random.default_rng(0)
    z = rng.normal(size=400)
    y = rng.normal(size=400)
    x = z + 0.5 * y
    assert partial_spearman(x, y, z) > 0.8  # x = length plus y: given length, x tracks y
    assert abs(partial_spearman(z + 0.01 * rng.normal(size=400), y, z)) < 0.2
    assert math.isnan(partial_spearman(z, y, z))


def test_sign_test_is_the_exact_binomial():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(3, 7) == pytest.approx(2 * sum(math.comb(10, i) for i in range(4)) / 1024)
    assert sign_test(7, 3) == sign_test(3, 7)


def test_cluster_bootstrap_draws_whole_groups_then_items():
    counts = cluster_bootstrap_counts([3, 5], n_boot=500, seed=1)
    assert counts.shape == (500, 8)
    # each drawn group contributes exactly its own size: a replicate totals 6, 8 or 10 items
    assert set(counts.sum(1).tolist()) <= {6.0, 8.0, 10.0}
    first, second = counts[:, :3].sum(1), counts[:, 3:].sum(1)
    assert set(first.tolist()) <= {0.0, 3.0, 6.0} and set(second.tolist()) <= {0.0, 5.0, 10.0}
    lo, hi = percentile_interval(np.arange(101.0))
    assert (lo, hi) == pytest.approx((2.5, 97.5))


def test_target_report_pairs_methods_on_the_same_items():
    """Two seeds; the report's point figures are the direct ones, every interval covers its point,
    and a method compared with itself-plus-nothing differs by zero."""
    rng = np.random.default_rng(3)
    per_seed = []
    for seed in range(2):
        lengths = [(int(a), int(b)) for a, b in rng.integers(5, 200, size=(40, 2))]
        truth = _pool(lengths, generic=4)
        n = len(truth)
        ln = np.array([r.length for r in truth], np.float64)
        pref = np.array([1.0 if r.preferred else 0.0 for r in truth])
        per_seed.append((truth, {"less": rng.normal(size=n), "good": pref + 0.3 * rng.normal(size=n),
                                 "length": ln, "copy": None}))
        per_seed[-1][1]["copy"] = per_seed[-1][1]["less"].copy()
    items = collect_items(per_seed, "t")
    rep = target_report(items, references=("less", "length"), n_boot=400, extra_pairs=[("good", "copy")])
    summary = {m["method"]: m for m in rep["methods"]}
    assert summary["length"]["length_balanced"]["mean"] == 0.5
    good = summary["good"]["length_balanced"]
    assert good["lo"] <= good["mean"] <= good["hi"] and good["lo"] > 0.5
    wins = np.concatenate([pair_wins(s["good"], pair_table(t, "t")) for t, s in per_seed])
    assert summary["good"]["n_pairs"] == 80 and rep["methods"][1]["longer"] == pytest.approx(
        wins[items.stratum > 0].mean())
    paired = {(p["method"], p["vs"]): p for p in rep["paired"]}
    same = paired[("copy", "less")]
    assert same["pairs_right"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0} and same["sign_p"] == 1.0
    d = paired[("good", "less")]
    assert d["pairs_right"]["mean"] == pytest.approx(wins.mean() - items.wins["less"].mean())
    assert d["pairs_right"]["lo"] > 0 and d["better"] > d["worse"] and d["sign_p"] < 0.01
    extra = paired[("good", "copy")]
    s = items.stratum
    d = wins - items.wins["copy"]
    assert extra["shorter"]["mean"] == pytest.approx(d[s < 0].mean())
    assert extra["longer"]["mean"] == pytest.approx(d[s > 0].mean())
    assert extra["length_balanced"]["mean"] == pytest.approx((d[s < 0].mean() + d[s > 0].mean()) / 2)


def _brute_scores(pool, pairwise, chosen, groups, chosen_weight, center, dirs=None):
    """max over subtasks of the mean cosine of each (centred, length-removed) pool row with the
    subtask's validation vectors, written out row by row."""
    x = pool - pool.mean(0) if center else pool.copy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if dirs is not None:
        for u in dirs:
            x = x - np.outer(x @ u, u)
    v = pairwise / np.linalg.norm(pairwise, axis=1, keepdims=True)
    if chosen_weight:
        v = v + chosen_weight * chosen / np.linalg.norm(chosen, axis=1, keepdims=True)
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return np.array([max(np.mean([cos(row, v[j]) for j in range(len(v)) if groups[j] == g]) for g in set(groups))
                     for row in x])


@pytest.mark.parametrize("center,chosen_weight", [(True, 2.0), (False, 0.0)])
def test_length_removed_scores_against_brute_force(center, chosen_weight):
    from rose_select.quality_geometry import length_directions, length_removed_scores, remove_directions

    rng = np.random.default_rng(5)
    pool, lengths = rng.normal(size=(40, 12)), rng.integers(5, 500, size=40).astype(float)
    pool[:, 0] += np.log(lengths)  # a length component along the first axis
    pairwise, chosen, groups = rng.normal(size=(3, 12)), rng.normal(size=(3, 12)), ["a", "a", "b"]
    summary = {"center": center, "chosen_weight": chosen_weight, "direction": "pairwise", "checkpoint_weights": [1.0]}
    val = {"pairwise": [pairwise], "chosen": [chosen], "groups": groups}
    for k in (0, 1, 3):
        x = pool - pool.mean(0) if center else pool
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        dirs = length_directions(x, lengths, k)
        assert dirs.shape == (k, 12) and np.allclose(dirs @ dirs.T, np.eye(k), atol=1e-10)
        assert np.allclose(remove_directions(x, dirs) @ dirs.T, 0, atol=1e-12)
        got = length_removed_scores([pool], val, summary, lengths, k)
        assert np.allclose(got, _brute_scores(pool, pairwise, chosen, groups, chosen_weight, center, dirs), atol=1e-10)
    # the first direction is the covariance of log length with the (centred) rows
    y = np.log(lengths) - np.log(lengths).mean()
    cov = (x - x.mean(0)).T @ y
    assert np.allclose(length_directions(x, lengths, 1)[0], cov / np.linalg.norm(cov))


def test_shots_report_compares_one_method_at_two_targets_on_the_same_pairs():
    from rose_select.quality_length import shots_markdown

    rng = np.random.default_rng(9)
    truth = _pool([(int(a), int(b)) for a, b in rng.integers(5, 200, size=(30, 2))])
    pref = np.array([1.0 if r.preferred else 0.0 for r in truth])
    scores = {"m@one": rng.normal(size=len(truth)), "m@five": pref + 0.5 * rng.normal(size=len(truth))}
    items = collect_items([(truth, scores)], "t")
    rep = target_report(items, references=(), extra_pairs=[("m@five", "m@one")], n_boot=200)
    (p,) = rep["paired"]
    assert p["pairs_right"]["mean"] == pytest.approx((items.wins["m@five"] - items.wins["m@one"]).mean())
    table = shots_markdown("t: shots", rep)
    row = next(line for line in table.splitlines() if line.startswith("| m |"))
    assert "| five | one |" in row and f"{p['pairs_right']['mean']:+.2f}" in row
