"""Preference sets (ROSE JSON, TRL rows, HH transcripts) -> ``PreferenceTriple``; subtask layouts;
SFT targets and test prompts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rose_select.data.reading import (
    BAD_BYTE,
    DATASETS_SUFFIXES,
    ASSISTANT_MARKER,
    refuse_bad_bytes,
    canonical_format,
    data_error,
    first_char,
    UniqueIds,
    iter_records,
    list_field,
    ProblemLog,
    open_text,
    prompt_field,
    record_id,
    require_exists,
    required_text,
    file_stem,
    text_field,
    message_turns,
    Where,
    parse_transcript,
)
from rose_select.errors import ConfigError, DataError
from rose_select.records import InstructionRecord, Message, PreferenceTriple

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

PREFERENCE_FORMATS = ("rose", "trl", "hh")
_TURN_HUMAN = "\n\nHuman:"
_SHOT_FILE = re.compile(r"^(?P<set>[a-z]+)_(?P<k>\d+)_shot")


@dataclass
class SubtaskSettings:
    """How a contiguous preference file splits into subtasks. Declared once and shared by every
    stage that reads the validation file (featurize, select, evaluate's held-out split, run):
    the layout is decided from the file and these settings (``load_preferences``), recorded in the
    validation store, and checked against the store by select."""

    num_subtasks: int | None = field(default=None, metadata={"help": "subtask count of a contiguous preference file (default: inferred from a published ROSE file name, else one subtask)"})
    subtasks: list[str] | None = field(default=None, metadata={"help": "subtask names of a contiguous preference file, in file order"})

    def __post_init__(self):
        if self.num_subtasks is not None and self.num_subtasks < 1:
            raise ConfigError(f"num_subtasks must be >= 1, got {self.num_subtasks}")
        if self.subtasks is not None and not self.subtasks:
            raise ConfigError("subtasks: give at least one name, or leave it unset")
        getattr(super(), "__post_init__", lambda: None)()

    def subtask_kwargs(self) -> dict:
        """The keyword arguments of ``load_preferences`` that carry this layout."""
        return {"num_subtasks": self.num_subtasks, "subtasks": self.subtasks}


def subtask_counts(groups: Sequence[str]) -> list[list]:
    """``[[subtask, rows], ...]`` in first-seen order of the rows' subtasks: a layout in a line
    (select compares a validation store's with its own)."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    return [[name, n] for name, n in counts.items()]


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
        raise data_error("count_mismatch", "at least one subtask is needed", path=path, field="subtasks")
    info = shot_file_info(path)
    set_name, k = info if info and info[0] in KNOWN_SUBTASKS else (None, info[1] if info else None)
    if subtasks is not None:
        names = [str(s) for s in subtasks]
        if num_subtasks is not None and int(num_subtasks) != len(names):
            raise data_error("count_mismatch", f"subtasks has {len(names)} names but num_subtasks={num_subtasks}",
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
            raise data_error("count_mismatch", f"{n} records, but the name says {k}-shot with {len(names)} "
                         f"subtasks ({sum(sizes)} records expected)", path=path, field="subtasks")
    elif n % len(names):
        raise data_error("count_mismatch", f"{n} records do not split into {len(names)} equal contiguous "
                     "subtasks", path=path, field="subtasks")
    else:
        sizes = [n // len(names)] * len(names)
    return [name for name, size in zip(names, sizes) for _ in range(size)]


def _safe_layout(path, n: int, log_: ProblemLog, **kwargs) -> list[str]:
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


def _read_rose_object(path: Path, log_: ProblemLog, fmt: str | None) -> _PairsDict | None:
    """The top-level object of a JSON-object file; None if the file is JSONL instead."""
    try:
        with open_text(path) as f:
            text = f.read()
        refuse_bad_bytes(text, Where(str(path), 0, None))
        top = json.loads(text, object_pairs_hook=_PairsDict)
    except DataError as e:  # bytes that are not UTF-8: name their line
        m = BAD_BYTE.search(text)
        log_.report(data_error(e.kind, e.problem, path=path, line=text.count("\n", 0, m.start()) + 1))
        return _PairsDict([])
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and fmt != "rose":
            return None  # several objects, one per line: JSONL
        log_.report(data_error("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})",
                           path=path, line=e.lineno))
        return _PairsDict([])
    return top


def _is_rose(top: dict) -> bool:
    first = next(iter(top.values()), None)
    return isinstance(first, dict) and "responses" in first


def _pairs(value: dict, n_responses: int, where: Where) -> None:
    for j, pair in enumerate(list_field(value, "pairs", where)):
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(i) is int for i in pair)):
            raise where.error("wrong_type", f"pairs[{j}] must be [i, j] integers, got {pair!r}", "pairs")
        if not all(0 <= i < n_responses for i in pair):
            raise where.error("pair_out_of_range", f"pairs[{j}] = {pair} out of range for "
                              f"{n_responses} responses", "pairs")
        if pair[0] == pair[1]:
            raise where.error("bad_pair", f"pairs[{j}] = {pair} compares a response with itself", "pairs")


def _rose_triple(prompt: str, value, where: Where, stem: str, subtask: str) -> PreferenceTriple:
    if not isinstance(value, dict):
        raise where.error("wrong_type", f"expected an object, got {type(value).__name__}")
    responses = list_field(value, "responses", where)
    if not responses:
        raise where.error("empty_field", "responses is empty", "responses")
    texts = {text_field(response, where, f"responses[{i}]", required=False) for i, response in enumerate(responses)}
    _pairs(value, len(responses), where)
    chosen = required_text(value, ("sft_target",), where)
    rejected = required_text(value, ("rejected_target",), where)
    for name, target in (("sft_target", chosen), ("rejected_target", rejected)):
        if target not in texts:
            raise where.error("bad_target", f"{name} is not one of the responses", name)
    return PreferenceTriple(id=f"{stem}:{where.index}", subtask=subtask, prompt=prompt_field(prompt, where),
                            chosen=chosen, rejected=rejected, raw={"prompt": prompt, **value})


def _read_rose(path: Path, top: _PairsDict, log_: ProblemLog, layout_kw: dict) -> list[PreferenceTriple]:
    log_.format, log_.entries = "rose", len(top.pairs)
    subtasks, stem, seen, out = _safe_layout(path, len(top.pairs), log_, **layout_kw), file_stem(path), {}, []
    for index, (prompt, value) in enumerate(top.pairs):
        where = Where(str(path), index, context=str(prompt).strip()[:60])
        try:
            if prompt in seen:  # json.load would silently keep only the last one
                raise where.error("duplicate_id", f"prompt repeats record {seen[prompt]}", "prompt")
            seen[prompt] = index
            out.append(_rose_triple(prompt, value, where, stem, subtasks[index]))
            _note_equal(out[-1], where, log_)
        except DataError as e:
            log_.report(e)
    return out


def _note_equal(triple: PreferenceTriple, where: Where, log_: ProblemLog) -> None:
    """chosen == rejected happens in the published files (85 of 4157 prompts): kept, since the
    subtask layout counts them, but named in a warning; their pairwise feature is zero, which
    scoring treats as a zero vector (no contribution)."""
    if triple.chosen == triple.rejected:
        log_.keep("chosen == rejected (no preference; their pairwise feature is zero)", where)


def _split_hh(chosen: str, rejected: str, where: Where) -> tuple[str, str, str]:
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
    if any(_TURN_HUMAN in answer for answer in (chosen[cut:], rejected[cut:])):
        raise where.error("no_shared_turn", "chosen and rejected differ before their last Assistant turn "
                          "(inside a Human turn), so the answers would contain 'Human:' turns", "chosen")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _answer(value, where: Where, name: str) -> str:
    """A response given as a string or as messages whose last assistant turn is the answer."""
    if isinstance(value, list):
        msgs = [m for m in message_turns(value, where, name, "role", "content") if m.role == "assistant"]
        if not msgs:
            raise where.error("missing_field", "no assistant message", name)
        return text_field(msgs[-1].content, where, name)
    if value is None:
        raise where.error("missing_field", "missing field", name)
    return text_field(value, where, name)


def _implicit_prompt(chosen: list, rejected: list, where: Where) -> list[Message]:
    """TRL's implicit-prompt form: the prompt is the longest common message prefix."""
    c = message_turns(chosen, where, "chosen", "role", "content")
    r = message_turns(rejected, where, "rejected", "role", "content")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    return c[:n]


def _trl_prompt(rec: dict, where: Where) -> list[Message]:
    prompt = rec.get("prompt")
    if prompt is None and isinstance(rec.get("chosen"), list) and isinstance(rec.get("rejected"), list):
        msgs = _implicit_prompt(rec["chosen"], rec["rejected"], where)
    elif isinstance(prompt, list):
        msgs = [m for m in message_turns(prompt, where, "prompt", "role", "content") if m.content]
    elif prompt is None:
        raise where.error("missing_field", "missing field", "prompt")
    else:
        return prompt_field(prompt, where)
    if not msgs or msgs[-1].role != "user":
        raise where.error("bad_prompt", "prompt must end with a user turn", "prompt")
    return msgs


def _row_triple(rec, fmt: str, where: Where, stem: str, subtask: str, subtask_field: str) -> PreferenceTriple:
    if not isinstance(rec, dict):
        raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
    if fmt == "hh":
        text, chosen, rejected = _split_hh(text_field(rec.get("chosen"), where, "chosen"),
                                           text_field(rec.get("rejected"), where, "rejected"), where)
        prompt = prompt_field(text, where)
        chosen, rejected = text_field(chosen, where, "chosen"), text_field(rejected, where, "rejected")
    else:
        prompt = _trl_prompt(rec, where)
        chosen, rejected = _answer(rec.get("chosen"), where, "chosen"), _answer(rec.get("rejected"), where, "rejected")
    if rec.get(subtask_field) is not None:
        subtask = text_field(rec[subtask_field], where, subtask_field)
    rid = record_id(rec, where, f"{stem}:{where.index}")
    return PreferenceTriple(id=rid, subtask=subtask, prompt=prompt, chosen=chosen, rejected=rejected, raw=rec)


def _sniff_preference(rec, where: Where) -> str:
    if isinstance(rec, dict) and "chosen" in rec and "rejected" in rec:
        return "trl" if "prompt" in rec or not isinstance(rec["chosen"], str) else "hh"
    if isinstance(rec, dict) and ("chosen" in rec) != ("rejected" in rec):  # half a pair: say which half
        missing = "rejected" if "chosen" in rec else "chosen"
        raise where.error("missing_field", f"missing field (a preference row needs both chosen and "
                          f"rejected; keys seen: {sorted(rec)})", missing)
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise where.error("unknown_format", f"unknown preference format; keys seen: {keys}; expected a ROSE "
                      "prompt->{responses,pairs,...} object, {prompt,chosen,rejected} or {chosen,rejected}")


def _read_rows(path: Path, rows: list, log_: ProblemLog, fmt: str | None, layout_kw: dict,
               subtask_field: str) -> list[PreferenceTriple]:
    if not rows:
        return []
    try:
        fmt = log_.format = fmt or _sniff_preference(rows[0][1], rows[0][0])
    except DataError as e:
        log_.report(e)
        return []
    subtasks, stem, ids, out = _safe_layout(path, log_.entries, log_, infer=False, **layout_kw), file_stem(path), UniqueIds(), []
    for where, rec in rows:
        try:
            triple = _row_triple(rec, fmt, where, stem, subtasks[where.index], subtask_field)
            triple.id = ids.claim(triple.id, where)
            out.append(triple)
            _note_equal(triple, where, log_)
        except DataError as e:
            log_.report(e)
    return out


def read_preferences(path, log_: ProblemLog, *, format="auto", subtasks=None, num_subtasks=None,
                      subtask_field="subtask") -> list[PreferenceTriple]:
    path, fmt = Path(path), canonical_format(format, PREFERENCE_FORMATS)
    layout_kw = {"subtasks": subtasks, "num_subtasks": num_subtasks}
    top = _read_object_file(path, log_, fmt)
    if top is not None and (fmt == "rose" or _is_rose(top)):
        return _read_rose(path, top, log_, layout_kw)
    if fmt == "rose":
        raise data_error("wrong_type", "the ROSE format is one JSON object mapping prompts to "
                     "{responses, pairs, sft_target, rejected_target}", path=path)
    if top is not None:  # one JSON object that is not a ROSE map: a single row
        log_.entries, rows = 1, [(Where(str(path), 0, 1), dict(top))]
    else:
        rows = list(iter_records(path, log_))
    return _read_rows(path, rows, log_, fmt, layout_kw, subtask_field)


def _read_object_file(path: Path, log_: ProblemLog, fmt: str | None) -> _PairsDict | None:
    """The top-level object when the file is one JSON object (not JSONL, not an array)."""
    if path.suffix.lower() in DATASETS_SUFFIXES:
        return None
    require_exists(path)
    try:
        return _read_rose_object(path, log_, fmt) if first_char(path) == "{" else None
    except UnicodeDecodeError as e:
        raise data_error("unreadable", f"not UTF-8 text ({e.reason})", path=path) from None


def load_preferences(path, *, format: str = "auto", subtasks: Sequence[str] | None = None,
                     num_subtasks: int | None = None, subtask_field: str = "subtask") -> list[PreferenceTriple]:
    """Read preference triples (prompt, chosen, rejected) with their subtask.

    Formats: the ROSE/DPO JSON object (prompt -> responses/pairs/sft_target/rejected_target;
    subtasks contiguous, inferred for the published ``<set>_<k>_shot`` files), TRL
    ``{prompt, chosen, rejected}`` rows (strings or messages) and raw HH-RLHF ``{chosen, rejected}``
    transcripts (split at the last shared ``Assistant:`` turn).
    """
    log_ = ProblemLog()
    triples = read_preferences(path, log_, format=format, subtasks=subtasks, num_subtasks=num_subtasks,
                                subtask_field=subtask_field)
    log_.warn_skipped(path)
    if not triples:
        raise log_.no_records(path)
    return triples


def load_sft_targets(path, *, subtasks: Sequence[str] | None = None,
                     num_subtasks: int | None = None) -> list[InstructionRecord]:
    """The ``<set>_<k>_shot_sft.json`` companions: prompt + chosen answer as a conversation.

    The HH transcript in the user turn is split into proper turns. ``source`` holds the subtask
    (for per-subtask grouping) and ids are ``"<stem>:<index>"``, because the files' own ids
    repeat across subtasks.
    """
    log_ = ProblemLog()
    rows = list(iter_records(path, log_))
    layout = subtask_layout(path, len(rows), subtasks=subtasks, num_subtasks=num_subtasks)
    return [_sft_record(rec, where, layout[where.index], file_stem(path)) for where, rec in rows]


def _sft_record(rec, where: Where, subtask: str, stem: str) -> InstructionRecord:
    if not isinstance(rec, dict):
        raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
    turns = message_turns(list_field(rec, "messages", where), where, "messages", "role", "content")
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
    stem = file_stem(path)
    subtask = stem.split("_", 1)[1] if "_" in stem else stem
    out = []
    for where, rec in iter_records(path, ProblemLog()):
        if not isinstance(rec, dict):
            raise where.error("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
        out.append({"id": f"{stem}:{where.index}", "subtask": subtask,
                    "prompt_messages": prompt_field(rec.get("prompt"), where),
                    "golden_answer": required_text(rec, ("golden_answer",), where)})
    return out


def target_name(path: str) -> str:
    """``.../shp_5_shot_preference.json`` -> ``shp_5_shot``."""
    name = Path(path).name
    for suffix in ("_preference.json", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name
