"""Selecting the top of a scored pool, writing the selection, and comparing selections.

Ranking rule (everywhere): score descending, ties broken by original pool index ascending, so a
selection is a pure function of the scores. NaN scores are refused; ``-inf`` ranks last.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rose_select import plots as P
from rose_select.errors import ConfigError, DataError, NonFiniteError
from rose_select.io import atomic_path, write_json, write_jsonl
from rose_select.plots import _corr, _ranks
from rose_select.records import InstructionRecord
from rose_select.tables import markdown


def count_for_fraction(fraction: float, n: int) -> int:
    """``ceil(fraction * n)``, at least 1, robust to float error (0.07 * 100 gives 7, not 8)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, math.ceil(fraction * n - 1e-9))


def rank_order(scores: np.ndarray, ids: Sequence[str] | None = None) -> np.ndarray:
    """Pool indices from best to worst (score descending, then index ascending)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ConfigError(f"scores must be 1-D, got shape {scores.shape}")
    nan = np.flatnonzero(np.isnan(scores))
    if len(nan):
        names = [str(ids[i]) if ids is not None else f"row {i}" for i in nan[:10]]
        raise NonFiniteError(f"{len(nan)} NaN score(s): {names}")
    return np.argsort(-scores, kind="stable")


def _quota_counts(quotas: Mapping[str, float | int], present: set[str], budget: int) -> dict[str, int]:
    """A float in [0, 1] is a share of the selection budget (rounded half up); an int is a count."""
    counts = {}
    for src, q in quotas.items():
        if src not in present:
            raise ConfigError(f"quota for source {src!r}, which is not in the pool "
                              f"(sources: {sorted(present)})")
        if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)):
            raise ConfigError(f"quota for {src!r} must be a count or a fraction, got {q!r}")
        if isinstance(q, (int, np.integer)):
            if q < 0:
                raise ConfigError(f"quota for {src!r} must be >= 0, got {q}")
            counts[src] = int(q)
        else:
            if not 0 <= q <= 1:
                raise ConfigError(f"fractional quota for {src!r} must be in [0, 1], got {q}")
            counts[src] = int(math.floor(q * budget + 0.5 + 1e-9))
    if sum(counts.values()) > budget:
        raise ConfigError(f"quotas {counts} add up to {sum(counts.values())} examples, "
                          f"more than the selection size {budget}")
    return counts


def select_top(scores: np.ndarray, *, fraction: float | None = 0.05, count: int | None = None,
               ids: Sequence[str] | None = None, sources: Sequence[str] | None = None,
               quotas: Mapping[str, float | int] | None = None) -> np.ndarray:
    """Indices of the selected pool rows, best first.

    Size: ``count`` if given, else ``ceil(fraction * N)`` (at least 1). With ``quotas``
    (source -> fraction of the selection size, or a count; needs ``sources``), each listed source
    contributes exactly its quota of its best rows; the rest of the budget goes to the best rows of
    the unlisted sources, and whatever those cannot fill (or rounding leaves) goes to the best
    remaining rows overall. ``ids`` only name rows in error messages.
    """
    order = rank_order(scores, ids)
    n = len(order)
    if n == 0:
        raise ConfigError("cannot select from an empty pool")
    if count is not None:
        if isinstance(count, bool) or int(count) != count or not 1 <= count <= n:
            raise ConfigError(f"count must be an integer in [1, {n}], got {count!r}")
        budget = int(count)
    elif fraction is not None:
        budget = count_for_fraction(fraction, n)
    else:
        raise ConfigError("give a fraction or a count")
    if not quotas:
        return order[:budget]
    if sources is None or len(sources) != n:
        raise ConfigError(f"quotas need the source of every pool row ({n}), "
                          f"got {None if sources is None else len(sources)}")
    src = np.asarray([str(s) for s in sources])
    wanted = _quota_counts(quotas, set(src.tolist()), budget)
    ranked_src = src[order]
    taken = []
    for name, k in wanted.items():
        members = order[ranked_src == name]
        if k > len(members):
            raise ConfigError(f"quota {k} for source {name!r} exceeds its {len(members)} pool rows")
        taken.append(members[:k])
    chosen = np.zeros(n, dtype=bool)
    chosen[np.concatenate(taken)] = True
    rest = budget - int(chosen.sum())
    unlisted = order[~np.isin(ranked_src, list(wanted))]
    chosen[unlisted[:rest]] = True
    rest = budget - int(chosen.sum())
    if rest > 0:
        chosen[order[~chosen[order]][:rest]] = True
    return order[chosen[order]]


def select_balanced(per_group: np.ndarray, count: int) -> np.ndarray:
    """Subtask-balanced selection: round robin over the subtasks (columns, in order), each taking
    its best row (``per_group[:, s]`` descending, ties by index) not yet taken, until ``count`` rows
    are chosen. Returns pool indices in the order they were taken."""
    per_group = np.asarray(per_group, np.float64)
    n, n_groups = per_group.shape
    if not 1 <= count <= n:
        raise ConfigError(f"count must be in [1, {n}], got {count}")
    orders = [rank_order(per_group[:, s]) for s in range(n_groups)]
    taken = np.zeros(n, dtype=bool)
    pointers = [0] * n_groups
    out = []
    while len(out) < count:
        for s in range(n_groups):
            order = orders[s]
            while taken[order[pointers[s]]]:
                pointers[s] += 1
            out.append(int(order[pointers[s]]))
            taken[out[-1]] = True
            if len(out) == count:
                break
    return np.array(out, dtype=np.int64)


def response_chars(record: InstructionRecord) -> int:
    """Characters of a record's assistant turns (the length a length diagnostic ranks by)."""
    return sum(len(m.content) for m in record.messages if m.role == "assistant")


# Above this |Spearman| between scores and response length a selection summary warns.
LENGTH_WARN = 0.5


def length_spearman(scores: np.ndarray, lengths: Sequence[int]) -> float | None:
    """Spearman rank correlation of scores and response lengths (None if either is constant)."""

    rho = _corr(_ranks(np.asarray(scores, np.float64)), _ranks(np.asarray(lengths, np.float64)))
    return None if math.isnan(rho) else rho

# ---------------------------------------------------------------------------- writing


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _shares(values: Sequence[str]) -> dict[str, float]:
    counts = Counter(values)
    total = sum(counts.values())
    return {k: c / total for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def _stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"min": None, "max": None, "mean": None, "std": None}
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "std": float(x.std())}


def selected_row(record: InstructionRecord, score: float) -> dict:
    """The pool's own record plus ``id`` and ``score``; LESS messages format if there is no raw."""
    if record.raw:
        row = dict(record.raw)
    else:
        row = {"dataset": record.source,
               "messages": [{"role": m.role, "content": m.content} for m in record.messages]}
    row["id"] = record.id
    row["score"] = _finite_or_none(score)
    return row


def summary_table(summary: dict) -> str:
    """A short plain-text table of a selection summary."""
    thr = summary["threshold"]
    lines = [f"{summary['method']}: selected {summary['n_selected']} of {summary['n_pool']} "
             f"({100 * summary['n_selected'] / summary['n_pool']:.2f}%), threshold score "
             f"{'n/a' if thr is None else f'{thr:.6g}'}"]
    pool = summary["pool_share_per_source"]
    width = max([len("source")] + [len(s) for s in pool])
    lines.append(f"  {'source':<{width}}  {'pool':>7}  {'selected':>8}")
    for src, share in pool.items():
        sel = summary["share_per_source"].get(src, 0.0)
        lines.append(f"  {src:<{width}}  {100 * share:6.1f}%  {100 * sel:7.1f}%")
    rho = summary.get("length_spearman")
    if rho is not None:
        lines.append(f"  Spearman(score, response length) = {rho:+.2f}"
                     + (f"  WARNING: |rho| >= {LENGTH_WARN}: the scores largely rank by answer length"
                        if abs(rho) >= LENGTH_WARN else ""))
    if summary.get("share_per_subtask"):
        sub = summary["share_per_subtask"]
        width = max([len("best subtask")] + [len(s) for s in sub])
        lines.append(f"  {'best subtask':<{width}}  {'selected':>8}")
        for name, share in sub.items():
            lines.append(f"  {name:<{width}}  {100 * share:7.1f}%")
    return "\n".join(lines)


def _best_subtasks(per_group, group_names, n: int) -> list[str] | None:
    """Each pool row's best-matching subtask (None without per-subtask scores)."""
    if per_group is None:
        return None
    if group_names is None or per_group.shape != (n, len(group_names)):
        raise ConfigError(f"per_group has shape {np.shape(per_group)}, expected "
                          f"({n}, {None if group_names is None else len(group_names)})")
    return [group_names[k] for k in np.argmax(per_group, axis=1)]


def selection_summary(pool_records, scores: np.ndarray, selected_idx: np.ndarray, best, method: str,
                      extra: Mapping | None) -> dict:
    """``summary.json``: counts, score statistics, shares per source and subtask, length diagnostic."""
    n, picked = len(pool_records), selected_idx.tolist()
    sel_scores = scores[selected_idx]
    return {
        "method": method,
        "n_pool": n,
        "n_selected": int(len(selected_idx)),
        "fraction": len(selected_idx) / n,
        "threshold": _finite_or_none(float(sel_scores.min())),
        "score_stats": {"pool": _stats(scores), "selected": _stats(sel_scores)},
        "pool_share_per_source": _shares([r.source for r in pool_records]),
        "share_per_source": _shares([pool_records[i].source for i in picked]),
        "share_per_subtask": None if best is None else _shares([best[i] for i in picked]),
        "length_spearman": length_spearman(scores, [response_chars(r) for r in pool_records]),
        **dict(extra or {}),
    }


def _selection_plots(out_dir: Path, scores: np.ndarray, summary: dict, best) -> None:

    method = summary["method"]
    P.score_histogram(scores, out_dir / "score_histogram.png", threshold=summary["threshold"],
                      title=f"{method} scores")
    P.share_bar_chart({"pool": summary["pool_share_per_source"], "selected": summary["share_per_source"]},
                      out_dir / "selected_share.png", title=f"{method}: share per source")
    if best is not None:
        P.share_bar_chart({"pool": _shares(best), "selected": summary["share_per_subtask"]},
                          out_dir / "subtask_share.png", title=f"{method}: share per best-matching subtask")


def write_selection(out_dir: str | os.PathLike, pool_records: Sequence[InstructionRecord],
                    scores: np.ndarray, selected_idx: np.ndarray, *,
                    per_group: np.ndarray | None = None, group_names: Sequence[str] | None = None,
                    method: str = "rose", extra: Mapping | None = None, plots: bool = False,
                    echo: bool = True) -> str:
    """Write a selection directory (each file atomically) and return its summary table.

    ``scores.npy`` ([N] float64), ``scores.jsonl`` (id, source, score, best_subtask),
    ``selected.jsonl`` (best first; see ``selected_row``), ``summary.json``; with ``plots`` also
    ``score_histogram.png``, ``selected_share.png`` and (with ``per_group``) ``subtask_share.png``.
    """
    out_dir = Path(out_dir)
    scores = np.asarray(scores, dtype=np.float64)
    selected_idx = np.asarray(selected_idx, dtype=np.int64)
    n = len(pool_records)
    if scores.shape != (n,):
        raise ConfigError(f"{scores.shape[0] if scores.ndim else 0} scores for {n} pool records")
    if len(selected_idx) == 0 or selected_idx.min() < 0 or selected_idx.max() >= n:
        raise ConfigError(f"selected indices must be non-empty and within [0, {n})")
    best = _best_subtasks(per_group, group_names, n)
    with atomic_path(out_dir / "scores.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, scores, allow_pickle=False)
    write_jsonl(out_dir / "scores.jsonl", (
        {"id": r.id, "source": r.source, "score": _finite_or_none(s),
         "best_subtask": None if best is None else best[i]}
        for i, (r, s) in enumerate(zip(pool_records, scores.tolist()))))
    write_jsonl(out_dir / "selected.jsonl",
                (selected_row(pool_records[i], scores[i]) for i in selected_idx.tolist()))
    summary = selection_summary(pool_records, scores, selected_idx, best, method, extra)
    write_json(out_dir / "summary.json", summary)
    rho = summary["length_spearman"]
    if rho is not None and abs(rho) >= LENGTH_WARN:
        warnings.warn(f"{method}: Spearman(score, response length) = {rho:+.2f}; the selection largely "
                      "ranks by answer length", RuntimeWarning, stacklevel=2)
    if plots:
        _selection_plots(out_dir, scores, summary, best)
    table = summary_table(summary)
    if echo:
        print(table)
    return table

# ---------------------------------------------------------------------------- comparing


def _id_rows(path: Path):
    """Rows of a JSONL file that each carry an ``id``; bad lines raise DataError naming the line."""
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON: {e.msg}", path=str(path), line=line_no) from None
            if not isinstance(row, dict) or "id" not in row:
                raise DataError("missing", path=str(path), line=line_no, field="id")
            yield row


def read_selection(path: str | os.PathLike) -> list[str]:
    """Ids of a selection, best first: a selection directory or its ``selected.jsonl``."""
    path = Path(path)
    if path.is_dir():
        path = path / "selected.jsonl"
    if not path.exists():
        raise DataError("selection file not found", path=str(path))
    return [str(row["id"]) for row in _id_rows(path)]


def jaccard(a_ids: Sequence[str], b_ids: Sequence[str]) -> float:
    """|A ∩ B| / |A ∪ B| of two id sets (1.0 when both are empty)."""
    a, b = set(a_ids), set(b_ids)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def overlap_table(selections: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, str]:
    """Pairwise Jaccard matrix of named selections, and the same as a markdown table."""
    names = list(selections)
    sets = [set(selections[k]) for k in names]
    mat = np.array([[jaccard(a, b) for b in sets] for a in sets], dtype=np.float64).reshape(
        len(names), len(names))
    rows = [{"": name, **{other: f"{v:.3f}" for other, v in zip(names, mat[i])}} for i, name in enumerate(names)]
    return mat, markdown(rows, ["", *names], right=names)


def read_best_subtasks(path: str | os.PathLike) -> dict[str, str] | None:
    """id -> best-matching subtask from a selection directory's ``scores.jsonl``; None when the
    method has no per-subtask breakdown (text and random baselines)."""
    path = Path(path) / "scores.jsonl" if Path(path).is_dir() else Path(path)
    if not path.exists():
        raise DataError("scores file not found", path=str(path))
    best = {}
    for row in _id_rows(path):
        if row.get("best_subtask") is None:
            return None
        best[str(row["id"])] = str(row["best_subtask"])
    return best


def subtask_shares(selections: Mapping[str, Sequence[str]], best_subtask: Mapping[str, str]
                   ) -> dict[str, dict[str, float]]:
    """Share of each selection per subtask, every selection labelled by one reference assignment
    (a gradient method's best-matching subtask per pool id), so methods without a per-subtask
    breakdown can be compared on the same axis. Subtasks in the reference's order of appearance."""
    cats = list(dict.fromkeys(best_subtask.values()))
    out = {}
    for name, ids in selections.items():
        missing = [i for i in ids if i not in best_subtask]
        if missing:
            raise ConfigError(f"selection {name!r} has ids not in the reference scores, e.g. {missing[:3]}")
        counts = Counter(best_subtask[i] for i in ids)
        total = max(1, len(ids))
        out[name] = {c: counts.get(c, 0) / total for c in cats}
    return out


def reference_subtask_shares(selections: Mapping[str, Sequence[str]],
                             dirs: Mapping[str, str | os.PathLike]) -> tuple[dict | None, str | None]:
    """``(subtask_shares, reference name)`` with subtasks assigned by the first of ``dirs`` (name ->
    selection directory) that has a per-subtask breakdown; ``(None, None)`` when none has."""
    for name, path in dirs.items():
        best = read_best_subtasks(path) if Path(path).is_dir() else None
        if best is not None:
            return subtask_shares(selections, best), name
    return None, None


def shares_table(shares: Mapping[str, Mapping[str, float]], label: str = "subtask") -> str:
    """Markdown table: one row per category, one column per selection (percent)."""
    names = list(shares)
    cats = list(dict.fromkeys(c for s in shares.values() for c in s))
    rows = [{label: c, **{n: f"{100 * shares[n].get(c, 0.0):.1f}%" for n in names}} for c in cats]
    return markdown(rows, [label, *names], right=names)
