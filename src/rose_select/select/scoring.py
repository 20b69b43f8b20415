"""ROSE / LESS score math, streamed over the pool.

    score(z) = reduce_s [ mean_{j in subtask s} sum_i w_i cos(train_i(z), val_i(j)) ]

with i over checkpoints, w_i the checkpoint weights (mean learning rate of each warm-up epoch,
normalised to sum to 1), and reduce = max over subtasks (the paper) or mean. LESS is the same
formula with validation SFT-loss gradients in place of preference-loss gradients.

Because the mean of cosines is the inner product with a mean of unit vectors,

    mean_j cos(x, v_j) = < x/|x|, mean_j v_j/|v_j| >,

each checkpoint's validation side collapses to one ``[d, S]`` matrix of per-subtask mean unit
vectors, and scoring a chunk of pool rows is a single ``[chunk, d] @ [d, S]`` product. The pool is
read in chunks from its memmap (never all ``[N, d]`` at once), each chunk cast into one reused
buffer, and the chunk's mapped pages are released after use so the resident set stays bounded.

Zero vectors have no direction: their cosine with anything is defined as 0, and they are reported
(``ScoreResult.zero_train_rows`` / ``zero_val_rows``) rather than silently turned into NaN.
"""

from __future__ import annotations

import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select.errors import ConfigError, DataError, NonFiniteError, StoreMismatchError
from rose_select.features.store import open_features

# Norms at or below this are treated as zero vectors (float32's smallest normal number).
_TINY = float(np.finfo(np.float32).tiny)
# Default size of the chunk buffer when ``chunk_rows`` is not given.
_CHUNK_BYTES = 128 << 20


@dataclass
class ScoreResult:
    """Scores of every pool row, what every selection method returns. For the gradient methods
    ``per_group[:, s]`` is the weighted mean cosine with subtask ``group_names[s]`` and ``scores``
    its max (or mean) over subtasks."""

    scores: np.ndarray  # [N] float64
    per_group: np.ndarray | None = None  # [N, S] float64; None for methods without subtasks
    group_names: list[str] | None = None
    zero_train_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    zero_val_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    extra: dict = field(default_factory=dict)  # the method's own settings and weights, for summary.json

    def best_group(self) -> list[str]:
        """Name of the best-matching subtask of every pool row."""
        return [self.group_names[k] for k in np.argmax(self.per_group, axis=1)]


# ---------------------------------------------------------------------------- small pure math

def checkpoint_weights(epoch_mean_lrs: Sequence[float], *, override: Sequence[float] | None = None,
                       n_checkpoints: int | None = None) -> np.ndarray:
    """Checkpoint weights: the mean learning rate of each epoch (or ``override``), normalised to
    sum to 1. ``n_checkpoints`` (default: ``len(epoch_mean_lrs)``) is checked against both."""
    values = epoch_mean_lrs if override is None else override
    what = "epoch mean learning rates" if override is None else "checkpoint weight override"
    w = np.asarray(list(values), dtype=np.float64)
    expected = len(epoch_mean_lrs) if n_checkpoints is None else n_checkpoints
    if w.ndim != 1 or len(w) == 0:
        raise ConfigError(f"{what}: expected a non-empty list of numbers, got {list(values)!r}")
    if len(w) != expected:
        raise ConfigError(f"{what}: {len(w)} value(s) {w.tolist()} for {expected} checkpoint(s)")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"{what}: values must be finite and non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise ConfigError(f"{what}: values sum to {w.sum()}; need a positive sum, got {w.tolist()}")
    return w / w.sum()


def normalize_rows(x: np.ndarray, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length rows of ``x`` (as ``dtype``) and a mask of rows that were zero (left as 0)."""
    x = np.asarray(x, dtype=dtype)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = ~(norms > _TINY)
    inv = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, norms))
    return (x * inv[:, None].astype(dtype)), zero


def cosine_matrix(a: np.ndarray, b: np.ndarray, *, dtype=np.float64,
                  return_zero_rows: bool = False):
    """``[n, m]`` cosines between rows of ``a`` and rows of ``b``; a zero row has cosine 0 with
    everything. With ``return_zero_rows`` also returns the zero-row masks of ``a`` and ``b``."""
    an, za = normalize_rows(a, dtype)
    bn, zb = normalize_rows(b, dtype)
    cos = an @ bn.T
    return (cos, za, zb) if return_zero_rows else cos


def group_index(groups: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Subtask names in order of first appearance, and each row's subtask index."""
    names: dict[str, int] = {}
    idx = np.array([names.setdefault(str(g), len(names)) for g in groups], dtype=np.int64)
    return list(names), idx


def group_means(x: np.ndarray, group_idx: np.ndarray, n_groups: int) -> np.ndarray:
    """``[d, S]``: column s is the mean of the rows of ``x`` in group s."""
    sums = np.zeros((n_groups, x.shape[1]), dtype=np.float64)
    np.add.at(sums, group_idx, x)
    counts = np.bincount(group_idx, minlength=n_groups).astype(np.float64)
    return (sums / counts[:, None]).T


DIRECTIONS = ("pairwise", "pairwise_ln")


def validation_directions(direction: str, *, pairwise: np.ndarray | None = None, chosen: np.ndarray | None = None,
                          rejected: np.ndarray | None = None, chosen_weight: float = 0.0) -> np.ndarray:
    """One checkpoint's validation vectors ``[M, d]`` for a ROSE variant, from feature arrays of
    the same M triples (loss-gradient orientation, any positive scale per row):

    - ``pairwise``: the DPO-loss gradient (``rose``; summed log-probabilities), unit length;
    - ``pairwise_ln``: ``sft_chosen - sft_rejected``, the gradient of the *length-normalised*
      difference ``-log pi(y_w|x)/|y_w| + log pi(y_l|x)/|y_l|``, unit length;

    plus ``chosen_weight`` times the unit chosen-answer SFT gradient (LESS's direction), which keeps
    the target's domain that a difference of two in-domain gradients cancels. Rows are re-normalised
    by the scorer; a zero row stays zero."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if chosen_weight < 0:
        raise ConfigError(f"chosen_weight must be >= 0, got {chosen_weight}")
    need = {"pairwise": ["pairwise"], "pairwise_ln": ["chosen", "rejected"]}[direction]
    need += ["chosen"] if chosen_weight > 0 else []
    given = {"pairwise": pairwise, "chosen": chosen, "rejected": rejected}
    missing = [k for k in dict.fromkeys(need) if given[k] is None]
    if missing:
        raise ConfigError(f"direction {direction!r} with chosen_weight {chosen_weight} needs the {missing} "
                          "validation feature stores")
    if direction == "pairwise":
        out, _ = normalize_rows(pairwise)
    else:
        out, _ = normalize_rows(np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64))
    if chosen_weight > 0:
        out = out + chosen_weight * normalize_rows(chosen)[0]
    return out


def standardize_groups(per_group: np.ndarray) -> np.ndarray:
    """Each subtask's column as z-scores over the pool (mean 0, std 1; a constant column -> 0), so
    no subtask wins the max over subtasks by the scale of its typical cosine alone."""
    per_group = np.asarray(per_group, np.float64)
    std = per_group.std(axis=0)
    return (per_group - per_group.mean(axis=0)) / np.where(std > 0, std, 1.0)


def reduce_groups(per_group: np.ndarray, reduce: str) -> np.ndarray:
    if reduce == "max":
        return per_group.max(axis=1)
    if reduce == "mean":
        return per_group.mean(axis=1)
    raise ConfigError(f"reduce must be 'max' or 'mean', got {reduce!r}")


# ---------------------------------------------------------------------------- streaming helpers

def progress_enabled(progress: bool) -> bool:
    return progress and os.environ.get("ROSE_NO_PROGRESS", "") not in ("1", "true", "yes")


def default_chunk_rows(d: int, itemsize: int = 4) -> int:
    return max(1, _CHUNK_BYTES // max(1, d * itemsize))


def _row_label(start: int, rows: np.ndarray, ids: Sequence[str] | None) -> list[str]:
    return [str(ids[start + r]) if ids is not None else f"row {start + r}" for r in rows]


def read_chunk(array: np.ndarray, start: int, end: int, buf: np.ndarray) -> np.ndarray:
    """Rows ``start:end`` of ``array`` cast into the front of the reusable buffer ``buf``."""
    out = buf[: end - start]
    np.copyto(out, array[start:end], casting="same_kind")
    return out


def release_pages(array: np.ndarray, start: int, end: int) -> None:
    """Best effort: drop the mapped pages of rows ``start:end`` of a memmapped ``array`` from this
    process (``MADV_DONTNEED``; the OS page cache keeps them). Keeps the RSS of a streamed pass
    over a file larger than RAM bounded. A no-op for in-memory arrays."""
    mm = getattr(array, "_mmap", None)
    # read-only maps only: on a copy-on-write map ("c") DONTNEED would discard private changes
    if (mm is None or getattr(array, "mode", None) != "r" or not hasattr(mm, "madvise")
            or not array.flags.c_contiguous or end <= start):
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        row_bytes = array.strides[0]
        lo = array.ctypes.data - base + start * row_bytes
        hi = array.ctypes.data - base + end * row_bytes
        lo -= lo % mmap.PAGESIZE
        hi -= hi % mmap.PAGESIZE
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError, AttributeError, BufferError):
        pass


def chunk_norms(x: np.ndarray, start: int, ids: Sequence[str] | None) -> np.ndarray:
    """Float64 row norms of a chunk; raises ``NonFiniteError`` naming rows with NaN/inf."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = np.flatnonzero(~np.isfinite(norms))
    if len(bad):
        nonfinite = bad[~np.isfinite(x[bad]).all(axis=1)]
        if len(nonfinite):
            names = _row_label(start, nonfinite[:10], ids)
            more = f" and {len(nonfinite) - 10} more" if len(nonfinite) > 10 else ""
            raise NonFiniteError(f"non-finite feature values in {names}{more}")
        # finite but the float32 sum of squares overflowed: redo those rows in float64
        norms = norms.astype(np.float64)
        norms[bad] = np.linalg.norm(x[bad].astype(np.float64), axis=1)
    return norms.astype(np.float64)


def check_shapes(train_features, val_features, weights, val_groups) -> None:
    """Refuse inconsistent per-checkpoint feature arrays, weights and validation groups."""
    if len(train_features) == 0:
        raise ConfigError("no checkpoints: train_features is empty")
    if len(train_features) != len(val_features):
        raise StoreMismatchError(f"{len(train_features)} pool feature arrays but "
                                 f"{len(val_features)} validation feature arrays (one per checkpoint)")
    if len(weights) != len(train_features):
        raise ConfigError(f"{len(weights)} checkpoint weights for {len(train_features)} checkpoints")
    n, m = train_features[0].shape[0], val_features[0].shape[0]
    if m == 0:
        raise ConfigError("no validation rows to score against")
    for i, (t, v) in enumerate(zip(train_features, val_features)):
        if t.ndim != 2 or v.ndim != 2:
            raise StoreMismatchError(f"checkpoint {i}: features must be 2-D, got {t.shape} and {v.shape}")
        if t.shape[0] != n or v.shape[0] != m:
            raise StoreMismatchError(f"checkpoint {i}: {t.shape[0]} pool / {v.shape[0]} validation rows, "
                                     f"checkpoint 0 has {n} / {m}")
        if t.shape[1] != v.shape[1]:
            raise StoreMismatchError(f"checkpoint {i}: pool dimension {t.shape[1]} != validation "
                                     f"dimension {v.shape[1]} (different projections?)")
    if len(val_groups) != m:
        raise StoreMismatchError(f"{len(val_groups)} validation groups for {m} validation rows")


def _val_group_means(val, g_idx, n_groups, dtype, val_ids) -> tuple[np.ndarray, np.ndarray]:
    """Per-subtask mean of unit validation vectors ``[d, S]`` and the zero-row mask."""
    v = np.asarray(val, dtype=np.float64)
    chunk_norms(v, 0, val_ids)  # raises on non-finite
    vn, zero = normalize_rows(v, np.float64)
    return group_means(vn, g_idx, n_groups).astype(dtype), zero


# ---------------------------------------------------------------------------- the score

def pool_means(train_features: Sequence[np.ndarray], *, chunk_rows: int | None = None) -> list[np.ndarray]:
    """Per checkpoint, the mean pool feature ``[d]`` (float64), streamed over the rows."""
    means = []
    for train in train_features:
        n, d = train.shape
        rows = chunk_rows or default_chunk_rows(d, 8)
        total = np.zeros(d, dtype=np.float64)
        for start in range(0, n, rows):
            total += np.asarray(train[start:start + rows], dtype=np.float64).sum(axis=0)
            release_pages(train, start, min(n, start + rows))
        means.append(total / max(n, 1))
    return means


def stream_group_scores(train_features: Sequence[np.ndarray], group_vectors: Sequence[np.ndarray],
                        weights: Sequence[float] | np.ndarray, *, normalize: bool = True,
                        chunk_rows: int | None = None, dtype=np.float32, progress: bool = True,
                        train_ids: Sequence[str] | None = None,
                        centers: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``per_group[z, s] = sum_i w_i <f(train_i(z)), group_vectors[i][:, s]>`` streamed over the
    pool, with ``f`` = L2 normalisation (zero rows -> 0) when ``normalize``, else the identity
    (with ``centers``, ``train_i(z) - centers[i]`` takes the place of ``train_i(z)``).
    Returns ``per_group`` ([N, S] float64) and the mask of pool rows that are zero in some
    checkpoint. Memory: one ``[chunk_rows, d]`` buffer plus the ``[N, S]`` result."""
    n, d = train_features[0].shape
    n_groups = group_vectors[0].shape[1]
    per_group = np.zeros((n, n_groups), dtype=np.float64)
    train_zero = np.zeros(n, dtype=bool)
    rows = chunk_rows or default_chunk_rows(d, np.dtype(dtype).itemsize)
    if rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    buf = np.empty((min(rows, max(n, 1)), d), dtype=dtype)
    vecs = [np.asarray(g, dtype=dtype) for g in group_vectors]
    from tqdm.auto import tqdm

    with tqdm(total=n, unit="row", desc="scoring", disable=not progress_enabled(progress)) as bar:
        for start in range(0, n, rows):
            end = min(n, start + rows)
            for i, train in enumerate(train_features):
                x = read_chunk(train, start, end, buf)
                if centers is not None:
                    x -= centers[i].astype(dtype)
                norms = chunk_norms(x, start, train_ids)
                zero = ~(norms > _TINY)
                scale = np.full(end - start, float(weights[i]))
                if normalize:
                    scale *= np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, norms))
                per_group[start:end] += scale[:, None] * (x @ vecs[i])
                train_zero[start:end] |= zero
                release_pages(train, start, end)
            bar.update(end - start)
    return per_group, train_zero


def rose_scores(train_features: Sequence[np.ndarray], val_features: Sequence[np.ndarray],
                weights: Sequence[float], val_groups: Sequence[str], *, reduce: str = "max",
                chunk_rows: int | None = None, dtype=np.float32, progress: bool = True,
                train_ids: Sequence[str] | None = None,
                val_ids: Sequence[str] | None = None, center: bool = False) -> ScoreResult:
    """ROSE (or LESS) scores of every pool row, streamed over the pool in chunks of rows.

    ``train_features[i]`` / ``val_features[i]``: ``[N, d]`` / ``[M, d]`` features of checkpoint i
    (memmaps welcome; any float dtype). ``val_groups``: the subtask of each validation row.
    ``dtype``: compute precision of the chunk products (float32 default; float64 for exactness).
    ``train_ids``/``val_ids`` only name rows in error messages. ``center``: subtract each
    checkpoint's mean pool feature from every pool row before the cosine. Adam-preconditioned
    features share the warm-up's momentum term ``beta1 m / sqrt(v)`` (measured: cosine 0.76 of a row
    with the pool mean, SmolLM2 r=8); left in, it adds a per-row bias that depends on the row's own
    gradient norm, not on its direction.
    """
    check_shapes(train_features, val_features, weights, val_groups)
    reduce_groups(np.zeros((1, 1)), reduce)  # validate early
    w = np.asarray(weights, dtype=np.float64)
    names, g_idx = group_index(val_groups)
    mus, val_zero = [], np.zeros(len(val_groups), dtype=bool)
    for v in val_features:
        mu, zero = _val_group_means(v, g_idx, len(names), dtype, val_ids)
        mus.append(mu)
        val_zero |= zero
    per_group, train_zero = stream_group_scores(
        train_features, mus, w, normalize=True, chunk_rows=chunk_rows, dtype=dtype,
        centers=pool_means(train_features, chunk_rows=chunk_rows) if center else None,
        progress=progress, train_ids=train_ids)
    result = ScoreResult(reduce_groups(per_group, reduce), per_group, names,
                         np.flatnonzero(train_zero), np.flatnonzero(val_zero))
    _warn_zero_rows(result, train_ids, val_ids)
    return result


def _warn_zero_rows(result: ScoreResult, train_ids, val_ids) -> None:
    for what, rows, ids in (("pool", result.zero_train_rows, train_ids),
                            ("validation", result.zero_val_rows, val_ids)):
        if len(rows):
            shown = [str(ids[r]) if ids is not None else int(r) for r in rows[:5]]
            warnings.warn(f"{len(rows)} {what} row(s) have all-zero features (cosine taken as 0): "
                          f"{shown}{' ...' if len(rows) > 5 else ''}", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------- feature stores

@dataclass
class StoreFeatures:
    features: np.ndarray  # [N, d], memmapped
    ids: list[str]
    groups: list[str] | None
    meta: dict


def load_store_features(path: str | os.PathLike) -> StoreFeatures:
    """Open a feature store directory read-only (``features.npy`` memmapped, ``rows.json``)."""
    path = Path(path)
    feats, meta, rows = open_features(path)
    ids = [str(i) for i in rows["ids"]]
    groups = rows.get("groups")
    if feats.ndim != 2 or feats.shape[0] != len(ids):
        raise DataError(f"features.npy has shape {feats.shape} but rows.json lists {len(ids)} ids",
                        path=str(path))
    if groups is not None and len(groups) != len(ids):
        raise DataError(f"rows.json: {len(groups)} groups for {len(ids)} ids", path=str(path))
    return StoreFeatures(feats, ids, None if groups is None else [str(g) for g in groups], meta or {})


def score_stores(train_paths: Sequence[str | os.PathLike], val_paths: Sequence[str | os.PathLike],
                 weights: Sequence[float], *, reduce: str = "max", chunk_rows: int | None = None,
                 dtype=np.float32, progress: bool = True, center: bool = False) -> tuple[ScoreResult, list[str]]:
    """``rose_scores`` on feature stores (one pool and one validation store per checkpoint).
    Refuses stores whose row ids (or validation groups) differ between checkpoints. Subtask names
    come from the validation store's ``rows.json`` groups. Returns the result and the pool ids."""
    train = [load_store_features(p) for p in train_paths]
    val = [load_store_features(p) for p in val_paths]
    for kind, stores, paths in (("pool", train, train_paths), ("validation", val, val_paths)):
        for s, p in zip(stores[1:], paths[1:]):
            if s.ids != stores[0].ids or s.groups != stores[0].groups:
                raise StoreMismatchError(f"{kind} store {p} lists other rows (ids/groups) than "
                                         f"{paths[0]}; featurize every checkpoint on the same data")
    groups = val[0].groups
    if groups is None:
        raise DataError("validation store has no groups in rows.json (subtask of every row)",
                        path=str(val_paths[0]))
    result = rose_scores([s.features for s in train], [s.features for s in val], weights, groups,
                         reduce=reduce, chunk_rows=chunk_rows, dtype=dtype, progress=progress, center=center,
                         train_ids=train[0].ids, val_ids=val[0].ids)
    return result, train[0].ids

