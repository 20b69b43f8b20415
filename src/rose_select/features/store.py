"""Feature store: crash-safe, resumable ``[N, d]`` features of one (checkpoint, dataset, loss).

Directory layout:

- ``features.npy``: ``[N, d]`` float16/float32 ``.npy`` memmap (rows not yet written are zero);
- ``done.npy``: ``[N]`` uint8 mask, 1 once a row's features are on disk;
- ``rows.json``: ``{"ids": [...], "groups": [...] | null}`` (groups: subtasks of validation rows);
- ``meta.json``: ``{"settings", "n_rows", "dim", "dtype", "version", "complete", "created",
  "updated"}``; ``settings`` is the caller's fingerprint (model, checkpoint, data hash, loss,
  projection, ...).

Crash safety: a store is built in a hidden sibling directory and renamed into place whole, so a
directory with ``meta.json`` is always a complete, valid store. ``write`` flushes features before
marking rows done, so a crash can lose work but never marks a row done without its features.
One process writes a store: in a multi-process run, rank 0 receives every rank's rows and writes
them (``distributed.py``), so no shared filesystem is needed across nodes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import rose_select
from rose_select.errors import ConfigError, NonFiniteError, RoseError, StoreMismatchError
from rose_select.io import read_json, remove_stale_temps, write_json

FEATURES, DONE, ROWS, META = "features.npy", "done.npy", "rows.json", "meta.json"
DTYPES = ("float16", "float32")
_UNSET = object()


class StoreNotReadyError(RoseError, ValueError):
    """A feature store does not exist (yet) or has rows without features."""


# ---------------------------------------------------------------------------------------------
# Requested layout ("spec") and comparison with what is on disk


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"feature store: {name} must be a positive integer, got {value!r}")
    return int(value)


def _dtype_name(dtype) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ConfigError(f"feature store: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return name


def _spec(*, n_rows=None, dim=None, dtype=None, settings=None, row_ids=None,
          row_groups=_UNSET) -> dict:
    """Normalised form of the given layout arguments (only those given)."""
    spec = {}
    if n_rows is not None:
        spec["n_rows"] = _positive_int("n_rows", n_rows)
    if dim is not None:
        spec["dim"] = _positive_int("dim", dim)
    if dtype is not None:
        spec["dtype"] = _dtype_name(dtype)
    if settings is not None:
        if not isinstance(settings, dict):
            raise ConfigError(f"feature store: settings must be a dict, "
                              f"got {type(settings).__name__}")
        spec["settings"] = _jsonable(settings)
    if row_ids is not None:
        spec["ids"] = [str(i) for i in row_ids]
    if row_groups is not _UNSET:
        spec["groups"] = None if row_groups is None else [str(g) for g in row_groups]
    return spec


def _check_rows(spec: dict) -> None:
    n, ids, groups = spec["n_rows"], spec["ids"], spec["groups"]
    if len(ids) != n:
        raise ConfigError(f"feature store: {len(ids)} row ids for n_rows={n}")
    if len(set(ids)) != n:
        dup = next(i for i, count in Counter(ids).items() if count > 1)
        raise ConfigError(f"feature store: row ids must be unique; {dup!r} occurs more than once")
    if groups is not None and len(groups) != n:
        raise ConfigError(f"feature store: {len(groups)} row groups for n_rows={n}")


def _show(value) -> str:
    text = "<absent>" if value is _UNSET else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _diff(old, new, key: str) -> list[str]:
    """'key: stored X, requested Y' for every (dotted) key where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [line for k in keys
                for line in _diff(old.get(k, _UNSET), new.get(k, _UNSET), f"{key}.{k}")]
    return [] if old == new else [f"{key}: stored {_show(old)}, requested {_show(new)}"]


def _list_diff(key: str, old, new) -> list[str]:
    if old == new:
        return []
    if old is None or new is None or len(old) != len(new):
        size = lambda v: "null" if v is None else f"{len(v)} entries"  # noqa: E731
        return [f"{key}: stored {size(old)}, requested {size(new)}"]
    i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    return [f"{key}[{i}]: stored {old[i]!r}, requested {new[i]!r}"]


# settings keys that say where an input was read, not what it was (its content is fingerprinted
# beside it: data_sha256, adapter_sha256): a reinstalled package or a moved run directory reads the
# same files from another path, and its stores must resume, not be refused
LOCATION_KEYS = ("data", "checkpoint")


def settings_identity(settings):
    """``settings`` without its ``LOCATION_KEYS``: what a store's inputs were, not where."""
    return {k: v for k, v in settings.items() if k not in LOCATION_KEYS} if isinstance(settings, dict) else settings


def _mismatches(meta: dict, rows: dict, spec: dict) -> list[str]:
    out = [f"{k}: stored {_show(meta.get(k, _UNSET))}, requested {_show(spec[k])}"
           for k in ("n_rows", "dim", "dtype") if k in spec and meta.get(k) != spec[k]]
    if "settings" in spec:
        out += _diff(settings_identity(meta.get("settings", _UNSET)), settings_identity(spec["settings"]), "settings")
    for k in ("ids", "groups"):
        if k in spec:
            out += _list_diff(f"rows.{k}", rows.get(k), spec[k])
    return out


# ---------------------------------------------------------------------------------------------
# Atomic creation


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_files(tmp: Path, spec: dict) -> None:
    n, d = spec["n_rows"], spec["dim"]
    for name, dtype, shape in ((FEATURES, spec["dtype"], (n, d)), (DONE, np.uint8, (n,))):
        arr = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr
        _reserve(tmp / name)
    write_json(tmp / ROWS, {"ids": spec["ids"], "groups": spec["groups"]})
    now = _now()
    write_json(tmp / META, {"settings": spec["settings"], "n_rows": n, "dim": d,
                            "dtype": spec["dtype"], "version": rose_select.__version__,
                            "complete": False, "created": now, "updated": now})


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(path: Path, spec: dict) -> None:
    """Build the store in a hidden sibling, then rename it onto ``path`` (an empty or absent
    directory). Losing a creation race to another process is fine: its store is then opened."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if (path / META).exists():  # another process just created it
            return
        raise StoreMismatchError(f"{path} exists but is not a feature store (no {META}); "
                                 f"use a new output directory or delete {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path, "creating")
    _check_free_space(path.parent, spec)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.creating-{os.getpid()}-", dir=path.parent))
    try:
        try:
            _write_files(tmp, spec)
        except OSError as e:  # name the store's path, not the hidden temporary's
            if e.filename is None or not str(e.filename).startswith(str(tmp)):
                raise
            raise OSError(e.errno, e.strerror, str(path) + str(e.filename)[len(str(tmp)):]) from None
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / META).exists():
                raise
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The store


class FeatureStore:
    """A writable feature store. Build with ``open`` (creating rank) or ``attach`` (other ranks)."""

    def __init__(self, path: Path, meta: dict, rows: dict):
        self.path, self.meta, self.rows = path, meta, rows
        shape = (meta["n_rows"], meta["dim"])
        self._features = _open_array(path / FEATURES, "r+", meta["dtype"], shape)
        self._done = _open_array(path / DONE, "r+", "uint8", shape[:1])

    @classmethod
    def open(cls, path, *, n_rows: int, dim: int, dtype, settings: dict, row_ids: list[str],
             row_groups: list[str] | None = None) -> "FeatureStore":
        """Create the store, or reopen it to resume if it was made with the same layout and
        settings; otherwise raise ``StoreMismatchError`` naming every differing key."""
        path = Path(path)
        spec = _spec(n_rows=n_rows, dim=dim, dtype=dtype, settings=settings, row_ids=row_ids,
                     row_groups=row_groups)
        _check_rows(spec)
        if not (path / META).exists():
            _create(path, spec)
        return cls._load(path, spec)

    @classmethod
    def _load(cls, path: Path, spec: dict) -> "FeatureStore":
        meta, rows = read_json(path / META), read_json(path / ROWS)
        diffs = _mismatches(meta, rows, spec)
        if diffs:
            raise StoreMismatchError(
                f"{path} holds features made with other settings:\n  " + "\n  ".join(diffs[:20])
                + f"\nUse a new output directory, or delete {path} to recompute.")
        return cls(path, meta, rows)

    @property
    def n_rows(self) -> int:
        return self.meta["n_rows"]

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def n_done(self) -> int:
        return int(np.count_nonzero(self._done))

    def pending(self) -> np.ndarray:
        """Indices of rows without features, ascending (int64)."""
        return np.flatnonzero(self._done == 0)

    def write(self, rows, feats) -> None:
        """Store ``feats [k, dim]`` for row indices ``rows [k]``: features are flushed to disk
        before the rows are marked done. A batch with a non-finite row (after casting to the store
        dtype) is refused whole with ``NonFiniteError`` naming the row ids."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        feats = np.asarray(feats)
        if feats.shape != (len(rows), self.dim):
            raise ValueError(f"{self.path}: expected features of shape [{len(rows)}, {self.dim}], "
                             f"got {list(feats.shape)}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise ValueError(f"{self.path}: row indices must lie in [0, {self.n_rows}), got "
                             f"[{rows.min()}, {rows.max()}]")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            cast = feats.astype(self.dtype, copy=False)
        self._check_finite(rows, feats, cast)
        self._features[rows] = cast
        self._features.flush()
        self._done[rows] = 1
        self._done.flush()

    def _check_finite(self, rows: np.ndarray, feats: np.ndarray, cast: np.ndarray) -> None:
        bad = ~np.isfinite(cast).all(axis=1)
        if not bad.any():
            return
        ids = [self.rows["ids"][i] for i in rows[bad]]
        overflow = bool(np.isfinite(feats[bad]).all())
        hint = (f" (finite in the input but beyond the range of {self.dtype}: store float32 or "
                f"normalise first)" if overflow else "")
        err = NonFiniteError(f"{self.path}: {len(ids)} feature row(s) are NaN/inf{hint}; ids "
                             f"{ids[:10]}{' ...' if len(ids) > 10 else ''}; nothing of this batch "
                             f"was written")
        err.ids = ids
        raise err

    def finalize(self, notes: dict | None = None) -> None:
        """Mark the store complete, recording ``notes`` (e.g. the precision) in ``meta.json``;
        raises ``StoreNotReadyError`` while rows are pending."""
        pending = self.pending()
        if pending.size:
            ids = [self.rows["ids"][i] for i in pending[:5]]
            raise StoreNotReadyError(
                f"{self.path}: {pending.size} of {self.n_rows} rows have no features yet (e.g. "
                f"{ids}); run again with the same settings to fill them")
        self.meta = {**self.meta, **_jsonable(notes or {}), "complete": True, "updated": _now()}
        write_json(self.path / META, self.meta)


def _check_free_space(where: Path, spec: dict) -> None:
    """Refuse, before anything is written, a store the disk cannot hold: a memmap that runs out
    of space dies of SIGBUS instead of raising."""
    need = spec["n_rows"] * (spec["dim"] * np.dtype(spec["dtype"]).itemsize + 1) + (1 << 20)
    free = shutil.disk_usage(where).free
    if free < need:
        raise StoreNotReadyError(f"{where}: not enough free space for the feature store: it needs "
                                 f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free some "
                                 f"space or choose another output directory")


def _reserve(path: Path) -> None:
    """Allocate every block of a (sparse) array file now, so writing rows later cannot hit a full
    disk inside the memmap (SIGBUS); a full disk is an ``OSError`` naming the file here instead."""
    size = path.stat().st_size
    if path.stat().st_blocks * 512 >= size or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _check_size(path: Path, dtype, shape: tuple) -> None:
    """The file must hold exactly its header plus the array: a truncated file (an interrupted
    copy, a full disk) would otherwise be zero-extended by the memmap and its rows read as zeros."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape_, _, dtype_ = read(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise StoreMismatchError(f"{path} is damaged ({e}); delete {path.parent} to recompute") from None
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected and (shape_, dtype_) == (tuple(shape), np.dtype(dtype)):
        raise StoreMismatchError(
            f"{path} is damaged: {actual} bytes, but its header and meta.json need {expected} "
            f"(an interrupted copy or a full disk?); copy the store again from its source, or delete "
            f"{path.parent} to recompute")


def _open_array(path: Path, mode: str, dtype, shape: tuple) -> np.ndarray:
    _check_size(path, dtype, shape)
    if mode == "r+":
        _reserve(path)
    try:  # an object-dtype (pickled) array is refused by open_memmap before any unpickling
        arr = np.lib.format.open_memmap(path, mode=mode)
    except ValueError as e:
        raise StoreMismatchError(f"{path} is damaged or not a plain numeric array ({e}); "
                                 f"delete {path.parent} to recompute") from None
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise StoreMismatchError(f"{path} is damaged: shape {list(arr.shape)} {arr.dtype}, "
                                 f"meta.json says {list(shape)} {np.dtype(dtype)}; "
                                 f"delete {path.parent} to recompute")
    return arr


def open_features(path, *, require_complete: bool = True) -> tuple[np.ndarray, dict, dict]:
    """Read-only ``(features [N, d] memmap, meta, rows)`` of a store. With
    ``require_complete`` (default), refuse a store whose featurisation has not finished."""
    path = Path(path)
    if not (path / META).exists():
        raise StoreNotReadyError(f"{path}: not a feature store (no {META}); run featurize first")
    meta, rows = read_json(path / META), read_json(path / ROWS)
    if require_complete and not meta.get("complete"):
        raise StoreNotReadyError(f"{path}: featurisation has not finished (meta.json complete="
                                 f"false); run featurize again with the same settings to resume")
    features = _open_array(path / FEATURES, "r", meta["dtype"], (meta["n_rows"], meta["dim"]))
    return features, meta, rows
