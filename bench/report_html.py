"""report.html at a real pool size: 13,500 selected rows per method from a 270k pool, in Chromium.

    python bench/report_html.py                       # 270,000-row pool, top 5% (13,500) per method
    python bench/report_html.py --pool 20000 --selected 1000   # quicker

The pool's rows are the shipped ShareGPT snapshot's records repeated under new ids (real text
lengths), each method's scores random; every method's selection directory is written as
``rose select`` writes it. Timed: writing the page, then in a headless Chromium (a fresh profile
per round) the load event, the first page of the table, switching method, a search that must
find exactly one known selected example, and a sort by score. Target: the page loads and answers
in a few seconds at this size. Prints a table and writes bench/results/report_html.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rose_select.data import load_pool
from rose_select.data.builtin import resolve_input
from rose_select.headless import Page
from rose_select.records import InstructionRecord, Message
from rose_select.report_html import write_report_html
from rose_select.select.topk import select_top, write_selection

METHODS = ("rose_plus", "rose", "less", "random")


def pool(n: int) -> list[InstructionRecord]:
    """``n`` records: the snapshot's, repeated, each with a unique first line (``Row <i>.``)."""
    base = load_pool(resolve_input("builtin:pool/sharegpt_demo.jsonl"))
    out = []
    for i in range(n):
        msgs = base[i % len(base)].messages
        msgs = [Message(msgs[0].role, f"Row {i}. {msgs[0].content}"), *msgs[1:]]
        raw = {"dataset": "pool", "id": f"r{i}", "messages": [{"role": m.role, "content": m.content} for m in msgs]}
        out.append(InstructionRecord(f"r{i}", "pool", msgs, raw))
    return out


def selections(out: Path, records, k: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    dirs = {}
    for m in METHODS:
        scores, per_group = rng.standard_normal(len(records)), rng.standard_normal((len(records), 10))
        write_selection(out / m, records, scores, select_top(scores, count=k), per_group=per_group,
                        group_names=[f"subtask{j}" for j in range(10)], method=m, echo=False)
        dirs[m] = out / m
    return dirs


def browse(page: Path, needle: str, row_id: str) -> dict:
    """One round in a fresh Chromium: seconds per step, and the console errors."""
    grid = "div[data-method=less]"
    rows = f"document.querySelectorAll('{grid} .tabulator-row')"
    score = f"document.querySelector('{grid} .tabulator-col[tabulator-field=c1]')"
    with Page(timeout=300) as b:
        t = {"load_event_s": b.open(page.as_uri())}
        t0 = time.monotonic()
        b.wait_for("document.querySelectorAll('[data-ready] .tabulator-row').length > 0", timeout=120)
        t["first_rows_s"] = t["load_event_s"] + time.monotonic() - t0
        t0 = time.monotonic()
        b.js("var s = document.getElementById('rose-method'); s.value = 'less'; s.dispatchEvent(new Event('change'))")
        b.wait_for(f"!!document.querySelector('{grid}[data-ready]') && {rows}.length > 0", timeout=120)
        t["switch_method_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        b.js(f"{score}.click()")
        b.wait_for(f"{score}.getAttribute('aria-sort') !== 'none'", timeout=120)
        t["sort_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        b.type("#rose-search", needle)
        found = b.wait_for(f"(() => {{ const r = [...{rows}]; return r.length === 1 && r[0].textContent; }})()", timeout=120)
        t["search_s"] = time.monotonic() - t0
        assert row_id in found, found[:200]
        t["errors"] = list(b.errors)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=int, default=270_000)
    ap.add_argument("--selected", type=int, default=13_500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench/results/report_html.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rose-report-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dirs = selections(tmp, pool(args.pool), args.selected)
        t_sel = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        page = write_report_html(tmp / "report.html", title="bench", selections=dirs)
        t_write, c_write = time.perf_counter() - t0, time.process_time() - c0
        picked = json.loads((dirs["less"] / "selected.jsonl").read_text().splitlines()[args.selected // 2])
        needle = picked["messages"][0]["content"].split(".")[0] + "."  # "Row <i>." is unique
        rounds = [browse(page, needle, picked["id"]) for _ in range(args.rounds)]
        size = page.stat().st_size
    result = {"pool": args.pool, "selected_per_method": args.selected, "methods": len(METHODS),
              "write_selections_s": round(t_sel, 1), "write_page_s": round(t_write, 2), "write_page_cpu_s": round(c_write, 2), "page_bytes": size,
              "rounds": rounds, "load": os.getloadavg()}
    keys = ["load_event_s", "first_rows_s", "switch_method_s", "sort_s", "search_s"]
    print(f"pool {args.pool:,}, {args.selected:,} selected x {len(METHODS)} methods; page {size / 1e6:.1f} MB, "
          f"written in {t_write:.1f} s ({c_write:.1f} s CPU); load average {result['load'][0]:.1f}")
    print("| round | " + " | ".join(keys) + " | console errors |\n|" + "---|" * (len(keys) + 2))
    for i, r in enumerate(rounds):
        print(f"| {i} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + f" | {len(r['errors'])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if all(not r["errors"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
