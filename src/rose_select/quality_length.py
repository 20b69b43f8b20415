"""Is a selection reward-oriented beyond length? The planted-pool benchmark's pairs where length
cannot help, and paired comparisons of methods that rank the same pairs.

Every planted prompt has a preferred and a dispreferred answer. Its *stratum* says which is longer
(characters of the answer): ``+1`` the preferred one (length helps), ``-1`` the dispreferred one
(length hurts), ``0`` equal (left out of both strata). A method's figures on one target:

- the share of pairs ranked right in each stratum, and their mean, the *length-balanced* accuracy:
  a scorer that ranks by length alone, in either direction, gets exactly 1/2 on it;
- the share ranked right among *length-matched* pairs, whose answers differ by at most
  ``MATCH_TOLERANCE`` of the longer one;
- the partial Spearman correlation of score and preference (1 preferred, 0 dispreferred) given
  length, over the target's planted rows: undefined (NaN) for any scorer monotone in length.

Intervals and paired differences come from a two-level bootstrap (seeds, then pairs within a seed;
``stats.cluster_bootstrap_counts``): every statistic is a ratio of weighted sums, so one matrix of
draw counts serves every method and every comparison at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select.stats import cluster_bootstrap_counts, partial_spearman, percentile_interval, sign_test

# length-matched: the two answers' lengths differ by at most this share of the longer one
MATCH_TOLERANCE = 0.2
N_BOOT = 2000
# the references every method is compared with (where they are rows of the benchmark)
REFERENCES = ("less", "random", "length")


@dataclass(frozen=True)
class PairTable:
    """The planted pairs of one domain in one pool, in pair order."""

    pref: np.ndarray  # pool row of the preferred answer
    disp: np.ndarray  # pool row of the dispreferred answer
    pref_len: np.ndarray
    disp_len: np.ndarray

    @property
    def stratum(self) -> np.ndarray:
        """+1 the preferred answer is longer, -1 shorter, 0 equal length."""
        return np.sign(self.pref_len - self.disp_len).astype(np.int64)

    def matched(self, tolerance: float = MATCH_TOLERANCE) -> np.ndarray:
        """Pairs whose lengths differ by at most ``tolerance`` of the longer answer."""
        return np.abs(self.pref_len - self.disp_len) <= tolerance * np.maximum(self.pref_len, self.disp_len)


def pair_table(truth: Sequence, domain: str) -> PairTable:
    """The planted pairs of ``domain`` from a pool's ground truth (``quality.PlantedRow``)."""
    pref, disp = {}, {}
    for i, row in enumerate(truth):
        if row.domain == domain:
            (pref if row.preferred else disp)[row.pair] = i
    pairs = sorted(pref)
    p, d = np.array([pref[k] for k in pairs], np.int64), np.array([disp[k] for k in pairs], np.int64)
    lengths = np.array([r.length for r in truth], np.float64)
    return PairTable(p, d, lengths[p] if len(p) else np.zeros(0), lengths[d] if len(d) else np.zeros(0))


def pair_wins(scores: np.ndarray, table: PairTable) -> np.ndarray:
    """1 where the preferred answer scores above the dispreferred one, 1/2 on a tie, else 0."""
    a, b = np.asarray(scores, np.float64)[table.pref], np.asarray(scores, np.float64)[table.disp]
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def _share(wins: np.ndarray, mask: np.ndarray) -> float:
    return float(wins[mask].mean()) if mask.any() else math.nan


def balanced_accuracy(wins: np.ndarray, stratum: np.ndarray) -> float:
    """Mean of the longer-preferred and the shorter-preferred pairs' accuracy (NaN if one is empty)."""
    return (_share(wins, stratum > 0) + _share(wins, stratum < 0)) / 2


def planted_rows(scores: np.ndarray, table: PairTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, preferred 1/0, length) of every planted row: the preferred rows, then the others."""
    s = np.asarray(scores, np.float64)
    ones = np.ones(len(table.pref))
    return (np.concatenate([s[table.pref], s[table.disp]]), np.concatenate([ones, 0 * ones]),
            np.concatenate([table.pref_len, table.disp_len]))


def length_figures(scores: np.ndarray, truth: Sequence, domain: str, tolerance: float = MATCH_TOLERANCE) -> dict:
    """One method's length figures on one pool (see the module docstring)."""
    table = pair_table(truth, domain)
    wins, stratum, matched = pair_wins(scores, table), table.stratum, table.matched(tolerance)
    return {"n_longer": int((stratum > 0).sum()), "n_shorter": int((stratum < 0).sum()),
            "longer": _share(wins, stratum > 0), "shorter": _share(wins, stratum < 0),
            "length_balanced": balanced_accuracy(wins, stratum),
            "n_matched": int(matched.sum()), "matched": _share(wins, matched),
            "partial_spearman": partial_spearman(*planted_rows(scores, table))}

# ---------------------------------------------------------------------------- over seeds


@dataclass
class TargetItems:
    """Every seed's planted pairs of one target, seed after seed, and each method's wins on them."""

    sizes: list[int]  # pairs per seed
    stratum: np.ndarray  # [n]
    matched: np.ndarray  # [n] bool
    wins: dict[str, np.ndarray]  # method -> [n]
    rows: dict[str, list[tuple]]  # method -> per seed (score, preference, length) of the planted rows


def collect_items(per_seed: Sequence[tuple[Sequence, dict[str, np.ndarray]]], domain: str,
                  tolerance: float = MATCH_TOLERANCE) -> TargetItems:
    """``per_seed``: (ground truth, {method: scores}) of every seed, the same methods in each."""
    tables = [pair_table(truth, domain) for truth, _ in per_seed]
    methods = list(per_seed[0][1])
    return TargetItems([len(t.pref) for t in tables], np.concatenate([t.stratum for t in tables]),
                       np.concatenate([t.matched(tolerance) for t in tables]),
                       {m: np.concatenate([pair_wins(s[m], t) for (_, s), t in zip(per_seed, tables)]) for m in methods},
                       {m: [planted_rows(s[m], t) for (_, s), t in zip(per_seed, tables)] for m in methods})


def replicate_means(counts: np.ndarray, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per replicate: the mean of ``values`` over the drawn items in ``mask``."""
    den = counts @ mask.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, counts @ (values * mask) / np.where(den > 0, den, 1), np.nan)


def _balanced_replicates(counts: np.ndarray, values: np.ndarray, stratum: np.ndarray) -> np.ndarray:
    return (replicate_means(counts, values, stratum > 0) + replicate_means(counts, values, stratum < 0)) / 2


def bootstrap_stat(point: float, replicates: np.ndarray) -> dict:
    lo, hi = percentile_interval(replicates)
    return {"mean": point, "lo": lo, "hi": hi}


def method_summary(items: TargetItems, method: str, counts: np.ndarray) -> dict:
    """A method's length figures pooled over seeds, the length-balanced accuracy with its interval."""
    w, s = items.wins[method], items.stratum
    rows = items.rows[method]
    pooled = [np.concatenate([r[k] for r in rows]) for k in range(3)]
    return {"method": method, "n_pairs": int(len(w)), "n_longer": int((s > 0).sum()), "n_shorter": int((s < 0).sum()),
            "longer": _share(w, s > 0), "shorter": _share(w, s < 0),
            "length_balanced": bootstrap_stat(balanced_accuracy(w, s), _balanced_replicates(counts, w, s)),
            "n_matched": int(items.matched.sum()), "matched": _share(w, items.matched),
            "partial_spearman": partial_spearman(*pooled)}


def paired_difference(items: TargetItems, method: str, reference: str, counts: np.ndarray) -> dict:
    """``method`` minus ``reference`` on the same pairs: pairs ranked right, each length stratum
    and the length-balanced accuracy (bootstrap intervals), and the exact sign test of the pairs
    where they differ."""
    d, s = items.wins[method] - items.wins[reference], items.stratum
    out = {"method": method, "vs": reference,
           "pairs_right": bootstrap_stat(float(d.mean()), replicate_means(counts, d, np.ones(len(d), bool))),
           "length_balanced": bootstrap_stat(balanced_accuracy(items.wins[method], s)
                                             - balanced_accuracy(items.wins[reference], s),
                                             _balanced_replicates(counts, d, s)),
           "better": int((d > 0).sum()), "worse": int((d < 0).sum()),
           "sign_p": sign_test(int((d > 0).sum()), int((d < 0).sum()))}
    for name, mask in (("longer", s > 0), ("shorter", s < 0)):
        out[name] = bootstrap_stat(_share(d, mask), replicate_means(counts, d, mask))
    return out


def target_report(items: TargetItems, references: Sequence[str] = REFERENCES, n_boot: int = N_BOOT,
                  seed: int = 0, extra_pairs: Sequence[tuple[str, str]] = ()) -> dict:
    """Every method's summary, its paired differences with each reference present, and those of
    ``extra_pairs`` (method, reference)."""
    counts = cluster_bootstrap_counts(items.sizes, n_boot, seed)
    refs = [r for r in references if r in items.wins]
    pairs = [(m, r) for r in refs for m in items.wins if m != r]
    pairs += [(m, r) for m, r in extra_pairs if m in items.wins and r in items.wins and (m, r) not in pairs]
    return {"methods": [method_summary(items, m, counts) for m in items.wins],
            "paired": [paired_difference(items, m, r, counts) for m, r in pairs]}


def load_scores(seed_dir: Path, target: str, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """The saved scores of every labelled selection of one seed and target."""
    return {label: np.load(seed_dir / target / "select" / label / "scores.npy", allow_pickle=False)
            for label in labels}

# ---------------------------------------------------------------------------- tables


def fmt_stat(stat: dict | None, digits: int = 2, signed: bool = False) -> str:
    """``mean [lo, hi]`` of a bootstrap figure (``-`` when undefined)."""
    if not stat or stat["mean"] is None or math.isnan(stat["mean"]):
        return "-"
    f = f"+.{digits}f" if signed else f".{digits}f"
    if math.isnan(stat["lo"]):
        return format(stat["mean"], f)
    return f"{stat['mean']:{f}} [{stat['lo']:{f}}, {stat['hi']:{f}}]"


def _num(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def length_markdown(reports: dict[str, dict], tolerance: float = MATCH_TOLERANCE) -> str:
    """Per target: every method's figures where length cannot help, then its paired differences
    with each reference (bootstrap intervals; sign test p over the pairs where the two differ)."""
    out = []
    for target, rep in reports.items():
        if target.endswith(": shots"):
            out.append(shots_markdown(target, rep))
            continue
        lines = [f"### {target}", "",
                 "| method | pairs (longer / shorter preferred) | longer preferred: right | shorter preferred: right | "
                 f"length-balanced [95% CI] | length-matched (within {tolerance:.0%}): right (n) | "
                 "partial Spearman(score, preference given length) |", "|---|---|---|---|---|---|---|"]
        for m in rep["methods"]:
            lines.append(f"| {m['method']} | {m['n_longer']} / {m['n_shorter']} | {_num(m['longer'])} | "
                         f"{_num(m['shorter'])} | {fmt_stat(m['length_balanced'])} | {_num(m['matched'])} "
                         f"({m['n_matched']}) | {_num(m['partial_spearman'], 3)} |")
        refs = list(dict.fromkeys(p["vs"] for p in rep["paired"]))
        lines += ["", "| method | " + " | ".join(f"vs {r}: Δ pairs right [CI] (sign test p) | vs {r}: Δ length-balanced [CI]"
                                                  for r in refs) + " |", "|---|" + "---|---|" * len(refs)]
        by = {(p["method"], p["vs"]): p for p in rep["paired"]}
        for m in rep["methods"]:
            cells = []
            for r in refs:
                p = by.get((m["method"], r))
                cells += ([f"{fmt_stat(p['pairs_right'], signed=True)} (p={p['sign_p']:.2g}, {p['better']}+/{p['worse']}-)",
                           fmt_stat(p["length_balanced"], signed=True)] if p else ["", ""])
            lines.append(f"| {m['method']} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def shots_markdown(name: str, report: dict) -> str:
    """A set's targets at several shot counts against the first, method by method (same pairs)."""
    summary = {m["method"]: m for m in report["methods"]}
    lines = [f"### {name}", "", "| method | at | against | length-balanced (at / against) | Δ pairs right [CI] "
             "(sign test p) | Δ length-balanced [CI] |", "|---|---|---|---|---|---|"]
    for p in report["paired"]:
        (m, at), against = p["method"].split("@"), p["vs"].split("@")[1]
        lines.append(f"| {m} | {at} | {against} | {_num(summary[p['method']]['length_balanced']['mean'])} / "
                     f"{_num(summary[p['vs']]['length_balanced']['mean'])} | "
                     f"{fmt_stat(p['pairs_right'], signed=True)} (p={p['sign_p']:.2g}) | "
                     f"{fmt_stat(p['length_balanced'], signed=True)} |")
    return "\n".join(lines)
