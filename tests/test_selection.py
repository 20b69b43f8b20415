"""Selection: sizes, tie-breaking, quotas, the written selection directory, overlaps, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rose_select.errors import ConfigError, NonFiniteError
from rose_select.records import InstructionRecord, Message
from rose_select.select.topk import (count_for_fraction, jaccard, overlap_table, read_best_subtasks,
                                   read_selection, shares_table, subtask_shares,
                                   select_top, write_selection)


def test_fraction_rounds_up_and_at_least_one():
    assert count_for_fraction(0.05, 100) == 5
    assert count_for_fraction(0.07, 100) == 7  # 0.07 * 100 = 7.000000000000001
    assert count_for_fraction(0.05, 101) == 6
    assert count_for_fraction(0.001, 10) == 1
    assert len(select_top(np.arange(10.0), fraction=0.25)) == 3
    with pytest.raises(ConfigError, match="fraction"):
        select_top(np.arange(10.0), fraction=1.5)
    with pytest.raises(ConfigError, match="count"):
        select_top(np.arange(10.0), count=11)


def test_ties_broken_by_index_and_order_is_best_first():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert select_top(scores, count=4).tolist() == [1, 3, 0, 2]
    assert select_top(scores, count=6).tolist() == [1, 3, 0, 2, 5, 4]
    assert select_top(np.array([1.0, -np.inf, 2.0]), count=3).tolist() == [2, 0, 1]
    with pytest.raises(NonFiniteError, match="b"):
        select_top(np.array([1.0, np.nan]), count=1, ids=["a", "b"])


def test_quotas():
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=float)
    sources = ["a", "a", "a", "a", "b", "b", "b", "c", "c", "c"]
    # b gets exactly 2 (count), c gets 0.25 * 4 = 1; the remaining 1 goes to unlisted 'a'
    sel = select_top(scores, count=4, sources=sources, quotas={"b": 2, "c": 0.25})
    assert sel.tolist() == [0, 4, 5, 7]
    # all sources listed, rounding leaves one slot: best remaining overall
    # (0.3 * 4 = 1.2 -> 1 each): the best remaining row overall takes the 4th slot
    sel = select_top(scores, count=4, sources=sources, quotas={"a": 0.3, "b": 0.3, "c": 0.3})
    assert sel.tolist() == [0, 1, 4, 7]
    with pytest.raises(ConfigError, match="more than the selection size"):
        select_top(scores, count=2, sources=sources, quotas={"a": 2, "b": 1})
    with pytest.raises(ConfigError, match="exceeds"):
        select_top(scores, count=5, sources=sources, quotas={"c": 4})
    with pytest.raises(ConfigError, match="not in the pool"):
        select_top(scores, count=2, sources=sources, quotas={"zzz": 1})
    with pytest.raises(ConfigError, match="source of every pool row"):
        select_top(scores, count=2, quotas={"a": 1})


def pool(n=12):
    recs = []
    for i in range(n):
        msgs = [Message("user", f"question {i}"), Message("assistant", f"answer {i}")]
        raw = {} if i % 3 == 0 else {"instruction": f"question {i}", "output": f"answer {i}", "meta": [i]}
        recs.append(InstructionRecord(id=f"r{i}", source="dolly" if i % 2 else "flan", messages=msgs, raw=raw))
    return recs


def test_write_selection_files(tmp_path, capsys):
    recs = pool()
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(len(recs))
    per_group = rng.standard_normal((len(recs), 3))
    sel = select_top(scores, count=5)
    table = write_selection(tmp_path / "sel", recs, scores, sel, per_group=per_group,
                            group_names=["x", "y", "z"], method="rose")
    assert table in capsys.readouterr().out and "rose: selected 5 of 12" in table
    d = tmp_path / "sel"
    np.testing.assert_array_equal(np.load(d / "scores.npy"), scores)
    rows = [json.loads(l) for l in (d / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in recs]
    assert rows[2]["best_subtask"] == ["x", "y", "z"][int(np.argmax(per_group[2]))]
    selected = [json.loads(l) for l in (d / "selected.jsonl").read_text().splitlines()]
    assert [s["id"] for s in selected] == [recs[i].id for i in sel]
    for s, i in zip(selected, sel):
        assert s["score"] == pytest.approx(scores[i])
        if recs[i].raw:
            assert {k: s[k] for k in recs[i].raw} == recs[i].raw
        else:
            assert s["dataset"] == recs[i].source and s["messages"][0] == {"role": "user", "content": f"question {i}"}
    summary = json.loads((d / "summary.json").read_text())
    assert summary["n_pool"] == 12 and summary["n_selected"] == 5
    assert summary["threshold"] == pytest.approx(scores[sel].min())
    for key in ("share_per_source", "pool_share_per_source", "share_per_subtask"):
        assert sum(summary[key].values()) == pytest.approx(1.0)
    assert read_selection(d) == [recs[i].id for i in sel] == read_selection(d / "selected.jsonl")
    assert not list(d.glob(".*.tmp"))
    assert read_best_subtasks(d) == {r["id"]: r["best_subtask"] for r in rows}


def test_subtask_shares_label_every_selection_by_the_reference():
    best = {"a": "x", "b": "y", "c": "x", "d": "z"}
    shares = subtask_shares({"rose": ["a", "c"], "random": ["b", "c", "d", "a"]}, best)
    assert shares == {"rose": {"x": 1.0, "y": 0.0, "z": 0.0},
                      "random": {"x": 0.5, "y": 0.25, "z": 0.25}}
    md = shares_table(shares)
    assert "| x | 100.0% | 50.0% |" in md and "| z | 0.0% | 25.0% |" in md
    with pytest.raises(ConfigError, match="not in the reference"):
        subtask_shares({"bad": ["q"]}, best)


def test_select_compare_cli_prints_overlap_and_subtask_shares(tmp_path, capsys):
    from rose_select.cli import main

    recs = pool()
    rng = np.random.default_rng(1)
    per_group = rng.standard_normal((len(recs), 2))
    write_selection(tmp_path / "rose", recs, per_group.max(1), select_top(per_group.max(1), count=4),
                    per_group=per_group, group_names=["g1", "g2"], echo=False)
    rand = rng.standard_normal(len(recs))
    write_selection(tmp_path / "random", recs, rand, select_top(rand, count=4), method="random", echo=False)
    assert read_best_subtasks(tmp_path / "random") is None
    assert main(["select", "--compare", str(tmp_path / "random"), str(tmp_path / "rose"),
                 "--plot-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| random | 1.000 |" in out and "assigned by rose" in out and "| g1 |" in out
    assert (tmp_path / "plots" / "overlap.png").exists() and (tmp_path / "plots" / "subtask_share.png").exists()
    # these hand-made records are no pool format the readers know: the page shows them as raw JSON
    from rose_select.report_html import selection_table

    assert (tmp_path / "plots" / "report.html").exists()
    picked = [json.loads(line) for line in (tmp_path / "rose" / "selected.jsonl").read_text().splitlines()]
    rows = selection_table(tmp_path / "rose")["rows"]
    assert [r[4] for r in rows] == [str(d["id"]) for d in picked]
    assert [json.loads(r[5]) for r in rows] == picked  # the raw record, whole (short enough here)


def test_jaccard_and_overlap_table():
    assert jaccard(["a", "b"], ["b", "c"]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0
    mat, md = overlap_table({"rose": ["a", "b"], "less": ["b", "c"], "rand": ["d"]})
    assert mat.shape == (3, 3) and np.allclose(np.diag(mat), 1) and mat[0, 1] == pytest.approx(1 / 3)
    assert mat[0, 2] == 0 and "| rose | 1.000 | 0.333 | 0.000 |" in md


def test_plots_write_pngs(tmp_path):
    from rose_select import plots

    rng = np.random.default_rng(0)
    outs = [
        plots.score_histogram(rng.standard_normal(200), tmp_path / "h.png", threshold=1.0),
        plots.share_bar_chart({"pool": {"a": 0.5, "b": 0.5}, "selected": {"a": 0.8, "b": 0.2}},
                              tmp_path / "s.png"),
        plots.overlap_heatmap(np.eye(3), ["x", "y", "z"], tmp_path / "o.png"),
        plots.line_plot([1, 2, 5], {"rose": [1, 2, 3], "less": [1, 1, 2]}, "shots", "win", "t",
                        tmp_path / "l.png"),
        plots.scatter_with_fit([1, 2, 3, 4], [2, 4, 5, 9], ["a", "b", "c", "d"], tmp_path / "c.png"),
        plots.bar_chart({"base": 0.5, "rose": 0.6, "broken": None}, tmp_path / "b.png", reference=0.5),
    ]
    for p in outs:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_lone_surrogate_in_an_unused_field_is_written_back_as_valid_utf8(tmp_path):
    """JSON accepts "\\ud800"; UTF-8 cannot hold it. A pool record's unused field may carry one into
    selected.jsonl, which must stay valid UTF-8 and give the record back as the pool file had it."""
    from rose_select.select.stage import SelectConfig, run_select

    rows = [{"id": f"p{i}", "note": "caf\u00e9 \ud800" if i == 0 else "caf\u00e9",
             "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))  # the escape, as such files have it
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    out = run_select(SelectConfig(method="random", pool=str(pool), validation=str(val), count=3, plots=False,
                                  output=str(tmp_path / "sel")))
    text = (out / "selected.jsonl").read_bytes().decode("utf-8")  # strict: raises on invalid UTF-8
    back = {r["id"]: r["note"] for r in map(json.loads, text.splitlines())}
    assert back == {r["id"]: r["note"] for r in rows}
    assert "caf\u00e9" in text  # other records keep their characters unescaped
