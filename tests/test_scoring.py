"""ROSE/LESS score math: the streamed fast path against a direct NumPy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rose_select.errors import ConfigError, NonFiniteError, StoreMismatchError
from rose_select.select.scoring import (checkpoint_weights, cosine_matrix, load_store_features,
                                 rose_scores, score_stores)


def direct_scores(trains, vals, weights, groups, reduce="max"):
    """The formula as written: sum_i w_i cos, mean over each subtask's rows, then reduce."""
    names = list(dict.fromkeys(groups))
    groups = np.asarray(groups)
    total = sum(w * cosine_matrix(t, v) for w, t, v in zip(weights, trains, vals))  # [N, M]
    per_group = np.stack([total[:, groups == g].mean(axis=1) for g in names], axis=1)
    return (per_group.max(1) if reduce == "max" else per_group.mean(1)), per_group, names


def make(rng, n=23, m=9, d=16, ckpts=2):
    trains = [rng.standard_normal((n, d)) for _ in range(ckpts)]
    vals = [rng.standard_normal((m, d)) for _ in range(ckpts)]
    groups = ["b", "a", "c", "a", "b", "c", "c", "a", "b"][:m]
    return trains, vals, groups


def test_checkpoint_weights_normalise_and_validate():
    np.testing.assert_allclose(checkpoint_weights([2e-5, 1e-5, 1e-5]), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(checkpoint_weights([1.0, 1.0], override=[3, 1]), [0.75, 0.25])
    with pytest.raises(ConfigError, match="non-negative"):
        checkpoint_weights([1.0, -0.5])
    with pytest.raises(ConfigError, match="positive sum"):
        checkpoint_weights([0.0, 0.0])
    with pytest.raises(ConfigError, match="3 value"):
        checkpoint_weights([1.0, 1.0], override=[1, 1, 1])
    with pytest.raises(ConfigError, match="for 4 checkpoint"):
        checkpoint_weights([1.0, 1.0], n_checkpoints=4)


def test_cosine_matrix_matches_definition_and_zero_rows():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((4, 7))
    a[2] = 0
    cos, za, zb = cosine_matrix(a, b, return_zero_rows=True)
    for i in (0, 1, 3, 4):
        for j in range(4):
            expected = a[i] @ b[j] / np.linalg.norm(a[i]) / np.linalg.norm(b[j])
            assert cos[i, j] == pytest.approx(expected, abs=1e-12)
    assert np.all(cos[2] == 0) and za.tolist() == [False, False, True, False, False] and not zb.any()


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_rose_scores_equal_direct_computation(reduce):
    rng = np.random.default_rng(1)
    trains, vals, groups = make(rng)
    w = checkpoint_weights([3.0, 1.0])
    res = rose_scores(trains, vals, w, groups, reduce=reduce, dtype=np.float64, progress=False)
    want, per_group, names = direct_scores(trains, vals, w, groups, reduce)
    assert res.group_names == names == ["b", "a", "c"]
    np.testing.assert_allclose(res.per_group, per_group, atol=1e-12)
    np.testing.assert_allclose(res.scores, want, atol=1e-12)


def test_float32_default_close_to_float64():
    rng = np.random.default_rng(2)
    trains, vals, groups = make(rng)
    trains16 = [t.astype(np.float16) for t in trains]
    res = rose_scores(trains16, vals, [0.5, 0.5], groups, progress=False)
    want, _, _ = direct_scores([t.astype(np.float64) for t in trains16], vals, [0.5, 0.5], groups)
    np.testing.assert_allclose(res.scores, want, atol=1e-5)


def test_chunking_invariance():
    rng = np.random.default_rng(3)
    trains, vals, groups = make(rng, n=31)
    runs = [rose_scores(trains, vals, [0.7, 0.3], groups, chunk_rows=c, dtype=np.float64,
                        progress=False).per_group for c in (1, 7, 31, 1000)]
    for r in runs[1:]:
        np.testing.assert_allclose(r, runs[0], atol=1e-10, rtol=0)


def test_checkpoint_weighting_is_linear():
    rng = np.random.default_rng(4)
    trains, vals, groups = make(rng)
    one = [rose_scores([t], [v], [1.0], groups, dtype=np.float64, progress=False).per_group
           for t, v in zip(trains, vals)]
    both = rose_scores(trains, vals, [0.2, 0.8], groups, dtype=np.float64, progress=False).per_group
    np.testing.assert_allclose(both, 0.2 * one[0] + 0.8 * one[1], atol=1e-12)


def test_zero_rows_score_zero_and_are_reported():
    rng = np.random.default_rng(5)
    trains, vals, groups = make(rng, ckpts=1)
    trains[0][4] = 0
    vals[0][1] = 0
    with pytest.warns(RuntimeWarning, match="all-zero"):
        res = rose_scores(trains, vals, [1.0], groups, dtype=np.float64, progress=False)
    assert res.zero_train_rows.tolist() == [4] and res.zero_val_rows.tolist() == [1]
    assert np.all(res.per_group[4] == 0)
    want, _, _ = direct_scores(trains, vals, [1.0], groups)
    np.testing.assert_allclose(res.scores, want, atol=1e-12)


def test_non_finite_names_rows():
    rng = np.random.default_rng(6)
    trains, vals, groups = make(rng, ckpts=1)
    trains[0][3, 2] = np.nan
    ids = [f"ex{i}" for i in range(len(trains[0]))]
    with pytest.raises(NonFiniteError, match="ex3"):
        rose_scores(trains, vals, [1.0], groups, train_ids=ids, chunk_rows=2, progress=False)


def test_shape_mismatches_refused():
    rng = np.random.default_rng(7)
    trains, vals, groups = make(rng)
    with pytest.raises(StoreMismatchError, match="dimension"):
        rose_scores(trains, [vals[0], vals[1][:, :8]], [0.5, 0.5], groups, progress=False)
    with pytest.raises(StoreMismatchError, match="groups"):
        rose_scores(trains, vals, [0.5, 0.5], groups[:-1], progress=False)
    with pytest.raises(ConfigError, match="weights"):
        rose_scores(trains, vals, [1.0], groups, progress=False)
    with pytest.raises(ConfigError, match="reduce"):
        rose_scores(trains, vals, [0.5, 0.5], groups, reduce="min", progress=False)


def write_store(path, feats, ids, groups=None, dtype=np.float16):
    """A feature store laid out as in docs/DESIGN.md (without the real store module)."""
    path.mkdir(parents=True)
    arr = np.lib.format.open_memmap(path / "features.npy", mode="w+", dtype=dtype, shape=feats.shape)
    arr[:] = feats
    arr.flush()
    del arr
    np.save(path / "done.npy", np.ones(len(ids), dtype=np.uint8))
    (path / "rows.json").write_text(json.dumps({"ids": ids, "groups": groups}))
    (path / "meta.json").write_text(json.dumps({"settings": {}, "n_rows": len(ids), "dim": feats.shape[1],
                                                "dtype": np.dtype(dtype).name, "complete": True}))
    return path


def test_score_stores_reads_memmaps_and_groups(tmp_path):
    rng = np.random.default_rng(8)
    trains, vals, groups = make(rng)
    ids = [f"p{i}" for i in range(len(trains[0]))]
    tp = [write_store(tmp_path / f"train{i}", t, ids) for i, t in enumerate(trains)]
    vp = [write_store(tmp_path / f"val{i}", v, [f"v{j}" for j in range(len(v))], groups)
          for i, v in enumerate(vals)]
    assert isinstance(load_store_features(tp[0]).features, np.memmap)
    res, got_ids = score_stores(tp, vp, [0.5, 0.5], chunk_rows=5, dtype=np.float64, progress=False)
    want, _, names = direct_scores([t.astype(np.float16).astype(np.float64) for t in trains],
                                   [v.astype(np.float16).astype(np.float64) for v in vals],
                                   [0.5, 0.5], groups)
    assert got_ids == ids and res.group_names == names
    np.testing.assert_allclose(res.scores, want, atol=1e-10)
    other = write_store(tmp_path / "train_other", trains[1], ids[::-1])
    with pytest.raises(StoreMismatchError, match="other rows"):
        score_stores([tp[0], other], vp, [0.5, 0.5], progress=False)
