"""The internal record types every input format is normalised into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class InstructionRecord:
    """One pool example: a conversation whose assistant turns are the SFT targets."""

    id: str
    source: str  # source dataset name (e.g. "dolly", "sharegpt"), for per-source summaries/quotas
    messages: list[Message]
    raw: dict[str, Any] = field(default_factory=dict)  # the record as read, to write selections back in the pool's format


@dataclass
class PreferenceTriple:
    """One validation/test preference triple (x, y_w, y_l) of a subtask."""

    id: str
    subtask: str
    prompt: list[Message]  # the conversation up to (and excluding) the answer; ends with a user turn
    chosen: str
    rejected: str
    raw: dict[str, Any] = field(default_factory=dict)
