"""Baselines: each fast implementation against its definition on tiny inputs."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest

from rose_select.select.baselines import (bm25_scores, dsir_log_weights, dsir_ngrams, dsir_scores,
                                   influence_preconditioner, influence_scores, knn_shapley,
                                   knn_shapley_sorted, random_scores, rds_scores, record_text,
                                   triple_text)
from rose_select.errors import ConfigError
from rose_select.records import InstructionRecord, Message, PreferenceTriple
from rose_select.select.scoring import cosine_matrix


def test_random_is_seeded():
    a, b, c = random_scores(50, 1), random_scores(50, 1), random_scores(50, 2)
    assert a.shape == (50,) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_texts():
    rec = InstructionRecord("r", "dolly", [Message("user", "hi"), Message("assistant", "yo")])
    tri = PreferenceTriple("t", "s", [Message("user", "q?")], "good", "bad")
    assert record_text(rec) == "hi\nyo" and triple_text(tri) == "q?\ngood"


def test_bm25_ranks_shared_words_first():
    pool = ["the cat sat on the mat", "stock markets fell sharply today",
            "how to bake sourdough bread at home", "my cat likes to sit on a warm mat"]
    queries = ["where did the cat sit? on the mat", "quantum chromodynamics"]
    s = bm25_scores(pool, queries, progress=False)
    assert s.shape == (4,)
    assert min(s[0], s[3]) > max(s[1], s[2])
    assert s[1] == 0 and s[2] == 0
    m = bm25_scores(pool, queries, reduce="mean", progress=False)
    assert np.allclose(m, s / 2)  # the second query matches nothing
    with pytest.raises(ConfigError):
        bm25_scores(pool, queries, reduce="min", progress=False)


def test_dsir_ngrams_and_hash_match_the_package():
    assert dsir_ngrams("Hello, World!!") == ["hello", ",", "world", "!!", "hello ,", ", world", "world !!"]
    from rose_select.select.baselines import _bucket_fn

    bucket = _bucket_fn(10000)
    for s in ("hello", "hello ,", "über"):
        assert bucket(s) == int(hashlib.sha256(s.encode("utf-8")).hexdigest(), 16) % 10000


def test_dsir_log_weights_equal_direct_formula():
    pool = ["a b c", "a a d", "c d e f", ""]
    target = ["a b", "b c c"]
    nb = 7
    bucket = lambda s: int(hashlib.sha256(s.encode()).hexdigest(), 16) % nb  # noqa: E731

    def counts(t):
        c = np.zeros(nb)
        for g in dsir_ngrams(t):
            c[bucket(g)] += 1
        return c

    raw = sum(counts(t) for t in pool)
    tgt = sum(counts(t) for t in target)
    log_diff = np.log(tgt / tgt.sum() + 1e-8) - np.log(raw / raw.sum() + 1e-8)
    want = np.array([counts(t) @ log_diff for t in pool])
    got = dsir_log_weights(pool, target, num_buckets=nb, progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_dsir_ranks_target_like_text_higher_and_is_seeded():
    target = ["the patient was given antibiotics for the infection",
              "doctors treat infection with antibiotics and rest"]
    pool = ["antibiotics treat the infection of the patient",
            "the football match ended in a draw after extra time",
            "stock prices of tech companies rose on tuesday",
            "the doctor gave the patient antibiotics"]
    logw = dsir_scores(pool, target, gumbel=False, progress=False)
    assert min(logw[0], logw[3]) > max(logw[1], logw[2])
    a = dsir_scores(pool, target, seed=3, progress=False)
    b = dsir_scores(pool, target, seed=3, progress=False)
    c = dsir_scores(pool, target, seed=4, progress=False)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_allclose(a - logw, np.random.default_rng(3).gumbel(size=4))
    short = dsir_scores(pool, target, gumbel=False, min_example_length=7, progress=False)
    assert np.isneginf(short[3]) and short[0] == logw[0]


def brute_force_knn_shapley(sim_row, match_row, k):
    """Shapley values by enumerating all permutations; U(S) = mean of the K most similar members'
    match values over K (ties by index), U(empty) = 0."""
    n = len(sim_row)
    order_key = lambda j: (-sim_row[j], j)  # noqa: E731

    def utility(members):
        top = sorted(members, key=order_key)[:k]
        return sum(match_row[j] for j in top) / k

    values = np.zeros(n)
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        for pos, j in enumerate(perm):
            values[j] += utility(perm[:pos + 1]) - utility(perm[:pos])
    return values / math.factorial(n)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("match", ["similarity", "positive"])
def test_knn_shapley_equals_brute_force(k, match):
    rng = np.random.default_rng(k)
    train, val = rng.standard_normal((6, 4)), rng.standard_normal((3, 4))
    sims = cosine_matrix(train, val)
    want = np.mean([brute_force_knn_shapley(sims[:, v], sims[:, v] if match == "similarity"
                                            else (sims[:, v] > 0).astype(float), k)
                    for v in range(3)], axis=0)
    got = knn_shapley(train, val, k=k, match=match, val_block=2, chunk_rows=4, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-12)
    # efficiency: the values of one validation point sum to U(full pool)
    m_sorted = np.sort(sims[:, 0])[::-1]
    assert knn_shapley_sorted(m_sorted, k).sum() == pytest.approx(m_sorted[:k].sum() / k)


def test_knn_shapley_labels():
    rng = np.random.default_rng(9)
    train, val = rng.standard_normal((6, 3)), rng.standard_normal((2, 3))
    tl, vl = [0, 1, 1, 0, 1, 0], [1, 0]
    sims = cosine_matrix(train, val)
    want = np.mean([brute_force_knn_shapley(sims[:, v], (np.array(tl) == vl[v]).astype(float), 2)
                    for v in range(2)], axis=0)
    got = knn_shapley(train, val, k=2, match="label", train_labels=tl, val_labels=vl, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ConfigError, match="labels"):
        knn_shapley(train, val, match="label", progress=False)


def test_influence_matches_formula_and_reduces_to_inner_product():
    rng = np.random.default_rng(10)
    train = rng.standard_normal((20, 8)) * np.linspace(0.1, 3, 8)
    val = rng.standard_normal((5, 8))
    diag = (train ** 2).mean(0)
    h_inv = 1 / (diag + 0.1 * diag.mean())
    np.testing.assert_allclose(influence_preconditioner(train, damping=0.1, chunk_rows=3,
                                                        progress=False), h_inv, rtol=1e-12)
    got = influence_scores(train, val, damping=0.1, chunk_rows=7, progress=False)
    np.testing.assert_allclose(got, (train * h_inv) @ val.mean(0), rtol=1e-10)
    huge = influence_scores(train, val, damping=1e9, progress=False)
    plain = train @ val.mean(0)
    assert np.array_equal(np.argsort(-huge, kind="stable"), np.argsort(-plain, kind="stable"))
    # per-subtask means, then max
    groups = ["a", "b", "a", "b", "b"]
    per = np.stack([(train * h_inv) @ val[[0, 2]].mean(0), (train * h_inv) @ val[[1, 3, 4]].mean(0)], 1)
    np.testing.assert_allclose(influence_scores(train, val, val_groups=groups, reduce="max",
                                                progress=False), per.max(1), rtol=1e-10)
    # a pool example aligned with the validation gradient is the most helpful
    train2 = np.vstack([train, val.mean(0) * 5])
    assert np.argmax(influence_scores(train2, val, progress=False)) == 20


def test_rds_is_mean_per_subtask_then_max():
    rng = np.random.default_rng(11)
    pool, val = rng.standard_normal((10, 6)), rng.standard_normal((4, 6))
    groups = ["x", "y", "x", "y"]
    cos = cosine_matrix(pool, val)
    want = np.maximum(cos[:, [0, 2]].mean(1), cos[:, [1, 3]].mean(1))
    np.testing.assert_allclose(rds_scores(pool, val, groups, progress=False), want, atol=1e-12)
    mean = (cos[:, [0, 2]].mean(1) + cos[:, [1, 3]].mean(1)) / 2
    np.testing.assert_allclose(rds_scores(pool, val, groups, reduce="mean", progress=False), mean,
                               atol=1e-12)
