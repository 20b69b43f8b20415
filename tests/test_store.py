"""Feature store: resume, mismatch refusal, non-finite refusal, crash safety, several writers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rose_select.errors import ConfigError, NonFiniteError, StoreMismatchError
from rose_select.features.store import FeatureStore, StoreNotReadyError, open_features

N, D = 10, 6
IDS = [f"ex{i}" for i in range(N)]
SETTINGS = {"model": "tiny", "checkpoint": "ckpt-1", "data_sha256": "abc",
            "loss": {"name": "sft"}, "projection": {"kind": "sjlt", "dim": D, "seed": 0}}
FEATS = np.arange(N * D, dtype=np.float32).reshape(N, D) / 7 - 3


def _open(path, **changes):
    kwargs = dict(n_rows=N, dim=D, dtype="float32", settings=SETTINGS, row_ids=IDS)
    return FeatureStore.open(path, **{**kwargs, **changes})


def _fill(store, rows):
    rows = np.asarray(rows)
    store.write(rows, FEATS[rows])


def test_create_write_reopen_pending(tmp_path):
    path = tmp_path / "store"
    store = _open(path, row_groups=["a"] * 5 + ["b"] * 5)
    assert store.pending().tolist() == list(range(N)) and store.n_done == 0
    _fill(store, [0, 1, 2])
    _fill(store, [7])
    del store
    again = _open(path, row_groups=["a"] * 5 + ["b"] * 5)
    assert again.pending().tolist() == [3, 4, 5, 6, 8, 9]
    assert again.n_done == 4 and again.n_rows == N and again.dim == D
    rows = json.loads((path / "rows.json").read_text())
    assert rows == {"ids": IDS, "groups": ["a"] * 5 + ["b"] * 5}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["settings"] == SETTINGS and meta["complete"] is False and meta["version"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, dtype):
    whole = _open(tmp_path / "whole", dtype=dtype)
    for batch in np.array_split(np.arange(N), 3):
        _fill(whole, batch)
    whole.finalize()
    part = _open(tmp_path / "part", dtype=dtype)
    _fill(part, [0, 1, 2, 3])
    del part  # "crash"
    resumed = _open(tmp_path / "part", dtype=dtype)
    for batch in np.array_split(resumed.pending(), 2):
        _fill(resumed, batch)
    resumed.finalize()
    a, meta, rows = open_features(tmp_path / "whole")
    b, _, _ = open_features(tmp_path / "part")
    assert a.dtype == np.dtype(dtype) and meta["complete"] and rows["ids"] == IDS
    assert np.array_equal(a, b)
    assert np.allclose(a, FEATS, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("changes,needle", [
    ({"settings": {**SETTINGS, "projection": {"kind": "sjlt", "dim": D, "seed": 1}}},
     "settings.projection.seed: stored 0, requested 1"),
    ({"settings": {**SETTINGS, "extra": True}}, "settings.extra: stored <absent>, requested true"),
    ({"dtype": "float16"}, 'dtype: stored "float32", requested "float16"'),
    ({"row_ids": IDS[:-1] + ["other"]}, "rows.ids[9]: stored 'ex9', requested 'other'"),
    ({"row_groups": ["g"] * N}, "rows.groups: stored null, requested 10 entries"),
])
def test_mismatch_names_the_key(tmp_path, changes, needle):
    _open(tmp_path / "s")
    with pytest.raises(StoreMismatchError) as err:
        _open(tmp_path / "s", **changes)
    assert needle in str(err.value)
    assert "Use a new output directory, or delete" in str(err.value)


def test_mismatched_size_is_refused(tmp_path):
    _open(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match="n_rows: stored 10, requested 11"):
        _open(tmp_path / "s", n_rows=N + 1, row_ids=IDS + ["ex10"])


def test_non_finite_rows_are_refused_whole(tmp_path):
    store = _open(tmp_path / "s")
    feats = FEATS[[2, 3, 4]].copy()
    feats[0, 1], feats[2, 5] = np.nan, np.inf
    with pytest.raises(NonFiniteError, match=r"2 feature row\(s\).*\['ex2', 'ex4'\]") as err:
        store.write([2, 3, 4], feats)
    assert err.value.ids == ["ex2", "ex4"]
    assert store.pending().tolist() == list(range(N))
    assert not np.load(tmp_path / "s" / "features.npy").any()  # nothing of the batch written


def test_float16_overflow_is_non_finite(tmp_path):
    store = _open(tmp_path / "s", dtype="float16")
    with pytest.raises(NonFiniteError, match="beyond the range of float16"):
        store.write([0], np.full((1, D), 1e6, dtype=np.float32))
    assert store.n_done == 0


def test_finalize_and_open_features_require_all_rows(tmp_path):
    store = _open(tmp_path / "s")
    _fill(store, range(N - 1))
    with pytest.raises(StoreNotReadyError, match=r"1 of 10 rows have no features yet \(e.g. \['ex9"):
        store.finalize()
    with pytest.raises(StoreNotReadyError, match="has not finished"):
        open_features(tmp_path / "s")
    partial, meta, _ = open_features(tmp_path / "s", require_complete=False)
    assert not meta["complete"] and np.array_equal(partial[: N - 1], FEATS[: N - 1])
    _fill(store, [N - 1])
    store.finalize()
    feats, meta, _ = open_features(tmp_path / "s")
    assert meta["complete"] and meta["updated"] >= meta["created"]
    with pytest.raises(ValueError, match="read-only"):
        feats[0, 0] = 1.0
    with pytest.raises(StoreNotReadyError, match="not a feature store"):
        open_features(tmp_path / "missing")


_CRASH = """
import os, sys, numpy as np
from rose_select.features.store import FeatureStore
store = FeatureStore.open(sys.argv[1], n_rows={n}, dim={d}, dtype="float32", settings={settings!r}, row_ids={ids!r})
class Die:  # the process dies right after the features are flushed, before rows are marked done
    def __setitem__(self, key, value):
        os._exit(3)
store._done = Die()
store.write([5, 6], np.ones((2, store.dim), dtype=np.float32))
"""


def test_crash_between_features_and_done_mark_leaves_rows_pending(tmp_path):
    path = tmp_path / "s"
    _fill(_open(path), [0])
    proc = subprocess.run([sys.executable, "-c", _CRASH.format(n=N, d=D, settings=SETTINGS, ids=IDS), str(path)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    store = _open(path)
    assert np.load(path / "features.npy")[5].tolist() == [1.0] * D  # features reached the file
    assert store.pending().tolist() == list(range(1, N))  # ... but rows 5, 6 are still pending


def test_failed_creation_leaves_nothing(tmp_path, monkeypatch):
    import rose_select.features.store as store_mod

    def boom(tmp, spec):
        np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype="float32", shape=(N, D))
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_write_files", boom)
    with pytest.raises(OSError, match="disk full"):
        _open(tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_dirs_removed_and_foreign_dirs_refused(tmp_path):
    stale = tmp_path / ".s.creating-999999999-abc"  # a pid that cannot be running
    stale.mkdir()
    (tmp_path / "s").mkdir()  # an empty directory is fine to create into
    _open(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="exists but is not a feature store"):
        _open(tmp_path / "other")


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="9 row ids for n_rows=10"):
        _open(tmp_path / "s", row_ids=IDS[:-1])
    with pytest.raises(ConfigError, match="'ex0' occurs more than once"):
        _open(tmp_path / "s", row_ids=["ex0"] + IDS[:-1])
    with pytest.raises(ConfigError, match="dtype must be one of"):
        _open(tmp_path / "s", dtype="float64")
    with pytest.raises(ConfigError, match="3 row groups"):
        _open(tmp_path / "s", row_groups=["a"] * 3)
    store = _open(tmp_path / "s")
    with pytest.raises(ValueError, match=r"expected features of shape \[1, 6\]"):
        store.write([0], np.zeros((1, D + 1)))
    with pytest.raises(ValueError, match=r"row indices must lie in \[0, 10\)"):
        store.write([N], np.zeros((1, D)))
