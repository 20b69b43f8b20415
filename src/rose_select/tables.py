"""The one markdown table writer of reports, summaries and experiments."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence


def cell(value) -> str:
    """A table cell: floats to 4 decimals, None empty, anything else as text."""
    return "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def markdown(rows: Sequence[Mapping], cols: Sequence[str] | None = None, *,
             fmt: Callable[[object], str] = cell, right: Sequence[str] = ()) -> str:
    """Rows of dicts as a markdown table; columns ``cols`` or every key in order of appearance.
    Columns named in ``right`` are right-aligned (numbers)."""
    cols = list(cols or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "".join("---:|" if c in right else "---|" for c in cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])
