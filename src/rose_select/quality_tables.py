"""The planted-pool benchmark's tables (``rose experiment quality``): every figure per target and
method, and the at-a-glance table with the paired differences that matter."""

from __future__ import annotations

from rose_select.quality_length import fmt_stat
from rose_select.stats import fmt_interval


def markdown_table(agg: list[dict]) -> str:
    """One row per target and method: the benchmark's figures (mean [95% interval] over seeds)."""
    head = ("| target | method | domain precision@k (base rate) | precision / base | preferred share of "
            "selected target rows | pairs ranked right [95% CI] | AUC target vs rest | Spearman(score, length) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for a in agg:
        p = a["pairs"]
        lines.append(f"| {a['target']} | {a['method']} | {fmt_interval(a['domain_precision'])} ({a['base_rate']:.2f}) | "
                     f"{fmt_interval(a['precision_over_base'], 1)} | {fmt_interval(a['preferred_share'])} | "
                     f"{p['accuracy']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}] (n={p['n']}) | "
                     f"{fmt_interval(a['auc'])} | {fmt_interval(a['length_spearman'])} |")
    return "\n".join(lines)


def glance_table(agg: list[dict], downstream: list[dict] | None = None, length: dict | None = None,
                 vs: str = "less") -> str:
    """One row per method, per target: precision / base rate and pairs ranked right (means over
    seeds); with ``length`` (``length_reports``) the length-balanced accuracy and its paired
    difference with ``vs``; with ``downstream`` the trained model's held-out accuracy (and its
    paired difference with ``vs`` where the downstream aggregate has one)."""
    targets = list(dict.fromkeys(a["target"] for a in agg))
    trained = {(d["target"], d["method"]): d for d in downstream or []}
    cells: dict[str, dict[str, str]] = {}
    cols: list[str] = []

    def put(method, col, text):
        cols.append(col) if col not in cols else None
        cells.setdefault(method, {})[col] = text

    for t in targets:
        rep = (length or {}).get(t)
        summary = {m["method"]: m for m in rep["methods"]} if rep else {}
        paired = {p["method"]: p for p in rep["paired"] if p["vs"] == vs} if rep else {}
        for a in (a for a in agg if a["target"] == t):
            m = a["method"]
            put(m, f"{t}: precision / base", fmt_interval(a["precision_over_base"], 1))
            put(m, f"{t}: pairs right", f"{a['pairs']['accuracy']:.2f}")
            if m in summary:
                put(m, f"{t}: length-balanced [CI]", fmt_stat(summary[m]["length_balanced"]))
                put(m, f"{t}: Δ length-balanced vs {vs} [CI]", fmt_stat(paired[m]["length_balanced"], signed=True)
                    if m in paired else "")
            if (t, m) in trained:
                d = trained[(t, m)]
                put(m, f"{t}: trained model's accuracy", fmt_interval(d["accuracy"], 3))
                if d.get("vs", {}).get(vs):
                    put(m, f"{t}: Δ trained accuracy vs {vs} [CI]", fmt_stat(d["vs"][vs]["pairs"], 3, signed=True))
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {m} | " + " | ".join(c.get(k, "") for k in cols) + " |" for m, c in cells.items()]
    return "\n".join(lines)
