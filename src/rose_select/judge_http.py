"""A judge behind any OpenAI-compatible chat endpoint (``POST <url>/chat/completions``).

The paper's metric: the model's greedy answer against the golden answer, judged by a strong LM.
``HttpJudge.judge`` asks the endpoint twice, once with the model's answer as A and once as B, for a
verdict in the fixed form of its protocol (``verdicts``: a JSON object, or MT-Bench's ``[[A]]``), and
combines the two with ``both_orders_outcome``, which cancels a judge's position bias. A reply that
is not a verdict is re-asked ``reasks`` times with a reminder of the form; then the pair is a
``NoVerdict``, which the caller counts and leaves out of the win rate.

What makes it usable against a paid, shared or small local endpoint:
  - ``response_format`` with the verdict's JSON schema, so a server with grammar support can only
    answer a verdict; ``auto`` tries OpenAI's ``json_schema``, then ``json_object`` with a schema,
    then none, each time a server rejects the field (an error naming it: HTTP 400 or 422, or 500
    from llama-cpp-python's server);
  - retries with exponential backoff (``Retry-After`` honoured) on 429, 5xx, timeouts and refused
    or dropped connections;
  - a client-side rate limit (``rps``, requests per second);
  - a persistent cache of verdicts (JSON lines), keyed by the endpoint's model name and the exact
    messages first sent (conversation, both answers, their order, the protocol's instructions), so a
    rerun asks only what has no verdict yet; a reply that is no verdict is never cached;
  - one-line ``JudgeError``s: unreachable, API key refused, a request the server rejects, a reply
    that is not a chat completion, retries exhausted.

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

from rose_select import verdicts
from rose_select.errors import ConfigError, JudgeError
from rose_select.judges import hh_text
from rose_select.records import Message
from rose_select.verdicts import NoVerdict

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


def verdict_key(model: str, messages: Sequence[dict]) -> str:
    """Cache key: the endpoint's model name and the exact messages (so prompt, both answers and
    their order, and the judge instructions)."""
    blob = json.dumps({"model": model, "messages": list(messages)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def one_line(text: str, limit: int = 160) -> str:
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
                    if row.get("verdict") in verdicts.LABELS:
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

class RejectedRequest(JudgeError):
    """The endpoint refused the request itself: a 4xx other than 401/403/429, or an error that
    names the ``response_format`` sent."""

    def __init__(self, message: str, body: str):
        super().__init__(message)
        self.body = body


class HttpJudge:
    """Pairwise judge behind an OpenAI-compatible chat endpoint; same interface as the local judges
    (``judge(messages, model_answer, golden) -> 1 | 0.5 | 0``), plus ``NoVerdict`` for a pair the
    endpoint gave no verdict for."""

    def __init__(self, url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 cache: str | os.PathLike | None = None, retries: int = 4, backoff: float = 1.0,
                 rps: float | None = None, timeout: float = 60.0, protocol: str = "json",
                 response_format: str = "auto", reasks: int = 2, max_tokens: int | None = None):
        self.url, self.model, self.protocol, self.reasks = chat_completions_url(url), model, protocol, reasks
        self.api_key_env = api_key_env or None
        self.api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.max_tokens = max_tokens or verdicts.DEFAULT_MAX_TOKENS[protocol]
        self.formats = verdicts.response_formats(protocol, response_format)
        self.cache, self.limiter = VerdictCache(cache), RateLimiter(rps)
        proxies = urllib.request.ProxyHandler({} if is_loopback(self.url) else None)
        self._opener = urllib.request.build_opener(proxies)
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "verdicts": 0, "not_verdicts": 0, "reasks": 0}

    def where(self) -> str:
        return f"judge endpoint {self.url} (model {self.model!r})"

    @property
    def response_format(self) -> str:
        """The ``response_format`` sent now (``none`` once the server rejected the others)."""
        return self.formats[0]

    def messages(self, conversation: Sequence[Message], a: str, b: str) -> list[dict]:
        user = verdicts.user_prompt(self.protocol, hh_text(conversation).strip(), a, b)
        return [{"role": "system", "content": verdicts.SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def verdict(self, conversation: Sequence[Message], a: str, b: str) -> str | NoVerdict:
        """The verdict (A, B or C) on the pair in this order, from the cache or the endpoint."""
        msgs = self.messages(conversation, a, b)
        key = verdict_key(self.model, msgs)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            return cached
        reply = self._complete(msgs)
        verdict = verdicts.parse(self.protocol, reply)
        for _ in range(self.reasks if verdict is None else 0):
            self.stats["not_verdicts"] += 1
            self.stats["reasks"] += 1
            reply = self._complete(self.reask_messages(msgs, reply))
            verdict = verdicts.parse(self.protocol, reply)
            if verdict is not None:
                break
        if verdict is None:
            self.stats["not_verdicts"] += 1
            return NoVerdict(reply)
        self.cache.put(key, verdict, model=self.model, reply=reply)
        self.stats["verdicts"] += 1
        return verdict

    def reask_messages(self, msgs: list[dict], reply: str) -> list[dict]:
        """The question again, with the reply that was no verdict and a reminder of the form."""
        return [*msgs, {"role": "assistant", "content": reply},
                {"role": "user", "content": verdicts.REMINDERS[self.protocol]}]

    def judge(self, conversation, model_answer: str, golden: str) -> float | NoVerdict:
        """Both orders; a pair with no verdict in either order is a ``NoVerdict`` (never a guess)."""
        first = self.verdict(conversation, model_answer, golden)
        second = self.verdict(conversation, golden, model_answer)
        missing = [v for v in (first, second) if isinstance(v, NoVerdict)]
        return missing[0] if missing else verdicts.both_orders_outcome(first, second)

    # ------------------------------------------------------------------------ HTTP

    def _complete(self, msgs: list[dict]) -> str:
        """The reply text of one chat completion (greedy), with retries on transient failures and
        the next ``response_format`` when the server rejects the one sent."""
        while True:
            body = {"model": self.model, "messages": msgs, "temperature": 0, "max_tokens": self.max_tokens}
            if verdicts.RESPONSE_FORMATS[self.response_format] is not None:
                body["response_format"] = verdicts.RESPONSE_FORMATS[self.response_format]
            try:
                status, payload = self._post_with_retries(json.dumps(body).encode(), "response_format" in body)
                return self._content(status, payload)
            except RejectedRequest as e:
                if len(self.formats) == 1 or not _names_response_format(e.body):
                    raise
                self.formats.pop(0)

    def _content(self, status: int, payload: bytes) -> str:
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.where()} returned malformed output (HTTP {status}), not a chat completion: "
                             f"{one_line(payload.decode('utf-8', 'replace'))!r}") from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.where()} returned malformed output: message content is {content!r}")
        return content

    def _post_with_retries(self, body: bytes, has_format: bool = False) -> tuple[int, bytes]:
        """(status, payload) of a 200; a 4xx, or with ``has_format`` any error naming the
        ``response_format`` (llama-cpp-python's server answers that with HTTP 500), is a
        ``RejectedRequest`` at once; 429, 5xx and network failures are retried."""
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
                           else f"unreachable ({one_line(reason)})")
                retry_after = None
            else:
                if status == 200:
                    return status, payload
                if status in (401, 403):
                    raise JudgeError(f"{self.where()} refused the API key (HTTP {status}): {self._key_hint()}")
                text = payload.decode("utf-8", "replace")
                if (status not in RETRY_STATUSES and status < 500) or (has_format and _names_response_format(text)):
                    raise RejectedRequest(f"{self.where()} answered HTTP {status}: {one_line(text)!r}", text)
                problem = f"HTTP {status}"
                retry_after = _retry_after_seconds(headers.get("Retry-After"))
            if attempt < self.retries:
                time.sleep(retry_after if retry_after is not None else self.backoff * 2 ** attempt)
        tries = self.retries + 1
        raise JudgeError(f"{self.where()} failed after {tries} {'try' if tries == 1 else 'tries'}: {problem}")

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


def _names_response_format(body: str) -> bool:
    """Whether a rejection is about ``response_format`` (then the next one is tried), not, say,
    a prompt longer than the judge's context."""
    return bool(re.search(r"response_format|json_schema|json_object", body, re.IGNORECASE))


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delta form; an HTTP date falls back to our backoff), capped."""
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None
