"""A judge behind any OpenAI-compatible chat endpoint (``POST <url>/chat/completions``).

The paper's metric: the model's greedy answer against the golden answer, judged by a strong LM.
``HttpJudge.judge`` asks the endpoint ``JUDGE_PROMPT`` twice, once with the model's answer as A and
once as B, and combines the two verdicts with ``pairwise_outcome`` (1 both prefer the model answer,
0 both prefer golden, 0.5 the orders disagree), which cancels a judge's position bias.

What makes it usable against a paid or shared endpoint:
  - retries with exponential backoff (``Retry-After`` honoured) on 429, 5xx, timeouts and refused
    or dropped connections;
  - a client-side rate limit (``rps``, requests per second);
  - a persistent cache of verdicts (JSON lines), keyed by the endpoint's model name and the exact
    messages sent (conversation, both answers, their order), so a rerun costs no requests;
  - one-line ``JudgeError``s: unreachable, API key refused, malformed reply, retries exhausted.

HTTP is the standard library's ``urllib``: one POST per verdict needs no client library, and the
package gains no dependency. Proxies from the environment apply, except for loopback endpoints.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rose_select.errors import ConfigError, JudgeError
from rose_select.judges import JUDGE_PROMPT, hh_text, pairwise_outcome
from rose_select.records import Message

SYSTEM_PROMPT = "You are an impartial judge. Reply with a single letter, A or B, and nothing else."
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0


# ---------------------------------------------------------------------------- pure helpers

def chat_completions_url(url: str) -> str:
    """``http://host:port/v1`` (an OpenAI client's base URL) or the full ``.../chat/completions`` URL."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"judge_url must be an http(s) URL such as http://127.0.0.1:8080/v1, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_LEADING = re.compile(r"^[^\w]*(?:(?i:response|answer|verdict)[^\w]*)?([AB])(?!\w)")
_NAMED = re.compile(r"\b(?i:response)\s+([AB])(?!\w)")


def parse_verdict(text: str) -> str | None:
    """``"A"`` or ``"B"`` from a judge's reply, or None if it names neither (or both) of them.
    Accepts "A", "B.", "**B**", "Answer: A", "Response B is better", "I prefer Response A"."""
    text = _THINK.sub("", text).strip()
    if text.strip(" .*\"'`").upper() in ("A", "B"):  # the whole reply is the letter ("a" too)
        return text.strip(" .*\"'`").upper()
    m = _LEADING.match(text)
    if m:
        return m.group(1)
    named = set(_NAMED.findall(text))
    return named.pop() if len(named) == 1 else None


def verdict_key(model: str, messages: Sequence[dict]) -> str:
    """Cache key: the endpoint's model name and the exact messages (so prompt, both answers and
    their order, and the judge instructions)."""
    blob = json.dumps({"model": model, "messages": list(messages)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------- cache, rate limit

class VerdictCache:
    """Verdicts as JSON lines ``{"key", "verdict", "model", "reply"}``, appended one per request
    as it is answered (an interrupted run keeps what it paid for; a torn last line is skipped)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, str] = {}
        self._needs_newline = False
        if self.path and self.path.exists():
            raw = self.path.read_text(encoding="utf-8")
            self._needs_newline = bool(raw) and not raw.endswith("\n")
            for line in raw.splitlines():
                try:
                    row = json.loads(line)
                    if row.get("verdict") in ("A", "B"):
                        self.entries[row["key"]] = row["verdict"]
                except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, verdict: str, **extra) -> None:
        self.entries[key] = verdict
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "verdict": verdict, **extra}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(("\n" if self._needs_newline else "") + line)
        self._needs_newline = False


class RateLimiter:
    """At most ``rps`` request starts per second (None or 0: no limit)."""

    def __init__(self, rps: float | None, clock=time.monotonic, sleep=time.sleep):
        self.interval = 1.0 / rps if rps else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


# ---------------------------------------------------------------------------- the judge

class HttpJudge:
    """Pairwise judge behind an OpenAI-compatible chat endpoint; same interface as the local judges
    (``judge(messages, model_answer, golden) -> 1 | 0.5 | 0``)."""

    def __init__(self, url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 cache: str | os.PathLike | None = None, retries: int = 4, backoff: float = 1.0,
                 rps: float | None = None, timeout: float = 60.0, max_tokens: int = 16):
        self.url, self.model = chat_completions_url(url), model
        self.api_key_env = api_key_env or None
        self.api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        self.retries, self.backoff, self.timeout, self.max_tokens = retries, backoff, timeout, max_tokens
        self.cache, self.limiter = VerdictCache(cache), RateLimiter(rps)
        proxies = urllib.request.ProxyHandler({} if is_loopback(self.url) else None)
        self._opener = urllib.request.build_opener(proxies)
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "verdicts": 0}

    def _where(self) -> str:
        return f"judge endpoint {self.url} (model {self.model!r})"

    def messages(self, conversation: Sequence[Message], a: str, b: str) -> list[dict]:
        user = JUDGE_PROMPT.format(conversation=hh_text(conversation).strip(), a=a, b=b)
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def prefers_a(self, conversation: Sequence[Message], a: str, b: str) -> bool:
        msgs = self.messages(conversation, a, b)
        key = verdict_key(self.model, msgs)
        verdict = self.cache.get(key)
        if verdict is not None:
            self.stats["cache_hits"] += 1
            return verdict == "A"
        reply = self._complete(msgs)
        verdict = parse_verdict(reply)
        if verdict is None:
            raise JudgeError(f"{self._where()} returned malformed output: expected A or B, got {_one_line(reply)!r}")
        self.cache.put(key, verdict, model=self.model, reply=reply)
        self.stats["verdicts"] += 1
        return verdict == "A"

    def judge(self, conversation, model_answer: str, golden: str) -> float:
        return pairwise_outcome(self.prefers_a(conversation, model_answer, golden),
                                self.prefers_a(conversation, golden, model_answer))

    # ------------------------------------------------------------------------ HTTP

    def _complete(self, msgs: list[dict]) -> str:
        """The reply text of one chat completion (greedy), with retries on transient failures."""
        body = json.dumps({"model": self.model, "messages": msgs, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        status, payload = self._post_with_retries(body)
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self._where()} returned malformed output (HTTP {status}), not a chat completion: "
                             f"{_one_line(payload.decode('utf-8', 'replace'))!r}") from None
        if not isinstance(content, str):
            raise JudgeError(f"{self._where()} returned malformed output: message content is {content!r}")
        return content

    def _post_with_retries(self, body: bytes) -> tuple[int, bytes]:
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
            self.limiter.wait()
            self.stats["requests"] += 1
            try:
                status, headers, payload = self._post(body)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", None) or e
                timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                problem = (f"no reply within {self.timeout:g} s" if timed_out
                           else f"unreachable ({_one_line(reason)})")
                retry_after = None
            else:
                if status == 200:
                    return status, payload
                if status in (401, 403):
                    raise JudgeError(f"{self._where()} refused the API key (HTTP {status}): {self._key_hint()}")
                if status not in RETRY_STATUSES and status < 500:
                    raise JudgeError(f"{self._where()} answered HTTP {status}: "
                                     f"{_one_line(payload.decode('utf-8', 'replace'))!r}")
                problem = f"HTTP {status}"
                retry_after = _retry_after_seconds(headers.get("Retry-After"))
            if attempt < self.retries:
                time.sleep(retry_after if retry_after is not None else self.backoff * 2 ** attempt)
        tries = self.retries + 1
        raise JudgeError(f"{self._where()} failed after {tries} {'try' if tries == 1 else 'tries'}: {problem}")

    def _post(self, body: bytes):
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            try:
                return e.code, e.headers, e.read()
            finally:
                e.close()

    def _key_hint(self) -> str:
        if not self.api_key_env:
            return "no API key is sent (judge_api_key_env is empty)"
        if self.api_key is None:
            return f"no API key was sent: ${self.api_key_env} is not set"
        return f"check the key in ${self.api_key_env}"


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delta form; an HTTP date falls back to our backoff), capped."""
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None
