"""``report.html``: one self-contained page to look through a run or a comparison of selections.

Everything is inside the file: the metrics tables, the plots (PNG data URIs), and per method its
selected examples (rank, score, best-matching subtask, answer length, a text preview; on a planted
pool also whether each pick is a target row and a preferred answer) as a searchable, sortable,
paginated table. The table is Tabulator (MIT, vendored in ``assets/vendor/tabulator/`` with its
licence and source): its own sorting, header filters and pagination, and the page's search box is
one Tabulator filter over every column. It renders one page of rows at a time, so 13,500 selected
rows stay usable (``bench/report_html.py`` times the load). Nothing is fetched: no server, no network.

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
VENDOR = "assets/vendor/tabulator"


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
    """One method's selected rows as table columns and rows (best first: rank = position)."""
    sel_dir = Path(sel_dir)
    best = read_best_subtasks(sel_dir) if (sel_dir / "scores.jsonl").exists() else None
    columns = ["rank", "score", "best subtask", "answer chars", "id", "text (user ⟶ answer)"]
    if truth is not None:
        columns[4:4] = ["target row", "preferred answer"]
    rows = []
    for rank, (rid, score, chars, text) in enumerate(_selected_rows(sel_dir / "selected.jsonl"), 1):
        row = [rank, _score(score), (best or {}).get(rid, "-"), chars, rid, text]
        if truth is not None:
            t = truth.get(rid)
            row[4:4] = ["yes" if t and t.domain != "generic" else "no",
                        "-" if t is None or t.preferred is None else ("yes" if t.preferred else "no")]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def _selected_rows(path: Path) -> list[tuple]:
    """(id, score, answer chars, text preview) per selected row. A pool whose format the readers
    do not know (one read through a column map) still gets its rows: the raw record as JSON."""
    try:
        return [(r.id, r.raw.get("score"), response_chars(r), preview(r.messages))
                for r in load_pool(path, duplicate_ids="rename")]
    except DataError:
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(str(d.get("id")), d.get("score"), "-", _clip(json.dumps(d, ensure_ascii=False))) for d in raw]


def _clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def length_rows(selections: Mapping[str, Path], tables: Mapping[str, dict]) -> list[dict]:
    """The length diagnostic per method: Spearman(score, answer length) over the pool, and the
    selection's answer lengths."""
    out = []
    for name, sel_dir in selections.items():
        summary = read_json(Path(sel_dir) / "summary.json") if (Path(sel_dir) / "summary.json").exists() else {}
        lengths = sorted(row[3] for row in tables[name]["rows"] if isinstance(row[3], int))
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
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"  # metrics to 4 decimals, seconds to 0.1
    return str(v)


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
            f"<style>{_vendor('tabulator_simple.min.css')}\n{CSS}</style></head><body>{''.join(parts)}"
            f"<script>{_vendor('tabulator.min.js')}</script>"
            f"<script id='rose-data' type='application/json'>{_script_json(data)}</script>"
            f"<script>{APP_JS}</script></body></html>")
    write_text(path, page)
    return Path(path)


def _examples_section(names: list[str], planted: bool) -> str:
    options = "".join(f"<option value='{html.escape(n)}'>{html.escape(n)}</option>" for n in names)
    note = (" On a planted pool, <em>target row</em> says whether a pick is one of the planted target rows and "
            "<em>preferred answer</em> whether it carries the preferred answer of its prompt.") if planted else ""
    return ("<h2>Selected examples</h2><p>Best first. Click a column title to sort; the search box filters on "
            f"every column, the boxes under the titles on one.{note}</p><p><label>method <select id='rose-method'>"
            f"{options}</select></label> <label>search <input id='rose-search' type='search' size='40'></label> "
            "<span id='rose-count'></span></p><div id='rose-grid'></div>")


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table.plain{border-collapse:collapse;margin:.5em 0;font-size:14px}
table.plain td,table.plain th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.plain td:first-child,table.plain th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots img{max-width:560px}
figure{margin:0}figcaption{font-size:13px;color:#555}
#rose-grid{margin-top:.5em;font-size:13px}
#rose-grid .tabulator-cell{white-space:normal}
"""

APP_JS = r"""
(function () {
  // one Tabulator per method, made on first view and then hidden or shown; the search box sets one
  // Tabulator filter (any cell contains the text, case-insensitive) on the table in view
  var data = JSON.parse(document.getElementById('rose-data').textContent);
  var picker = document.getElementById('rose-method');
  if (!picker) { return; }
  var search = document.getElementById('rose-search'), count = document.getElementById('rose-count');
  var holder = document.getElementById('rose-grid'), made = {}, current = null;
  var numeric = {'rank': 1, 'score': 1, 'answer chars': 1};
  function columns(names) {
    return names.map(function (name, i) {
      var c = {title: name, field: 'c' + i, headerFilter: 'input', sorter: numeric[name] ? 'number' : 'string'};
      if (i === names.length - 1) { c.formatter = 'plaintext'; c.widthGrow = 4; c.minWidth = 320; }
      return c;
    });
  }
  function rows(table) {
    return table.rows.map(function (r) {
      var o = {}; r.forEach(function (v, i) { o['c' + i] = v; }); return o;
    });
  }
  function matches(needle) {
    return function (row) {
      for (var k in row) { if (String(row[k]).toLowerCase().indexOf(needle) >= 0) { return true; } }
      return false;
    };
  }
  function apply() {
    var t = made[current].table, needle = search.value.trim().toLowerCase();
    if (needle) { t.setFilter(matches(needle)); } else { t.clearFilter(); }
  }
  function counted(method) {
    return function () {
      if (method === current) { count.textContent = made[method].table.getDataCount('active') + ' of ' +
        data.selections[method].rows.length + ' rows'; }
    };
  }
  function show(method) {
    current = method;
    Object.keys(made).forEach(function (m) { made[m].el.style.display = m === method ? '' : 'none'; });
    if (!made[method]) {
      var el = document.createElement('div');
      el.setAttribute('data-method', method);
      holder.appendChild(el);
      var table = new Tabulator(el, {
        data: rows(data.selections[method]), columns: columns(data.selections[method].columns),
        layout: 'fitColumns', pagination: true, paginationSize: 25, height: false
      });
      made[method] = {el: el, table: table};
      table.on('tableBuilt', function () { el.setAttribute('data-ready', '1'); apply(); counted(method)(); });
      table.on('dataFiltered', function () { setTimeout(counted(method), 0); });
    } else { apply(); counted(method)(); }
    document.body.setAttribute('data-rose-method', method);
  }
  var params = new URLSearchParams(location.hash.replace(/^#/, ''));
  if (params.get('method') && data.selections[params.get('method')]) { picker.value = params.get('method'); }
  search.value = params.get('q') || '';
  picker.addEventListener('change', function () { show(picker.value); });
  search.addEventListener('input', function () { if (made[current] && made[current].el.getAttribute('data-ready')) { apply(); } });
  show(picker.value);
})();
"""
