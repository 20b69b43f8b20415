"""Raw reading of data files and the field helpers every format parser shares.

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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from rose_select.errors import DataError
from rose_select.records import Message

log = logging.getLogger(__name__)

_FORMAT_ALIASES = {"less": "messages", "tulu": "messages", "oasst": "messages", "oasst1": "messages",
                   "dolly": "alpaca", "flan": "inputs_targets", "flan_v2": "inputs_targets",
                   "cot": "inputs_targets", "dpo": "trl", "hh-rlhf": "hh", "hh_rlhf": "hh"}
_ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
          "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "model": "assistant"}
_DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
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



def _record_id(rec: dict, where: _Where, default: str) -> str:
    value = rec.get("id")
    if value is None:
        return default
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise where.error("wrong_type", f"id must be a string or integer, got {type(value).__name__}", "id")
    return str(value)



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




def _stem(path) -> str:
    name = Path(str(path)).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


