"""``rose data validate``: every problem of a file, counted per kind, in one report."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rose_select.data.pools import read_pool
from rose_select.data.preferences import read_preferences
from rose_select.data.reading import (
    DATASETS_SUFFIXES,
    first_char,
    iter_records,
    ProblemLog,
    open_text,
)
from rose_select.data.rawtext import some_names
from rose_select.errors import DataError

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
    skipped_at: dict[str, list[str]] = field(default_factory=dict)  # why -> records skipped
    kept_at: dict[str, list[str]] = field(default_factory=dict)  # why -> records kept, but unusual

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
            lines += [f"  - {why}: {some_names(at)}" for why, at in sorted(self.skipped_at.items())]
        for why, at in sorted(self.kept_at.items()):
            lines.append(f"warning: {len(at)} record(s) kept, but {why}: {some_names(at)}")
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
        if path.is_file() and path.suffix.lower() not in DATASETS_SUFFIXES and first_char(path) == "{":
            with open_text(path) as f:
                first = f.readline()
            try:
                rec = json.loads(first)
            except json.JSONDecodeError:
                return "preference"  # a multi-line object: the ROSE layout
        else:
            rec = next(iter(iter_records(path, ProblemLog(collect=True))), (None, {}))[1]
    except (DataError, UnicodeDecodeError):
        return "pool"  # the pool reader will report what is wrong with it
    return "preference" if isinstance(rec, dict) and {"chosen", "rejected"} <= set(rec) else "pool"


def validate_file(path, kind: str = "auto", **loader_kwargs) -> ValidationReport:
    """Check a pool or preference file, collecting every problem instead of stopping at the first."""
    kind = _guess_kind(path) if kind == "auto" else kind
    if kind not in ("pool", "preference"):
        raise DataError(f"kind must be auto, pool or preference, got {kind!r}", field="kind")
    log_ = ProblemLog(collect=True)
    reader = read_pool if kind == "pool" else read_preferences
    try:
        records = reader(path, log_, **loader_kwargs)
    except DataError as e:  # the file itself (missing, not JSON at all) is the problem
        log_.errors.append(e)
        records = []
    if not records and not log_.errors:
        log_.errors.append(log_.no_records(path))
    subtasks = dict(Counter(t.subtask for t in records)) if kind == "preference" else None
    return ValidationReport(path=str(path), kind=kind, file_format=log_.format, records=log_.entries,
                            valid=len(records), problems=log_.errors, subtask_counts=subtasks,
                            problem_counts=dict(Counter(getattr(e, "kind", "other") for e in log_.errors)),
                            skipped=dict(log_.skipped), skipped_at=log_.skipped_at, kept_at=log_.kept_at)


