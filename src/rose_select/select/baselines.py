"""Baseline selectors that need no model gradients of their own: pure functions from texts or
feature arrays to one score per pool example (higher = select first).

* ``random_scores``  – seeded uniform scores.
* ``bm25_scores``    – lexical similarity of each pool example to the validation texts (``bm25s``).
* ``dsir_scores``    – DSIR with hashed n-gram features (Xie et al., 2023). A reimplementation of
  ``data_selection.HashedNgramDSIR`` (the ``data-selection`` package) with the same math:
  lower-cased word/punctuation tokens, unigram + bigram features hashed into ``num_buckets`` by
  ``sha256(ngram) mod num_buckets`` (the package's own hash), bag-of-ngram multinomials of the
  target and of the raw pool, ``log w(x) = sum_b count_x[b] (log(p_target[b] + 1e-8) -
  log(p_raw[b] + 1e-8))``, and selection by Gumbel top-k (``log w + Gumbel noise``), i.e.
  importance resampling without replacement. We do not call the package itself: it needs nltk,
  pickles its state, draws its noise from the unseeded global numpy RNG, and works on file shards
  in a cache directory; here everything is in memory and seeded.
* ``knn_shapley``    – exact KNN-Shapley values (Jia et al., 2019) w.r.t. the validation set.
* ``influence_scores`` / ``influence_preconditioner`` – influence functions with a damped
  diagonal Gauss–Newton (empirical Fisher) Hessian in the projected gradient space.
* ``rds_scores``     – representation similarity (cosine of hidden states), mean per subtask then max.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Sequence

import numpy as np

from rose_select.errors import ConfigError
from rose_select.records import InstructionRecord, PreferenceTriple
from rose_select.select.scoring import (check_shapes, _TINY, chunk_norms,
                                 default_chunk_rows, group_index, group_means, normalize_rows,
                                 progress_enabled, read_chunk, reduce_groups, release_pages,
                                 rose_scores, stream_group_scores)


# ---------------------------------------------------------------------------- texts

def record_text(record: InstructionRecord) -> str:
    """All turns of a pool conversation, one per line (what the text baselines see)."""
    return "\n".join(m.content for m in record.messages)


def triple_text(triple: PreferenceTriple) -> str:
    """A validation triple as a query: its prompt turns and the chosen answer."""
    return "\n".join([*(m.content for m in triple.prompt), triple.chosen])


# ---------------------------------------------------------------------------- random

def random_scores(n: int, seed: int) -> np.ndarray:
    """``[n]`` uniform scores from ``numpy.random.default_rng(seed)``: top-k is a uniform sample."""
    return np.random.default_rng(seed).random(n)


# ---------------------------------------------------------------------------- BM25

def bm25_scores(pool_texts: Sequence[str], query_texts: Sequence[str], *, reduce: str = "max",
                k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                progress: bool = True) -> np.ndarray:
    """BM25 score of every pool document against each query (validation prompt + chosen answer),
    reduced over queries by ``max`` (default) or ``mean``. Tokenisation: ``bm25s.tokenize``
    (lower-case, ``\\w\\w+`` words, English stopwords removed); query words absent from the pool
    contribute nothing."""
    import bm25s
    from tqdm.auto import tqdm

    if reduce not in ("max", "mean"):
        raise ConfigError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    if len(query_texts) == 0:
        raise ConfigError("bm25 needs at least one query text")
    corpus = bm25s.tokenize(list(pool_texts), lower=True, stopwords="en", show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b, method=method)
    retriever.index(corpus, show_progress=False)
    queries = bm25s.tokenize(list(query_texts), lower=True, stopwords="en", return_ids=False,
                             show_progress=False)
    out = np.full(len(pool_texts), -np.inf if reduce == "max" else 0.0)
    for tokens in tqdm(queries, desc="bm25", unit="query", disable=not progress_enabled(progress)):
        ids = retriever.get_tokens_ids([t for t in tokens if t])
        s = (retriever.get_scores_from_ids(ids).astype(np.float64) if ids
             else np.zeros(len(pool_texts)))
        if reduce == "max":
            np.maximum(out, s, out=out)
        else:
            out += s / len(queries)
    return out


# ---------------------------------------------------------------------------- DSIR

# nltk's WordPunctTokenizer pattern (the package's default tokenizer): words, or runs of punctuation.
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")


def dsir_ngrams(text: str, ngram: int = 2) -> list[str]:
    """Lower-cased word/punctuation tokens, followed by their 2..n-grams joined by spaces."""
    words = _WORDPUNCT.findall(text.lower())
    out = list(words)
    for n in range(2, ngram + 1):
        out += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return out


def _bucket_fn(num_buckets: int):
    @functools.lru_cache(maxsize=1 << 20)
    def bucket(s: str) -> int:
        # == int(sha256(s).hexdigest(), 16) % num_buckets, the package's hash_buckets
        return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest(), "big") % num_buckets
    return bucket


def dsir_bucket_ids(text: str, num_buckets: int = 10000, ngram: int = 2, *, _bucket=None) -> np.ndarray:
    """Hashed bucket of every n-gram of one text (uint16 when the buckets fit, else uint32)."""
    bucket = _bucket or _bucket_fn(num_buckets)
    dtype = np.uint16 if num_buckets <= 1 << 16 else np.uint32
    return np.fromiter((bucket(g) for g in dsir_ngrams(text, ngram)), dtype=dtype)


def dsir_log_weights(pool_texts: Sequence[str], target_texts: Sequence[str], *,
                     num_buckets: int = 10000, ngram: int = 2, smoothing: float = 0.0,
                     progress: bool = True) -> np.ndarray:
    """``[N]`` DSIR log importance weights ``log p_target(x) / p_raw(x)`` under hashed n-gram
    bag-of-words models: ``sum_b count_x[b] * log_diff[b]``. The raw model is fit on the pool
    itself (all of it; the package fits on up to 1e5 * num_buckets tokens). ``smoothing`` > 0 adds
    that pseudo-count to every bucket (Laplace smoothing); 0 is the package's behaviour (only the
    1e-8 inside the logs). The pool's bucket ids are kept between the two passes (2 or 4 bytes per
    n-gram) so every text is tokenised and hashed once."""
    from tqdm.auto import tqdm

    if num_buckets < 1 or ngram < 1 or smoothing < 0:
        raise ConfigError(f"need num_buckets >= 1, ngram >= 1, smoothing >= 0; got "
                          f"{num_buckets}, {ngram}, {smoothing}")
    bucket = _bucket_fn(num_buckets)
    show = progress_enabled(progress)

    def probs(texts, desc, keep=None):
        c = np.zeros(num_buckets, dtype=np.float64)
        for t in tqdm(texts, desc=desc, unit="doc", disable=not show):
            ids = dsir_bucket_ids(t, num_buckets, ngram, _bucket=bucket)
            c += np.bincount(ids, minlength=num_buckets)
            if keep is not None:
                keep.append(ids)
        c += smoothing
        if c.sum() <= 0:
            raise ConfigError(f"DSIR: no n-grams in the {desc.split()[-1]} texts (all empty?)")
        return c / c.sum()

    pool_ids: list[np.ndarray] = []
    p_raw = probs(pool_texts, "dsir raw", keep=pool_ids)
    log_diff = np.log(probs(target_texts, "dsir target") + 1e-8) - np.log(p_raw + 1e-8)
    return np.array([log_diff[ids].sum() for ids in pool_ids], dtype=np.float64)


def dsir_scores(pool_texts: Sequence[str], target_texts: Sequence[str], *, num_buckets: int = 10000,
                ngram: int = 2, seed: int = 0, gumbel: bool = True, smoothing: float = 0.0,
                min_example_length: int = 0, progress: bool = True) -> np.ndarray:
    """DSIR selection scores: ``log w(x) + Gumbel(0, 1)`` noise from ``default_rng(seed)``, so the
    top-k of the scores is a sample of k without replacement with probabilities proportional to
    the importance weights (the package's ``resample(top_k=False)``); ``gumbel=False`` gives the
    deterministic top-k of ``log w``. Examples with fewer than ``min_example_length`` word tokens
    score ``-inf`` (the package filters at 100 by default; instruction data is short, so 0 here)."""
    logw = dsir_log_weights(pool_texts, target_texts, num_buckets=num_buckets, ngram=ngram,
                            smoothing=smoothing, progress=progress)
    if gumbel:
        logw = logw + np.random.default_rng(seed).gumbel(size=len(logw))
    if min_example_length > 0:
        lengths = np.array([len(_WORDPUNCT.findall(t.lower())) for t in pool_texts])
        logw[lengths < min_example_length] = -np.inf
    return logw


# ---------------------------------------------------------------------------- KNN-Shapley

def knn_shapley_sorted(match_sorted: np.ndarray, k: int) -> np.ndarray:
    """Exact KNN-Shapley values (Jia et al. 2019, Thm. 1) for the utility
    ``U(S) = (1/K) sum_{j <= min(K, |S|)} m[alpha_j(S)]`` (the K nearest members of S, U(empty)=0).

    ``match_sorted``: ``[N]`` or ``[N, B]`` match values of the pool rows sorted nearest-first
    (one column per validation point). Returns values in the same (sorted) order:
        s_N = m_N min(K, N) / (K N)
        s_i = s_{i+1} + (m_i - m_{i+1}) / K * min(K, i) / i      (i = N-1 .. 1, 1-based)
    The recursion is linear in m, so any real-valued match works, not only 0/1 label agreement.
    """
    m = np.asarray(match_sorted, dtype=np.float64)
    squeeze = m.ndim == 1
    m = m[:, None] if squeeze else m
    n = m.shape[0]
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    s = np.empty_like(m)
    s[-1] = m[-1] * min(k, n) / (k * n)
    if n > 1:
        i = np.arange(1, n, dtype=np.float64)  # 1-based positions 1..N-1
        steps = (m[:-1] - m[1:]) / k * (np.minimum(k, i) / i)[:, None]
        s[:-1] = s[-1] + np.cumsum(steps[::-1], axis=0)[::-1]
    return s[:, 0] if squeeze else s


def knn_shapley(train_feats: np.ndarray, val_feats: np.ndarray, *, k: int = 10,
                match: str = "similarity", train_labels: Sequence | None = None,
                val_labels: Sequence | None = None, val_block: int | None = None,
                chunk_rows: int | None = None, progress: bool = True) -> np.ndarray:
    """Mean over validation points of the exact KNN-Shapley value of every pool row.

    Neighbours are ranked by cosine similarity (= Euclidean distance of unit vectors, Jia et al.'s
    metric), ties by pool index. Pool rows carry no class labels here, so the "label agreement" of
    the original utility is replaced by a match value ``m_j`` of pool row j for validation point v:
      * ``"similarity"`` (default): ``m_j = cos(z_j, v)`` — a soft vote, the similarity itself;
      * ``"positive"``: ``m_j = 1[cos(z_j, v) > 0]``;
      * ``"label"``: ``m_j = 1[train_labels[j] == val_labels[v]]`` — the original classifier form.
    The validation points are processed in blocks against a streamed pool; per point the cost is
    one sort of N similarities (O(N log N)).
    """
    if match not in ("similarity", "positive", "label"):
        raise ConfigError(f"match must be 'similarity', 'positive' or 'label', got {match!r}")
    if match == "label" and (train_labels is None or val_labels is None):
        raise ConfigError("match='label' needs train_labels and val_labels")
    n, d = train_feats.shape
    m_val = val_feats.shape[0]
    if val_feats.shape[1] != d:
        raise ConfigError(f"pool dimension {d} != validation dimension {val_feats.shape[1]}")
    vn, _ = normalize_rows(np.asarray(val_feats, dtype=np.float64))
    block = val_block or max(1, min(m_val, (8 << 20) // max(1, n)))
    total = np.zeros(n, dtype=np.float64)
    tl = None if train_labels is None else np.asarray(train_labels)
    from tqdm.auto import tqdm

    for b0 in tqdm(range(0, m_val, block), desc="knn-shapley", unit="block",
                   disable=not progress_enabled(progress)):
        b1 = min(m_val, b0 + block)
        sims = _stream_cosines(train_feats, vn[b0:b1], chunk_rows)  # [N, B]
        order = np.argsort(-sims, axis=0, kind="stable")
        if match == "similarity":
            mvals = sims
        elif match == "positive":
            mvals = (sims > 0).astype(np.float64)
        else:
            mvals = (tl[:, None] == np.asarray(val_labels)[b0:b1][None, :]).astype(np.float64)
        values = knn_shapley_sorted(np.take_along_axis(mvals, order, axis=0), k)
        unsorted = np.empty_like(values)
        np.put_along_axis(unsorted, order, values, axis=0)
        total += unsorted.sum(axis=1)
    return total / m_val


def _stream_cosines(train_feats: np.ndarray, val_unit: np.ndarray, chunk_rows: int | None) -> np.ndarray:
    """``[N, B]`` cosines of every pool row with unit validation vectors, pool read in chunks."""
    n, d = train_feats.shape
    rows = chunk_rows or default_chunk_rows(d, 8)
    buf = np.empty((min(rows, max(n, 1)), d), dtype=np.float64)
    out = np.empty((n, val_unit.shape[0]), dtype=np.float64)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        x = read_chunk(train_feats, start, end, buf)
        norms = chunk_norms(x, start, None)
        inv = np.where(norms > _TINY, 1.0 / np.maximum(norms, _TINY), 0.0)
        out[start:end] = (x @ val_unit.T) * inv[:, None]
        release_pages(train_feats, start, end)
    return out


# ---------------------------------------------------------------------------- influence functions

def influence_preconditioner(train_feats: np.ndarray, *, damping: float = 0.1,
                             chunk_rows: int | None = None, progress: bool = True) -> np.ndarray:
    """``[d]`` diagonal of ``H^-1`` for ``H = diag(mean_z g_z^2) + damping * mean(diag) * I``.

    The approximation, honestly: the Hessian of the training loss is replaced by the Gauss–Newton
    / empirical Fisher ``E[g g^T]`` estimated from the pool's own (projected) gradient features,
    and of that only the diagonal *in the projected basis* is kept; the damping is relative to the
    mean diagonal entry (kronfluence's heuristic is 0.1 x the mean eigenvalue). One streamed pass.
    """
    if damping < 0:
        raise ConfigError(f"damping must be >= 0, got {damping}")
    n, d = train_feats.shape
    rows = chunk_rows or default_chunk_rows(d, 8)
    buf = np.empty((min(rows, max(n, 1)), d), dtype=np.float64)
    sq = np.zeros(d, dtype=np.float64)
    from tqdm.auto import tqdm

    with tqdm(total=n, unit="row", desc="influence H", disable=not progress_enabled(progress)) as bar:
        for start in range(0, n, rows):
            end = min(n, start + rows)
            x = read_chunk(train_feats, start, end, buf)
            chunk_norms(x, start, None)  # raises on non-finite rows
            sq += np.einsum("ij,ij->j", x, x)
            release_pages(train_feats, start, end)
            bar.update(end - start)
    diag = sq / max(n, 1)
    h = diag + damping * diag.mean()
    if not np.all(h > 0):
        raise ConfigError("influence preconditioner is singular (zero gradient dimensions and "
                          "damping 0); use damping > 0")
    return 1.0 / h


def influence_scores(train_feats: np.ndarray, val_feats: np.ndarray, *, damping: float = 0.1,
                     val_groups: Sequence[str] | None = None, reduce: str = "mean",
                     chunk_rows: int | None = None, progress: bool = True,
                     train_ids: Sequence[str] | None = None) -> np.ndarray:
    """``[N]`` influence of upweighting each pool example on the validation loss at one
    checkpoint, sign flipped so that higher = more helpful:

        score(z) = mean_{val} <g_val, H^-1 g_z>       (I_up,loss = -<g_val, H^-1 g_z>; we return -I)

    with ``H^-1`` from ``influence_preconditioner``. With ``val_groups`` the mean is taken per
    subtask and then reduced by ``reduce`` (``mean`` default, or ``max``). Unnormalised, unlike
    ROSE's cosine. Two streamed passes over the pool: the preconditioner, then the scores.
    Combine checkpoints by a weighted sum of the per-checkpoint scores."""
    groups = ["all"] * val_feats.shape[0] if val_groups is None else val_groups
    check_shapes([train_feats], [val_feats], [1.0], groups)
    reduce_groups(np.zeros((1, 1)), reduce)
    names, g_idx = group_index(groups)
    h_inv = influence_preconditioner(train_feats, damping=damping, chunk_rows=chunk_rows,
                                     progress=progress)
    v = np.asarray(val_feats, dtype=np.float64)
    chunk_norms(v, 0, None)  # raises on non-finite validation rows
    vec = group_means(v, g_idx, len(names)) * h_inv[:, None]  # H^-1 is diagonal and symmetric
    per_group, _ = stream_group_scores([train_feats], [vec], [1.0], normalize=False,
                                       chunk_rows=chunk_rows, dtype=np.float64, progress=progress,
                                       train_ids=train_ids)
    return reduce_groups(per_group, reduce)


# ---------------------------------------------------------------------------- RDS

def rds_scores(pool_emb: np.ndarray, val_emb: np.ndarray, val_groups: Sequence[str], *,
               reduce: str = "max", chunk_rows: int | None = None,
               progress: bool = True) -> np.ndarray:
    """``[N]`` representation-based selection scores: cosine of hidden-state embeddings, mean over
    the validation rows of each subtask, then max (or mean) over subtasks — ROSE's formula with one
    "checkpoint" of weight 1 (call ``rose_scores`` directly for the per-subtask matrix)."""
    return rose_scores([pool_emb], [val_emb], [1.0], val_groups, reduce=reduce,
                       chunk_rows=chunk_rows, dtype=np.float64, progress=progress).scores
