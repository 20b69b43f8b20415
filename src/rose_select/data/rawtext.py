"""Raw text of data files: problem reporting (file, line, record, field), opening text (UTF-8
only, naming the line of a byte that is not), and the streamed, strict JSON-array reader."""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rose_select.errors import DataError

log = logging.getLogger(__name__)
BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as read with surrogateescape


# --------------------------------------------------------------------------- problems

class SkipRecord(Exception):
    """A record that is well-formed but unusable (e.g. no assistant turn): counted, not an error."""


def data_error(kind: str, message: str, *, path, line=None, record=None, field=None) -> DataError:
    err = DataError(message, path=str(path), line=line,
                    record=None if record is None else str(record), field=field)
    err.kind = kind  # problem class, for the per-kind counts of validate_file
    return err


@dataclass(frozen=True)
class Where:
    """Where a record sits in its file, so every error can name it."""

    path: str
    index: int
    line: int | None = None
    context: str | None = None  # e.g. the start of a preference prompt

    def name(self) -> str:
        return f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")

    def error(self, kind: str, message: str, field: str | None = None) -> DataError:
        if self.context:
            message = f"{message} (prompt {self.context!r})"
        return data_error(kind, message, path=self.path, line=self.line, record=self.index, field=field)


@dataclass
class ProblemLog:
    """Raise-first or collect-all sink for problems, plus what a validation report needs."""

    collect: bool = False
    errors: list[DataError] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    format: str | None = None
    entries: int = 0
    # why -> where: records skipped, and records kept but unusual (each warning names them)
    skipped_at: dict[str, list[str]] = field(default_factory=dict)
    kept_at: dict[str, list[str]] = field(default_factory=dict)

    def report(self, err: DataError) -> None:
        if not self.collect:
            raise err
        self.errors.append(err)

    def skip(self, why: str, where: "Where | None") -> None:
        self.skipped[why] += 1
        self.skipped_at.setdefault(why, []).append(where.name() if where else "?")

    def keep(self, why: str, where: "Where") -> None:
        self.kept_at.setdefault(why, []).append(where.name())

    def warn_skipped(self, path) -> None:
        if self.skipped:
            detail = "; ".join(f"{n} {why} ({some_names(self.skipped_at.get(why, []))})"
                               for why, n in sorted(self.skipped.items()))
            _warn_once(path, "%s: skipped %d record(s): %s", path, sum(self.skipped.values()), detail)
        for why, names in sorted(self.kept_at.items()):
            _warn_once(path, "%s: %d record(s) kept, but %s: %s", path, len(names), why, some_names(names))

    def no_records(self, path) -> DataError:
        """The error of a file that yields no record at all (empty, blank, or everything skipped)."""
        why = "; ".join(f"{n} skipped: {why}" for why, n in sorted(self.skipped.items()))
        what = f"no usable record ({why})" if why else "no records (the file is empty or blank)"
        return data_error("empty_file", what, path=path)


_WARNED: set[tuple] = set()


def _warn_once(path, fmt: str, *args) -> None:
    """A file's data notice, said once per process for one version of the file: several stages of
    one run read the same file (planting and the held-out pairs both read the larger-shot file),
    and the same notice twice reads like two problems."""
    try:
        st = Path(path).stat()
        version = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    except (OSError, TypeError, ValueError):
        version = (str(path),)
    key = (version, fmt % args)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(fmt, *args)


def some_names(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


# --------------------------------------------------------------------------- raw reading

_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
              b"\xfe\xff": "UTF-16"}


def open_text(path: Path):
    """UTF-8 text (a byte-order mark is tolerated), gzip-compressed when the name ends in .gz.
    Bytes that are not UTF-8 are read as lone surrogates (``surrogateescape``) so that the record
    loop can name their line (``refuse_bad_bytes``); UTF-16/32 files are refused up front."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4)
    wide = next((name for bom, name in _WIDE_BOMS.items() if head.startswith(bom)), None)
    if wide or b"\x00" in head:
        raise data_error("unreadable", f"not UTF-8 text: {wide or 'UTF-16/32'} (NUL bytes or a byte-order "
                     f"mark {head[:2].hex(' ')}); save the file as UTF-8", path=path, line=1)
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape")


def refuse_bad_bytes(text: str, where: "Where") -> None:
    """Raise if ``text`` (read with surrogateescape) holds bytes that are not UTF-8."""
    m = BAD_BYTE.search(text)
    if m:
        raise where.error("unreadable", f"not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02x} at "
                          f"character {m.start()}; save the file as UTF-8)")


def first_char(path: Path) -> str:
    with open_text(path) as f:
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


def iter_json_array(path, *, chunk_size: int = 1 << 20, log_: ProblemLog | None = None
                    ) -> Iterator[tuple[Where, Any]]:
    """Stream the elements of a top-level JSON array without loading the file whole.

    Reads ``chunk_size`` characters at a time and decodes one element at a time with
    ``JSONDecoder.raw_decode``; elements must be separated by exactly one comma, and nothing but
    whitespace may follow the closing ``]`` (a JSONL file whose first line is an array is refused,
    not read as its first line). A final element cut off by end-of-file (e.g. the ShareGPT V3
    file) is skipped with a warning; anything else malformed is a ``DataError``.
    """
    path, log_ = Path(path), log_ or ProblemLog()
    with open_text(path) as f:
        reader = _ArrayReader(path, f, chunk_size, log_)
        yield from reader.elements()


class _ArrayReader:
    """The state of one streamed JSON array: buffer, position, line, record index."""

    def __init__(self, path: Path, f, chunk_size: int, log_: ProblemLog):
        self.path, self.f, self.chunk_size, self.log = path, f, chunk_size, log_
        self.decoder, self.index, self.eof = json.JSONDecoder(), 0, False
        self.buf = f.read(chunk_size)
        self.pos = len(self.buf) - len(self.buf.lstrip())
        if self.buf[self.pos:self.pos + 1] != "[":
            raise data_error("wrong_type", "expected a JSON array", path=path, line=1)
        self.line, self.pos = 1 + self.buf.count("\n", 0, self.pos), self.pos + 1

    def _more(self) -> bool:
        more = self.f.read(self.chunk_size)
        self.eof = not more
        self.buf, self.pos = self.buf[self.pos:] + more, 0
        return bool(more)

    def _next_char(self) -> str:
        """Skip whitespace (reading on as needed); the next character, or '' at end of file."""
        while True:
            start = self.pos
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            self.line += self.buf.count("\n", start, self.pos)
            if self.pos < len(self.buf) or self.eof or not self._more():
                return self.buf[self.pos:self.pos + 1]

    def _fail(self, message: str) -> None:
        self.log.report(data_error("malformed_json", f"malformed JSON: {message}", path=self.path,
                               line=self.line, record=self.index))

    def elements(self) -> Iterator[tuple[Where, Any]]:
        after_value, after_comma = False, False
        while True:
            ch = self._next_char()
            if ch == "]" and not after_comma:
                return self._rest_is_blank()
            if after_value and ch != ",":
                if ch == "":
                    return _truncated(self.path, "", self.index, self.line, self.log)
                return self._fail(f"expected ',' or ']' after record {self.index - 1}, found {ch!r}")
            if ch == ",":
                if not after_value:
                    return self._fail("a comma where a record should be")
                self.pos, after_value, after_comma = self.pos + 1, False, True
                continue
            if ch == "]":
                return self._fail("a comma before ']' (trailing comma)")
            try:
                item = self._decode()
            except DataError as e:  # bytes that are not UTF-8 inside this record: the next may be fine
                self.log.report(e)
                item = ()
            if item is None:
                return
            if item:
                yield item
            after_value, after_comma = True, False

    def _decode(self) -> tuple[Where, Any] | None:
        while True:
            try:
                if self.pos == len(self.buf):
                    raise json.JSONDecodeError("Expecting value", self.buf, self.pos)
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
                break
            except json.JSONDecodeError as e:
                if not self.eof and _cut_off(e, self.buf, margin=16):
                    self._more()
                    continue
                if _cut_off(e, self.buf):
                    _truncated(self.path, self.buf[self.pos:], self.index, self.line, self.log)
                    return None
                self.log.report(data_error("malformed_json", f"malformed JSON: {e.msg}", path=self.path, record=self.index,
                                       line=self.line + self.buf.count("\n", self.pos, e.pos)))
                return None  # no way to find the next element after a broken one
        where = Where(str(self.path), self.index, self.line)
        text = self.buf[self.pos:end]
        self.line += text.count("\n")
        self.log.entries, self.index, self.pos = self.index + 1, self.index + 1, end
        refuse_bad_bytes(text, where)
        return where, obj

    def _rest_is_blank(self) -> None:
        self.pos += 1
        while True:
            rest = self.buf[self.pos:]
            if rest.strip():
                k = len(rest) - len(rest.lstrip())
                self.line += rest.count("\n", 0, k)
                self.log.report(data_error("malformed_json", "text after the closing ']' of the JSON array (is this "
                                       "JSONL whose first line is an array?)", path=self.path, line=self.line))
                return
            self.line += rest.count("\n")
            self.pos = len(self.buf)
            if not self._more():
                return


def _truncated(path: Path, rest: str, index: int, line: int, log_: ProblemLog) -> None:
    """End of file inside the array: skip a cut-off last element with a warning, not an error."""
    if rest.strip():
        log_.skip("truncated final record", Where(str(path), index, line))
        log.warning("%s: last record (record %d, line %d) is truncated; skipped it", path, index, line)
    else:
        log.warning("%s: JSON array is not closed with ']'", path)
