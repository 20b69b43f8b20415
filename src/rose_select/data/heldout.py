"""Held-out split: evaluation pairs from a larger-shot file, minus every prompt used for selection."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rose_select.data.preferences import shot_file_info
from rose_select.errors import DataError
from rose_select.records import PreferenceTriple

# --------------------------------------------------------------------------- held-out split


def prompt_key(triple: PreferenceTriple) -> tuple:
    return tuple((m.role, m.content) for m in triple.prompt)


def heldout_pairs(larger: Sequence[PreferenceTriple], selection: Sequence[PreferenceTriple]) -> list[PreferenceTriple]:
    """Triples of a larger-shot file whose prompt was not used for selection (file order kept)."""
    used = {prompt_key(t) for t in selection}
    return [t for t in larger if prompt_key(t) not in used]


def with_preference(triples: Sequence[PreferenceTriple]) -> list[PreferenceTriple]:
    """The triples whose two answers differ (a pair without a preference has no right order)."""
    return [t for t in triples if t.chosen != t.rejected]


def first_per_subtask(triples: Sequence[PreferenceTriple], n: int | None) -> list[PreferenceTriple]:
    """The first ``n`` triples of each subtask, in file order (all when ``n`` is None or 0)."""
    if not n:
        return list(triples)
    seen: dict[str, int] = {}
    kept = []
    for t in triples:
        seen[t.subtask] = seen.get(t.subtask, 0) + 1
        if seen[t.subtask] <= n:
            kept.append(t)
    return kept


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


