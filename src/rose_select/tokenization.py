"""Turn conversations into ``input_ids`` / ``labels`` in the Hugging Face convention.

Labels are -100 on prompt and padding tokens, so the SFT loss and the response log-probability
are taken over exactly the response tokens. Rendering uses the tokenizer's chat template when it
has one and the LESS/open-instruct ``<|user|>``/``<|assistant|>`` format otherwise.

Truncation (documented in the README):
- ``auto`` (default): single-turn examples and preference pairs (prompt + one response) use the
  response-first rule: the response keeps at most ``max_length - min(len(prompt), max_length // 2)``
  tokens from its start, then the prompt is cut from the left to fit (as TRL's DPO truncation
  does), so a long prompt never swallows the whole answer; multi-turn dialogues keep the end
  (the earliest tokens are dropped, keeping the last turns).
- ``keep_start`` / ``keep_end``: plain cuts of the tail / the head, for users who want them.
An example whose response loses every token raises ``DataError`` naming the record; nothing is
dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rose_select.errors import ConfigError, DataError
from rose_select.records import InstructionRecord, Message, PreferenceTriple

IGNORE_INDEX = -100


@dataclass
class TokenizeConfig:
    max_length: int = field(default=512, metadata={"help": "maximum tokens per example"})
    template: str = field(default="auto", metadata={"help": "auto | chat (tokenizer chat template) | less (<|user|>/<|assistant|>)"})
    truncation: str = field(default="auto", metadata={"help": "auto | keep_start | keep_end (auto: response-first for single-turn, keep_end for multi-turn)"})

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")
        if self.template not in ("auto", "chat", "less"):
            raise ConfigError(f"template must be auto|chat|less, got {self.template!r}")
        if self.truncation not in ("auto", "keep_start", "keep_end"):
            raise ConfigError(f"truncation must be auto|keep_start|keep_end, got {self.truncation!r}")


def _use_chat(tokenizer, template: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ConfigError("template='chat' but the tokenizer has no chat template; use template='less'")
    return has if template == "auto" else template == "chat"


def _as_dicts(messages: Sequence[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render_less(messages: Sequence[Message], eos: str, bos: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The open-instruct/LESS format; returns text and the char spans of assistant answers (+ eos)."""
    text, spans = bos, []
    for m in messages:
        if m.role == "assistant":
            text += "<|assistant|>\n"
            start = len(text)
            text += m.content.strip() + eos
            spans.append((start, len(text)))
            text += "\n"
        else:
            text += f"<|{m.role}|>\n{m.content.strip()}\n"
    return text, spans


def render_chat(messages: Sequence[Message], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template; an answer's span is what its turn adds after the generation prompt."""
    dicts = _as_dicts(messages)
    full = tokenizer.apply_chat_template(dicts, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(dicts[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(dicts[: i + 1], tokenize=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ConfigError("the tokenizer's chat template does not render conversations prefix-consistently; "
                              "use template='less'")
        spans.append((len(prefix), len(upto)))
    return full, spans


def render(messages: Sequence[Message], tokenizer, template: str = "auto") -> tuple[str, list[tuple[int, int]]]:
    if _use_chat(tokenizer, template):
        return render_chat(messages, tokenizer)
    return render_less(messages, eos=tokenizer.eos_token or "", bos=tokenizer.bos_token or "")


def tokenize_with_labels(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids, and labels that copy the ids of tokens starting inside an answer span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_length: int, mode: str) -> tuple[list[int], list[int]]:
    if len(ids) <= max_length:
        return ids, labels
    if mode == "keep_start":
        return ids[:max_length], labels[:max_length]
    if mode == "keep_end":
        return ids[-max_length:], labels[-max_length:]
    raise ConfigError(f"unknown truncation mode {mode!r}")


def truncate_pair(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt + one response: cap the response, then cut the prompt from the left."""
    if len(ids) <= max_length:
        return ids, labels
    first = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(ids))
    prompt_ids, resp_ids, resp_labels = ids[:first], ids[first:], labels[first:]
    keep_resp = max_length - min(len(prompt_ids), max_length // 2)
    resp_ids, resp_labels = resp_ids[:keep_resp], resp_labels[:keep_resp]
    keep_prompt = max_length - len(resp_ids)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:] if keep_prompt > 0 else []
    return prompt_ids + resp_ids, [IGNORE_INDEX] * len(prompt_ids) + resp_labels


def encode_messages(messages: Sequence[Message], tokenizer, cfg: TokenizeConfig, *, record: str = "?",
                    pair: bool = False) -> dict:
    """Encode one conversation; raises DataError when truncation leaves no response token."""
    text, spans = render(messages, tokenizer, cfg.template)
    if pair:  # a preference answer: earlier assistant turns belong to the prompt x, not to y
        spans = spans[-1:]
    ids, labels = tokenize_with_labels(text, spans, tokenizer)
    if pair:
        ids, labels = truncate_pair(ids, labels, cfg.max_length)
    else:
        mode = cfg.truncation
        if mode == "auto" and sum(m.role == "assistant" for m in messages) == 1:
            ids, labels = truncate_pair(ids, labels, cfg.max_length)
        else:
            ids, labels = truncate(ids, labels, cfg.max_length, "keep_end" if mode == "auto" else mode)
    n_target = sum(l != IGNORE_INDEX for l in labels)
    if n_target == 0:
        raise DataError(f"no response token left after truncation to max_length={cfg.max_length} "
                        f"({len(text)} chars); raise max_length or shorten the example",
                        record=record, field="messages")
    return {"input_ids": ids, "labels": labels}


def encode_record(rec: InstructionRecord, tokenizer, cfg: TokenizeConfig) -> dict:
    return encode_messages(rec.messages, tokenizer, cfg, record=rec.id)


def encode_triple(t: PreferenceTriple, tokenizer, cfg: TokenizeConfig) -> dict:
    """Chosen and rejected encodings of one triple, both prompt + response with pair truncation."""
    out = {}
    for side in ("chosen", "rejected"):
        msgs = list(t.prompt) + [Message("assistant", getattr(t, side))]
        out[side] = encode_messages(msgs, tokenizer, cfg, record=f"{t.id} ({side})", pair=True)
    return out


def encode_prompt(messages: Sequence[Message], tokenizer, cfg: TokenizeConfig) -> list[int]:
    """Prompt ids ending with the generation prompt, for generation (kept from the end)."""
    if _use_chat(tokenizer, cfg.template):
        text = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False, add_generation_prompt=True)
    else:
        text, _ = render_less(messages, eos=tokenizer.eos_token or "", bos=tokenizer.bos_token or "")
        text += "<|assistant|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-cfg.max_length:]


def collate(examples: Sequence[dict], pad_id: int, padding_side: str = "right"):
    """Pad a list of encodings into tensors: input_ids, attention_mask, labels, position_ids.

    position_ids count real tokens only, so left and right padding give the same logits.
    """
    import torch

    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be left|right, got {padding_side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(e["input_ids"])
        labels[i, sl] = torch.tensor(e.get("labels", e["input_ids"]))
        mask[i, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": position_ids}
