"""``report.html``: one self-contained page to look through a run or a comparison of selections.

Everything is inside the file: the metrics tables, the plots (PNG data URIs), and per method its
selected examples (rank, score, best-matching subtask, answer length, a text preview; on a planted
pool also whether each pick is a target row and a preferred answer) as a searchable, sortable,
paginated table. The table is Grid.js (MIT, vendored in ``assets/vendor/gridjs/`` with its licence
and source), which renders one page of rows at a time, so 13,500 selected rows stay usable
(``bench/report_html.py`` times the load). Nothing is fetched: no server, no network.

``report.html#method=NAME&q=TEXT`` opens on that method's table with the search box filled in.
"""

from __future__ import annotations

import base64
import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from rose_select.data import load_pool
from rose_select.errors import DataError
from rose_select.io import read_json, write_text
from rose_select.select.topk import overlap_table, read_best_subtasks, read_selection, response_chars

PREVIEW_CHARS = 240
VENDOR = "assets/vendor/gridjs"


def preview(messages) -> str:
    """The last user turn and the answer, each cut to half the preview length."""
    user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    answer = next((m.content for m in reversed(messages) if m.role == "assistant"), "")
    half = PREVIEW_CHARS // 2
    cut = lambda s: " ".join(s.split())[:half] + ("…" if len(s) > half else "")  # noqa: E731
    return f"{cut(user)} ⟶ {cut(answer)}"


def _score(value) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else round(float(value), 6)


def selection_table(sel_dir: Path, truth: Mapping[str, object] | None = None) -> dict:
    """One method's selected rows as Grid.js columns and rows (best first: rank = position)."""
    sel_dir = Path(sel_dir)
    try:
        records = load_pool(sel_dir / "selected.jsonl", duplicate_ids="rename")
    except DataError as e:  # a pool read through a column map: show the ids, say why there is no text
        raise DataError(f"report.html: cannot read the selected records' text ({e})", path=str(sel_dir)) from None
    best = read_best_subtasks(sel_dir) if (sel_dir / "scores.jsonl").exists() else None
    columns = ["rank", "score", "best subtask", "answer chars", "id", "text (user ⟶ answer)"]
    if truth is not None:
        columns[4:4] = ["target row", "preferred answer"]
    rows = []
    for rank, r in enumerate(records, 1):
        row = [rank, _score(r.raw.get("score")), (best or {}).get(r.id, "-"), response_chars(r), r.id, preview(r.messages)]
        if truth is not None:
            t = truth.get(r.id)
            row[4:4] = ["yes" if t and t.domain != "generic" else "no",
                        "-" if t is None or t.preferred is None else ("yes" if t.preferred else "no")]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def length_rows(selections: Mapping[str, Path], tables: Mapping[str, dict]) -> list[dict]:
    """The length diagnostic per method: Spearman(score, answer length) over the pool, and the
    selection's answer lengths."""
    out = []
    for name, sel_dir in selections.items():
        summary = read_json(Path(sel_dir) / "summary.json") if (Path(sel_dir) / "summary.json").exists() else {}
        lengths = sorted(row[3] for row in tables[name]["rows"])
        rho = summary.get("length_spearman")
        out.append({"method": name, "Spearman(score, answer length), whole pool": "-" if rho is None else f"{rho:+.2f}",
                    "median answer chars of the selection": lengths[len(lengths) // 2] if lengths else "-",
                    "selected": len(lengths)})
    return out


def html_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A plain HTML table of dict rows (every cell escaped)."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table class='plain'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def overlap_rows(selections: Mapping[str, Sequence[str]]) -> list[dict]:
    names = list(selections)
    matrix, _ = overlap_table(selections)
    return [{"": a, **{b: float(matrix[i][j]) for j, b in enumerate(names)}} for i, a in enumerate(names)]


def image_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _vendor(name: str) -> str:
    return resources.files("rose_select").joinpath(f"{VENDOR}/{name}").read_text(encoding="utf-8")


def _script_json(data) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(data, ensure_ascii=False).replace("</", "<\\/")


def write_report_html(path: Path, *, title: str, intro: str = "", tables: Sequence[tuple[str, str, list]] = (),
                      images: Sequence[tuple[Path, str]] = (), selections: Mapping[str, Path] | None = None,
                      truth: Mapping[str, object] | None = None) -> Path:
    """Write the page: ``tables`` as (heading, note, rows), ``images`` as (PNG, caption), then the
    selections (overlap, length diagnostic, the examples of each method)."""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>" if intro else ""]
    for heading, note, rows in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>" + (f"<p>{html.escape(note)}</p>" if note else "") + html_table(rows))
    if images:
        parts.append("<h2>Plots</h2><div class='plots'>" + "".join(image_tag(p, c) for p, c in images if Path(p).exists()) + "</div>")
    data = {"selections": {}}
    if selections:
        data["selections"] = {name: selection_table(d, truth) for name, d in selections.items()}
        ids = {name: read_selection(d) for name, d in selections.items()}
        if len(ids) > 1:
            parts.append("<h2>Overlap between methods (Jaccard)</h2>" + html_table(overlap_rows(ids)))
        parts.append("<h2>Length diagnostic</h2><p>A selection that only tracks answer length is not "
                     "reward-oriented: a Spearman near +1 means the scores mostly rank by length.</p>"
                     + html_table(length_rows(selections, data["selections"])))
        parts.append(_examples_section(list(selections), truth is not None))
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_vendor('mermaid.min.css')}\n{CSS}</style></head><body>{''.join(parts)}"
            f"<script>{_vendor('gridjs.umd.js')}</script>"
            f"<script id='rose-data' type='application/json'>{_script_json(data)}</script>"
            f"<script>{APP_JS}</script></body></html>")
    write_text(path, page)
    return Path(path)


def _examples_section(names: list[str], planted: bool) -> str:
    options = "".join(f"<option value='{html.escape(n)}'>{html.escape(n)}</option>" for n in names)
    note = (" On a planted pool, <em>target row</em> says whether a pick is one of the planted target rows and "
            "<em>preferred answer</em> whether it carries the preferred answer of its prompt.") if planted else ""
    return ("<h2>Selected examples</h2><p>Best first. Click a column to sort; the search box filters every "
            f"column.{note}</p><label>method <select id='rose-method'>{options}</select></label>"
            "<div id='rose-grid'></div>")


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table.plain{border-collapse:collapse;margin:.5em 0;font-size:14px}
table.plain td,table.plain th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.plain td:first-child,table.plain th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots img{max-width:560px}
figure{margin:0}figcaption{font-size:13px;color:#555}
#rose-grid{margin-top:.5em;font-size:13px}
"""

APP_JS = r"""
(function () {
  var data = JSON.parse(document.getElementById('rose-data').textContent);
  var picker = document.getElementById('rose-method');
  if (!picker) { return; }
  var grid = null;
  function show(method, keyword) {
    var table = data.selections[method];
    var el = document.getElementById('rose-grid');
    if (grid) { grid.destroy(); }
    el.innerHTML = '';
    grid = new gridjs.Grid({
      columns: table.columns, data: table.rows, sort: true,
      search: keyword ? {keyword: keyword} : true,
      pagination: {limit: 25}, resizable: false
    }).render(el);
    document.body.setAttribute('data-rose-method', method);
  }
  var params = new URLSearchParams(location.hash.replace(/^#/, ''));
  var first = params.get('method');
  if (first && data.selections[first]) { picker.value = first; }
  picker.addEventListener('change', function () { show(picker.value, ''); });
  show(picker.value, params.get('q') || '');
})();
"""
