"""Raw reading of data files and the field helpers every format parser shares.

Every loader works in one of two modes sharing one parser: *raise* (the public ``load_*``
functions stop at the first problem with a ``DataError`` naming file, line/record and field) and
*collect* (``validate_file`` gathers every problem, counted per kind). The parsers themselves
always raise; the record loop decides whether to re-raise or to note the problem and go on.

Line numbers are 1-based; record indices are 0-based positions in the file (the same index
used in default ids such as ``"shp_5_shot_preference:3"``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from rose_select.data.rawtext import (  # noqa: F401  (re-exported: the loaders import them from here)
    BAD_BYTE,
    refuse_bad_bytes,
    data_error,
    first_char,
    ProblemLog,
    open_text,
    SkipRecord,
    Where,
    iter_json_array,
)
from rose_select.errors import DataError
from rose_select.records import Message


_FORMAT_ALIASES = {"less": "messages", "tulu": "messages", "oasst": "messages", "oasst1": "messages",
                   "dolly": "alpaca", "flan": "inputs_targets", "flan_v2": "inputs_targets",
                   "cot": "inputs_targets", "dpo": "trl", "hh-rlhf": "hh", "hh_rlhf": "hh"}
_ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
          "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "model": "assistant"}
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate: json accepts "\ud800", UTF-8 cannot hold it
ASSISTANT_MARKER = "\n\nAssistant:"


def _iter_jsonl(path: Path, log_: ProblemLog) -> Iterator[tuple[Where, Any]]:
    index = 0
    with open_text(path) as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = Where(str(path), index, lineno)
            index = log_.entries = index + 1
            try:
                refuse_bad_bytes(text, where)
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                log_.report(where.error("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})"))
            except DataError as e:
                log_.report(e)


def _load_hf(spec: str, builder: str | None, split: str):
    """A ``datasets`` split from a local Parquet/CSV/Arrow file or a Hugging Face hub name."""
    import datasets

    try:
        if builder:
            return datasets.load_dataset(builder, data_files=spec, split=split)
        return datasets.load_dataset(spec, split=split)
    except Exception as e:  # hub/network/format errors: name the source, keep the cause
        raise data_error("unreadable", f"cannot load with datasets: {type(e).__name__}: {e}", path=spec) from e


def _iter_hf(spec: str, builder: str | None, split: str, log_: ProblemLog) -> Iterator[tuple[Where, Any]]:
    for index, row in enumerate(_load_hf(spec, builder, split)):
        log_.entries = index + 1
        yield Where(spec, index), row


def iter_records(path, log_: ProblemLog, *, split: str = "train") -> Iterator[tuple[Where, Any]]:
    """Records of any supported file (or hub dataset name), each with where it came from."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    if suffix.lower() in DATASETS_SUFFIXES:
        require_exists(path)
        yield from _iter_hf(str(path), DATASETS_SUFFIXES[suffix.lower()], split, log_)
    elif not path.exists() and not suffix:
        yield from _iter_hf(str(path), None, split, log_)  # a hub dataset name
    else:
        require_exists(path)
        try:
            if first_char(path) == "[":
                yield from iter_json_array(path, log_=log_)
            else:
                yield from _iter_jsonl(path, log_)
        except UnicodeDecodeError as e:
            raise data_error("unreadable", f"not UTF-8 text ({e.reason})", path=path) from None


def require_exists(path: Path) -> None:
    if not path.is_file():
        raise data_error("missing_file", "file not found", path=path)


# --------------------------------------------------------------------------- field helpers

def first_present(rec: dict, keys: Sequence[str]) -> str | None:
    """The first of ``keys`` the record has with a non-null value (datasets fills gaps with None)."""
    return next((k for k in keys if rec.get(k) is not None), None)


def text_field(value, where: Where, name: str, *, required: bool = True) -> str:
    if value is None:
        raise where.error("missing_field", "missing field", name)
    if not isinstance(value, str):
        raise where.error("wrong_type", f"expected a string, got {type(value).__name__}", name)
    _valid_unicode(value, where, name)
    if required and not value.strip():
        raise where.error("empty_field", "empty string", name)
    return value.strip()


def _valid_unicode(value: str, where: Where, name: str) -> None:
    m = _SURROGATE.search(value)
    if m:
        raise where.error("bad_text", f"a lone surrogate \\u{ord(m.group()):04x} at character {m.start()} "
                          "(not a character; UTF-8 cannot encode it)", name)


def required_text(rec: dict, keys: Sequence[str], where: Where) -> str:
    key = first_present(rec, keys)
    if key is None:
        raise where.error("missing_field", f"missing field (one of {list(keys)} needed)", "|".join(keys))
    return text_field(rec[key], where, key)


def optional_text(rec: dict, keys: Sequence[str], where: Where) -> str:
    key = first_present(rec, keys)
    return "" if key is None else text_field(rec[key], where, key, required=False)


def list_field(rec: dict, key: str, where: Where) -> list:
    if rec.get(key) is None:
        raise where.error("missing_field", "missing field", key)
    if not isinstance(rec[key], list):
        raise where.error("wrong_type", f"expected a list, got {type(rec[key]).__name__}", key)
    return rec[key]


def _role(value, where: Where, name: str) -> str:
    if value is None:
        raise where.error("missing_field", "missing role", name)
    role = _ROLES.get(str(value).lower())
    if role is None:
        raise where.error("unknown_role", f"unknown role {value!r} (known: {sorted(_ROLES)})", name)
    return role


def message_turns(items: list, where: Where, name: str, role_key: str, text_key: str) -> list[Message]:
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
        _valid_unicode(content or "", where, f"{name}[{i}].{text_key}")
        out.append(Message(role, (content or "").strip()))
    return out


def as_conversation(messages: list[Message], *, drop_leading_assistant: bool = False,
                  where: Where | None = None, name: str = "messages") -> list[Message]:
    """Drop empty (null or blank) turns and trailing unanswered user turns; skip a record where
    dropping an empty turn would join two turns of one role (other text than the data says), or
    with no user or no assistant turn left. An assistant turn before any user turn is an error
    (``where`` given), or dropped (ShareGPT)."""
    prev, gap = None, False
    for m in messages:
        if not m.content:
            gap = gap or m.role != "system"
        elif gap and m.role == prev:
            raise SkipRecord(f"empty turn between two {m.role} turns")
        else:
            prev, gap = m.role if m.role != "system" else prev, False
    msgs = [m for m in messages if m.content]
    first = next((i for i, m in enumerate(messages) if m.role != "system"), None)
    if drop_leading_assistant:  # ShareGPT (FastChat convention): an answer to nothing is noise
        first_user = next((i for i, m in enumerate(msgs) if m.role == "user"), len(msgs))
        msgs = [m for i, m in enumerate(msgs) if i >= first_user or m.role == "system"]
    elif where is not None and first is not None and messages[first].role == "assistant":
        raise where.error("bad_order", "the conversation starts with an assistant turn (an answer to "
                          "no question)", f"{name}[{first}].role")
    while msgs and msgs[-1].role != "assistant":
        msgs.pop()
    if not msgs:
        raise SkipRecord("no assistant turn")
    if not any(m.role == "user" for m in msgs):
        raise SkipRecord("no user turn")
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


def prompt_field(text, where: Where, name: str = "prompt") -> list[Message]:
    msgs = parse_transcript(text_field(text, where, name))
    if not msgs or msgs[-1].role != "user":
        raise where.error("bad_prompt", "prompt must end with a user turn", name)
    return msgs


def record_id(rec: dict, where: Where, default: str) -> str:
    value = rec.get("id")
    if value is None:
        return default
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise where.error("wrong_type", f"id must be a string or integer, got {type(value).__name__}", "id")
    _valid_unicode(str(value), where, "id")
    return str(value)


def canonical_format(fmt: str, allowed: Sequence[str]) -> str | None:
    if fmt == "auto":
        return None
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in allowed:
        raise DataError(f"unknown format {fmt!r}; choose auto or one of {list(allowed)}", field="format")
    return fmt


class UniqueIds:
    """Duplicate-id detection that remembers where each id was first seen."""

    def __init__(self, mode: str = "error"):
        if mode not in ("error", "rename"):
            raise DataError(f"duplicate_ids must be 'error' or 'rename', got {mode!r}", field="duplicate_ids")
        self.mode, self.seen = mode, {}

    def claim(self, rid: str, where: Where) -> str:
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


def file_stem(path) -> str:
    name = Path(str(path)).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


