"""Matplotlib figures (Agg, no display). Every function writes one PNG atomically and returns its path.

matplotlib is imported inside the functions (it is slow to import) and figures are built with the
object API (``Figure``), never pyplot, so nothing leaks between calls or threads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rose_select.io import atomic_path


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def score_histogram(scores: np.ndarray, path: str | os.PathLike, *, threshold: float | None = None,
                    title: str = "scores", bins: int = 100) -> Path:
    """Histogram of the pool's scores, with the selection threshold as a vertical line."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    fig, ax = _figure()
    ax.hist(s, bins=bins, color="tab:blue", alpha=0.8)
    if threshold is not None:
        kept = int((s >= threshold).sum())
        ax.axvline(threshold, color="tab:red", linestyle="--",
                   label=f"threshold {threshold:.4g} ({kept} of {len(s)} at or above)")
        ax.legend(loc="upper left")
    ax.set(xlabel="score", ylabel="pool examples", title=title)
    return _save(fig, path)


def share_bar_chart(shares: Mapping[str, Mapping[str, float]], path: str | os.PathLike, *,
                    title: str = "share", ylabel: str = "share") -> Path:
    """Grouped bars: one group per category (source or subtask), one bar per series (e.g. pool
    vs selected). ``shares``: series name -> {category: share}."""
    series = list(shares)
    cats = list(dict.fromkeys(c for s in series for c in shares[s]))
    x = np.arange(len(cats))
    width = 0.8 / max(1, len(series))
    fig, ax = _figure(max(6.4, 0.5 * len(cats) * max(1, len(series)) + 2), 4.0)
    for k, name in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, [shares[name].get(c, 0.0) for c in cats],
               width, label=name)
    ax.set_xticks(x, cats, rotation=45 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")
    ax.set(ylabel=ylabel, title=title)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def bar_chart(values: Mapping[str, float | None], path: str | os.PathLike, *, ylabel: str = "value",
              title: str = "", reference: float | None = None) -> Path:
    """One labelled bar per name (None drawn as a gap), with an optional dashed reference line."""
    names = list(values)
    heights = [np.nan if values[n] is None else float(values[n]) for n in names]
    fig, ax = _figure(max(6.4, 0.8 * len(names) + 2), 4.0)
    bars = ax.bar(range(len(names)), np.nan_to_num(heights), color="tab:blue")
    for bar, h in zip(bars, heights):
        if np.isfinite(h):
            ax.annotate(f"{h:.3f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 5 else 0)
    ax.set(ylabel=ylabel, title=title)
    return _save(fig, path)


def overlap_heatmap(matrix: np.ndarray, names: Sequence[str], path: str | os.PathLike, *,
                    title: str = "Jaccard overlap of selections") -> Path:
    """Annotated heatmap of a square (Jaccard) matrix between methods."""
    m = np.asarray(matrix, dtype=np.float64)
    size = max(4.0, 0.7 * len(names) + 2)
    fig, ax = _figure(size + 1, size)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                    color="black" if m[i, j] > 0.6 else "white", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, path)


def line_plot(xs: Sequence[float], ys_by_name: Mapping[str, Sequence[float]], xlabel: str,
              ylabel: str, title: str, path: str | os.PathLike, *, logx: bool = False) -> Path:
    """One line with markers per named series over shared x values."""
    fig, ax = _figure()
    for name, ys in ys_by_name.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ys_by_name:
        ax.legend()
    return _save(fig, path)


def scatter_with_fit(x: Sequence[float], y: Sequence[float], labels: Sequence[str] | None,
                     path: str | os.PathLike, *, xlabel: str = "x", ylabel: str = "y",
                     title: str = "") -> Path:
    """Scatter with point labels, a least-squares line, and Pearson/Spearman r in the title."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    fig, ax = _figure()
    ax.scatter(x, y)
    for i, lab in enumerate(labels or []):
        ax.annotate(str(lab), (x[i], y[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    stats = ""
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, icpt = np.polyfit(x, y, 1)
        xx = np.linspace(x.min(), x.max(), 50)
        ax.plot(xx, slope * xx + icpt, color="tab:red", linestyle="--")
        stats = f"Pearson r={_corr(x, y):.3f}, Spearman r={_corr(_ranks(x), _ranks(y)):.3f}"
    ax.set(xlabel=xlabel, ylabel=ylabel, title="\n".join(t for t in (title, stats) if t))
    return _save(fig, path)


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's r needs."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(len(v), dtype=np.float64)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
