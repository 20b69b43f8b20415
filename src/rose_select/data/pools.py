"""Instruction pools in every supported format -> ``InstructionRecord``."""

from __future__ import annotations

from typing import Iterable

from rose_select.data.reading import (
    canonical_format,
    as_conversation,
    UniqueIds,
    iter_records,
    list_field,
    ProblemLog,
    optional_text,
    first_present,
    record_id,
    required_text,
    SkipRecord,
    file_stem,
    message_turns,
    Where,
)
from rose_select.errors import DataError
from rose_select.io import write_jsonl
from rose_select.records import InstructionRecord, Message

POOL_FORMATS = ("messages", "sharegpt", "alpaca", "inputs_targets", "prompt_completion", "question_answer")
# (prompt keys, optional extra-input keys, answer keys) of the single-turn field formats.
_FIELD_FORMATS = {
    "alpaca": (("instruction",), ("input", "context"), ("output", "response")),
    "inputs_targets": (("inputs",), (), ("targets",)),
    "prompt_completion": (("prompt",), (), ("completion",)),
    "question_answer": (("question",), (), ("answer",)),
}


# --------------------------------------------------------------------------- instruction pools

def _sniff_pool(rec: dict, where: Where) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    for fmt, (prompt_keys, _, answer_keys) in _FIELD_FORMATS.items():
        if first_present(rec, prompt_keys) and first_present(rec, answer_keys):
            return fmt
    raise where.error("unknown_format", f"unknown pool format; keys seen: {sorted(rec)}; expected "
                      "messages | conversations | instruction+output/response | inputs+targets | "
                      "prompt+completion | question+answer (or pass column_map)")


def pool_messages(rec: dict, fmt: str, where: Where) -> list[Message]:
    if fmt == "messages":
        return as_conversation(message_turns(list_field(rec, "messages", where), where, "messages", "role", "content"),
                             where=where)
    if fmt == "sharegpt":
        turns = message_turns(list_field(rec, "conversations", where), where, "conversations", "from", "value")
        return as_conversation(turns, drop_leading_assistant=True)
    prompt_keys, extra_keys, answer_keys = _FIELD_FORMATS[fmt]
    prompt = required_text(rec, prompt_keys, where)
    extra = optional_text(rec, extra_keys, where)
    answer = required_text(rec, answer_keys, where)
    return [Message("user", f"{prompt}\n\n{extra}" if extra else prompt), Message("assistant", answer)]


def _pool_source(rec: dict, fmt: str, source: str | None, stem: str) -> str:
    if isinstance(rec.get("dataset"), str) and rec["dataset"]:
        return rec["dataset"]
    if source:
        return source
    if fmt == "alpaca":
        return "dolly" if {"context", "response", "category"} & set(rec) else "alpaca"
    return "sharegpt" if fmt == "sharegpt" else stem


def _apply_column_map(rec: dict, column_map: dict[str, str] | None, where: Where) -> dict:
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


def read_pool(path, log_: ProblemLog, *, format="auto", source=None, column_map=None, limit=None,
               split="train", duplicate_ids="error") -> list[InstructionRecord]:
    fmt, ids, records, stem = canonical_format(format, POOL_FORMATS), UniqueIds(duplicate_ids), [], file_stem(path)
    for where, rec in iter_records(path, log_, split=split):
        if limit is not None and len(records) >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
            mapped = _apply_column_map(rec, column_map, where)
            fmt = log_.format = fmt or _sniff_pool(mapped, where)
            messages = pool_messages(mapped, fmt, where)
            src = _pool_source(mapped, fmt, source, stem)
            rid = ids.claim(record_id(mapped, where, f"{src}_{where.index}"), where)
        except SkipRecord as why:
            log_.skip(str(why), where)
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
    log_ = ProblemLog()
    records = read_pool(path, log_, format=format, source=source, column_map=column_map, limit=limit,
                         split=split, duplicate_ids=duplicate_ids)
    log_.warn_skipped(path)
    if not records:
        raise log_.no_records(path)
    return records


def pool_row(record: InstructionRecord) -> dict:
    """One record in the LESS ``messages`` JSONL layout."""
    return {"dataset": record.source, "id": record.id,
            "messages": [{"role": m.role, "content": m.content} for m in record.messages]}


def write_pool_jsonl(records: Iterable[InstructionRecord], path) -> None:
    """Write records in the LESS messages format, atomically (no half-written pool files)."""
    write_jsonl(path, (pool_row(r) for r in records))


