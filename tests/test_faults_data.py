"""Fault catalogue, class *data* (issue 11): inputs that used to be read wrong without a word.
Each case either raises a ``DataError`` naming file, line or record, and field, or (input that is
legitimate but unusual) loads with a warning that names the records; ``rose data validate``
reports the same, and nothing is written."""

from __future__ import annotations

import json
import logging

import pytest

from rose_select import data
from rose_select.errors import DataError

MSGS = [{"role": "user", "content": "Tell me about bread."}, {"role": "assistant", "content": "Flour and water."}]


def _row(i, messages=None) -> dict:
    return {"id": f"p{i}", "messages": messages or MSGS}


def _rose(**entry) -> str:
    base = {"responses": [" Good.", " Bad."], "pairs": [[0, 1]], "sft_target": " Good.", "rejected_target": " Bad."}
    return json.dumps({"Q1?": {**base, **entry}}, indent=1)


# name: (file name, contents (str or bytes), loader, error pattern, (line, record, field))
ERRORS = {
    # case 4: records silently dropped
    "jsonl_first_line_array": ("pool.jsonl", json.dumps([_row(0)]) + "\n" + json.dumps(_row(1)) + "\n"
                               + json.dumps(_row(2)) + "\n", "pool",
                               r"text after the closing '\]'.*JSONL whose first line is an array", (2, None, None)),
    "junk_after_array": ("pool.json", json.dumps([_row(0), _row(1)]) + "\n\nxyz\n", "pool",
                         r"text after the closing '\]'", (3, None, None)),
    "array_without_commas": ("pool.json", "[" + json.dumps(_row(0)) + "\n " + json.dumps(_row(1)) + "]", "pool",
                             r"expected ',' or '\]' after record 0", (2, "1", None)),
    "array_trailing_comma": ("pool.json", "[" + json.dumps(_row(0)) + ",\n]", "pool", r"trailing comma",
                             (2, "1", None)),
    # case 6: a lone surrogate escape
    "lone_surrogate": ("pool.jsonl", json.dumps(_row(0, [MSGS[0], {"role": "assistant", "content": "ok \ud800"}]))
                       + "\n", "pool", r"lone surrogate \\ud800", (1, "0", "messages[1].content")),
    "lone_surrogate_pref": ("prefs.jsonl", json.dumps({"prompt": "Q?", "chosen": "a\udfff", "rejected": "b"}) + "\n",
                            "preference", r"lone surrogate \\udfff", (1, "0", "chosen")),
    # case 7: bytes that are not UTF-8, UTF-16
    "latin1_line_3": ("pool.jsonl", (json.dumps(_row(0)) + "\n" + json.dumps(_row(1)) + "\n").encode()
                      + '{"id": "p2", "messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"),
                      "pool", r"not UTF-8 text \(byte 0xe9", (3, "2", None)),
    "latin1_in_array": ("pool.json", ("[" + json.dumps(_row(0)) + ",\n").encode() + '{"id": "p1", "x": "\xe9"}]'
                        .encode("latin-1"), "pool", r"not UTF-8 text \(byte 0xe9", (2, "1", None)),
    "latin1_rose": ("val.json", _rose().replace("Good", "G\xf6od").encode("latin-1"), "preference",
                    r"not UTF-8 text \(byte 0xf6", (4, None, None)),
    "utf16": ("pool.jsonl", (json.dumps(_row(0)) + "\n").encode("utf-16"), "pool",
              r"not UTF-8 text: UTF-16.*save the file as UTF-8", (1, None, None)),
    "utf16_no_bom": ("pool.jsonl", (json.dumps(_row(0)) + "\n").encode("utf-16-le"), "pool",
                     r"not UTF-8 text: UTF-16/32", (1, None, None)),
    # accepted but should not be
    "assistant_first": ("pool.jsonl", json.dumps(_row(0, [{"role": "system", "content": "S"}, MSGS[1], MSGS[0],
                                                          MSGS[1]])) + "\n", "pool",
                        "starts with an assistant turn", (1, "0", "messages[1].role")),
    "hh_differs_in_human_turn": ("hh.jsonl", json.dumps({
        "chosen": "\n\nHuman: Bake bread?\n\nAssistant: Yes.\n\nHuman: How long?\n\nAssistant: An hour.",
        "rejected": "\n\nHuman: Bake bread?\n\nAssistant: Yes.\n\nHuman: How hot?\n\nAssistant: Very."}) + "\n",
        "preference", r"differ before their last Assistant turn \(inside a Human turn\)", (1, "0", "chosen")),
    "rose_empty_responses": ("val.json", _rose(responses=[], pairs=[]), "preference", "responses is empty",
                             (None, "0", "responses")),
    "rose_pair_with_itself": ("val.json", _rose(pairs=[[0, 1], [1, 1]]), "preference",
                              r"pairs\[1\] = \[1, 1\] compares a response with itself", (None, "0", "pairs")),
    "rose_target_not_a_response": ("val.json", _rose(sft_target="Other."), "preference",
                                   "sft_target is not one of the responses", (None, "0", "sft_target")),
    "empty_file": ("pool.jsonl", "", "pool", r"no records \(the file is empty or blank\)", (None, None, None)),
    "blank_file": ("prefs.jsonl", "\n  \n\n", "preference", r"no records \(the file is empty or blank\)",
                   (None, None, None)),
    "everything_skipped": ("pool.jsonl", json.dumps(_row(0, [MSGS[0]])) + "\n", "pool",
                           r"no usable record \(1 skipped: no assistant turn\)", (None, None, None)),
}


def _load(path, kind):
    return data.load_pool(path) if kind == "pool" else data.load_preferences(path)


@pytest.mark.parametrize("case", ERRORS)
def test_bad_data_is_an_error_naming_where(case, tmp_path):
    name, contents, kind, pattern, (line, record, field) = ERRORS[case]
    path = tmp_path / name
    path.write_bytes(contents if isinstance(contents, bytes) else contents.encode("utf-8", "surrogatepass"))
    with pytest.raises(DataError, match=pattern) as err:
        _load(path, kind)
    e = err.value
    assert (e.path, e.line, e.record, e.field) == (str(path), line, record, field)
    report = data.validate_file(path, kind=kind)
    assert not report.ok and any(pattern_found(pattern, str(p)) for p in report.problems), report.format()
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def pattern_found(pattern, text) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_validate_counts_every_record_of_a_file_with_one_bad_line(tmp_path):
    """Case 7: a bad byte on line 3 no longer hides the file: 3 records read, 2 valid."""
    name, contents, *_ = ERRORS["latin1_line_3"]
    path = tmp_path / name
    path.write_bytes(contents)
    report = data.validate_file(path, kind="pool")
    assert (report.records, report.valid, report.problem_counts) == (3, 2, {"unreadable": 1})
    assert f"{path}, line 3, record '2': not UTF-8 text" in report.format()


# name: (contents, loader, warning pattern naming the records, ids kept)
WARNED = {
    "null_content_between_user_turns": (
        [_row(0), _row(1, [MSGS[0], {"role": "assistant", "content": None}, {"role": "user", "content": "More?"},
                           MSGS[1]])],
        "pool", r"1 empty turn between two user turns \(record 1 \(line 2\)\)", ["p0"]),
    "blank_answer": ([_row(0), _row(1, [MSGS[0], {"role": "assistant", "content": "   "}])], "pool",
                     r"1 no assistant turn \(record 1 \(line 2\)\)", ["p0"]),
    "empty_messages": ([_row(0), {"id": "p1", "messages": []}, _row(2)], "pool",
                       r"1 no assistant turn \(record 1 \(line 2\)\)", ["p0", "p2"]),
    "user_only": ([_row(0), _row(1), _row(2, [MSGS[0]])], "pool", r"1 no assistant turn \(record 2 \(line 3\)\)",
                  ["p0", "p1"]),
    "chosen_equals_rejected": ([{"id": "v0", "prompt": "Q?", "chosen": "Same.", "rejected": "Same."},
                                {"id": "v1", "prompt": "Q2?", "chosen": "Yes.", "rejected": "No."}], "preference",
                               r"1 record\(s\) kept, but chosen == rejected .*: record 0 \(line 1\)", ["v0", "v1"]),
}


@pytest.mark.parametrize("case", WARNED)
def test_unusual_data_loads_with_a_warning_naming_the_records(case, tmp_path, caplog):
    rows, kind, pattern, ids = WARNED[case]
    path = tmp_path / "file.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="rose_select.data"):
        got = _load(path, kind)
    assert [r.id for r in got] == ids
    assert pattern_found(pattern, caplog.text), caplog.text
    report = data.validate_file(path, kind=kind)
    assert report.ok and report.valid == len(ids)
    named = pattern_found(r"record (\d+) \(line (\d+)\)", caplog.text)
    assert named and next(n for n in ("record 0 (line 1)", "record 1 (line 2)", "record 2 (line 3)")
                          if n in caplog.text) in report.format(), report.format()


def test_null_content_never_joins_two_user_turns(tmp_path):
    """The dropped-null-turn record is skipped, not read as two user turns in a row."""
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in WARNED["null_content_between_user_turns"][0]))
    for rec in data.load_pool(path):
        roles = [m.role for m in rec.messages]
        assert all(a != b for a, b in zip(roles, roles[1:]))


def test_published_rose_files_still_load(shared_data_dir):
    """The published validation files hold chosen == rejected prompts (85 of 4157): they load."""
    files = sorted(shared_data_dir.glob("validation/*/*/*_preference.json")) if shared_data_dir.exists() else []
    if not files:
        pytest.skip("published ROSE data not beside the checkout")
    assert sum(len(data.load_preferences(f)) for f in files) > 3000
