"""Do two artifacts belong together? One comparison of fingerprints, used by every consumer.

Every artifact carries a fingerprint (a feature store's ``meta.json`` settings, a selection's
``config.json``, a checkpoint's adapter and learning rates). A stage that combines artifacts
compares the fingerprints on the keys the combination needs, and refuses a difference with
``IncompatibleError`` naming the key and both sides. The key lists live here, next to the
comparison, so "what must agree" is written once:

- ``PAIRED_STORE_KEYS``: a pool store and a validation store scored together (one checkpoint);
- ``SAME_TRIPLES_KEYS``: two validation stores of one checkpoint combined into one direction
  (``val_sft`` beside ``val_pairwise``, ``val_sft_rejected``).

A key is a dotted path into nested dicts (``projection.seed``); a key absent on both sides agrees.
"""

from __future__ import annotations

import json
from typing import Sequence

from rose_select.errors import IncompatibleError

_ABSENT = object()

# model content, the adapter the features were taken from (by content: the checkpoint pairing),
# the LoRA settings of a fresh adapter, tokenisation and the projection (kind, dim, seed, hash,
# the parameter list it was drawn for)
PAIRED_STORE_KEYS = ("model", "adapter_sha256", "lora", "max_length", "template", "truncation",
                     "projection")
SAME_TRIPLES_KEYS = (*PAIRED_STORE_KEYS, "data_sha256", "data_format", "limit")


def lookup(fingerprint: dict, key: str):
    """The value at a dotted ``key`` (``_ABSENT`` where a part is missing)."""
    value = fingerprint
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def differences(left: dict, right: dict, keys: Sequence[str]) -> list[tuple[str, object, object]]:
    """``[(key, left value, right value)]`` for every key where the two differ; a dict-valued key
    is reported at its first differing sub-key, so the message names the exact setting."""
    out = []
    for key in keys:
        a, b = lookup(left, key), lookup(right, key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = sorted(set(a) | set(b), key=str)
            out += differences(left, right, [f"{key}.{k}" for k in sub])
        else:
            out.append((key, a, b))
    return out


def show(value) -> str:
    """A value for a message: JSON, ``<absent>``, shortened past 100 characters."""
    text = "<absent>" if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 100 else text[:97] + "..."


def require_same(what: str, left: tuple[str, dict], right: tuple[str, dict], keys: Sequence[str],
                 hint: str = "") -> None:
    """Refuse (``IncompatibleError``) when ``left`` and ``right`` (``(name, fingerprint)``) differ
    on any of ``keys``; the message names every differing key and both sides' values."""
    diffs = differences(left[1], right[1], keys)
    if not diffs:
        return
    lines = [f"{key}: {left[0]} has {show(a)}, {right[0]} has {show(b)}" for key, a, b in diffs[:10]]
    raise IncompatibleError(f"{what} do not belong together:\n  " + "\n  ".join(lines)
                            + (f"\n{hint}" if hint else ""))
