"""Small statistics for reports: intervals of proportions and of means over seeds, a paired
bootstrap over seeds and items, the exact sign test, partial rank correlation."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from rose_select.plots import _corr, _ranks


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (``successes`` may be fractional: ties count 1/2)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: 1.96 is close enough
# for a report; 2.23 at 10, 2.09 at 19)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(dof: int) -> float:
    return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.4 / dof


def mean_interval(values: Sequence[float]) -> dict:
    """Mean and 95% t-interval over seeds (``lo``/``hi`` None for a single seed)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1}
    half = float(t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(len(v))}


def fmt_interval(stat: dict, digits: int = 2) -> str:
    """``mean [lo, hi]`` of a ``mean_interval`` (the mean alone for one seed, ``-`` for none)."""
    if stat["mean"] is None:
        return "-"
    if stat["lo"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


def cluster_bootstrap_counts(group_sizes: Sequence[int], n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``[n_boot, sum(group_sizes)]``: how often each item is drawn in each replicate of a two-level
    bootstrap, the groups (seeds) with replacement and then the items (prompts, pairs) of every
    drawn group with replacement. Items are numbered group after group. Any mean over items of a
    replicate is then ``counts @ values / counts.sum(1)``: one matrix product for every statistic
    (why two levels: a seed's items and its selection both vary, and both must count)."""
    sizes = [int(s) for s in group_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"every group needs at least one item, got sizes {sizes}")
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    counts = np.zeros((n_boot, sum(sizes)), np.float64)
    for b in range(n_boot):
        for g in rng.integers(0, len(sizes), len(sizes)):
            np.add.at(counts[b], starts[g] + rng.integers(0, sizes[g], sizes[g]), 1.0)
    return counts


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN replicates left out)."""
    r = np.asarray(replicates, np.float64)
    r = r[~np.isnan(r)]
    if len(r) == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(r, tail)), float(np.percentile(r, 100 - tail)))


def sign_test(n_better: int, n_worse: int) -> float:
    """Exact two-sided sign test of ``n_better`` against ``n_worse`` (ties left out): the binomial
    probability at p = 1/2 of a split at least this uneven. On paired right/wrong outcomes it is
    McNemar's exact test of the discordant pairs."""
    n, k = n_better + n_worse, min(n_better, n_worse)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """Spearman correlation of ``x`` and ``y`` given ``z`` (the partial correlation of their ranks);
    NaN when ``x`` or ``y`` is a monotone function of ``z`` (nothing is left once ``z`` is given)."""
    rx, ry, rz = (_ranks(np.asarray(v, np.float64)) for v in (x, y, z))
    xy, xz, yz = _corr(rx, ry), _corr(rx, rz), _corr(ry, rz)
    den = (1 - xz * xz) * (1 - yz * yz)
    if math.isnan(xy) or not den > 1e-12:
        return math.nan
    return float((xy - xz * yz) / math.sqrt(den))
