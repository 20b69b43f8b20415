"""The endpoint judge against a real HTTP server on 127.0.0.1 (stdlib http.server in a thread):
both orders, retries, rate limit, verdict cache, one-line errors, and `rose evaluate --judge-url`."""

from __future__ import annotations

import itertools
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rose_select.errors import ConfigError, JudgeError
from rose_select.evaluation import EvalConfig, run_evaluate
from rose_select.judge_http import (
    HttpJudge,
    RateLimiter,
    VerdictCache,
    chat_completions_url,
    parse_verdict,
    verdict_key,
)
from rose_select.records import Message
from rose_select.tokenization import TokenizeConfig

_PAIR = re.compile(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nWhich response", re.DOTALL)


class JudgeServer:
    """A deterministic OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``mode``: "longer" answers the letter of the longer response (A on a tie), "first" always A
    (a judge with pure position bias). ``fail``: statuses to answer, in order, before any success
    (``fail_forever``: answer this status every time). ``api_key``: required Bearer token.
    ``reply`` / ``raw_body``: a fixed message content / response body (malformed output).
    ``delay``: seconds to wait before answering.
    ``requests``: (arrival time, headers, parsed body) of every request, failures included."""

    def __init__(self):
        self.mode, self.fail, self.fail_forever, self.retry_after = "longer", [], None, "0"
        self.api_key, self.reply, self.raw_body, self.delay = None, None, None, 0.0
        self.requests, self.lock = [], threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def count(self) -> int:
        return len(self.requests)

    def verdict(self, body: dict) -> str:
        a, b = _PAIR.search(body["messages"][-1]["content"]).groups()
        return "A" if self.mode == "first" or len(a) >= len(b) else "B"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: bytes, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((time.monotonic(), dict(self.headers), body))
                    status = server.fail.pop(0) if server.fail else server.fail_forever
                time.sleep(server.delay)
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, b'{"error": {"message": "invalid api key"}}')
                if status:
                    return self._send(status, b'{"error": "try later"}', [("Retry-After", server.retry_after)])
                if server.raw_body is not None:
                    return self._send(200, server.raw_body)
                content = server.reply if server.reply is not None else server.verdict(body)
                self._send(200, json.dumps({"object": "chat.completion", "model": body["model"], "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode())

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def convo(q="How do I bake bread?"):
    return [Message("user", q)]


def make_judge(server, tmp_path=None, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("api_key_env", "ROSE_TEST_JUDGE_KEY")
    return HttpJudge(server.url, kw.pop("model", "judge-m"), cache=tmp_path / "cache.jsonl" if tmp_path else None, **kw)


# ---------------------------------------------------------------------------- pure helpers

@pytest.mark.parametrize("text,verdict", [
    ("A", "A"), ("B", "B"), (" B.", "B"), ("**A**", "A"), ("Answer: B", "B"), ("Response A is better", "A"),
    ("I prefer Response B.", "B"), ("<think>A or B? B</think>A", "A"), ("b", "B"),
    ("Both are fine", None), ("As an AI, I cannot", None), ("Response B is better than Response A", "B"),
    ("Between Response A and Response B, hard to say", None), ("", None)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_chat_completions_url():
    assert chat_completions_url("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1/chat/completions"
    assert chat_completions_url("http://127.0.0.1:8080/v1/") == "http://127.0.0.1:8080/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    with pytest.raises(ConfigError, match="http"):
        chat_completions_url("127.0.0.1:8080")


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "k1", "verdict": "A"}) + "\n" + '{"key": "k2", "verd')
    cache = VerdictCache(path)
    assert cache.get("k1") == "A" and cache.get("k2") is None
    cache.put("k3", "B")
    again = VerdictCache(path)
    assert again.get("k1") == "A" and again.get("k3") == "B"


def test_config_checks():
    EvalConfig(judge="m", judge_url="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="judge_url needs judge"):
        EvalConfig(judge_url="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="needs judge_url"):
        EvalConfig(judge="m", judge_kind="http")
    with pytest.raises(ConfigError, match="judge_kind must be auto or http"):
        EvalConfig(judge="m", judge_kind="reward", judge_url="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="http"):
        EvalConfig(judge="m", judge_url="ftp://127.0.0.1/v1")
    with pytest.raises(ConfigError, match="judge_rps"):
        EvalConfig(judge="m", judge_url="http://127.0.0.1:1/v1", judge_rps=0)


# ---------------------------------------------------------------------------- against the server

def test_both_orders_cancel_position_bias(server):
    judge = make_judge(server)
    long, short = "Mix flour, water, salt and yeast; knead; let it rise; bake at 230 C.", "Bake it."
    assert judge.judge(convo(), long, short) == 1.0  # the longer answer wins in both orders
    assert judge.judge(convo(), short, long) == 0.0
    bodies = [b for _, _, b in server.requests]
    assert [_PAIR.search(b["messages"][-1]["content"]).groups() for b in bodies[:2]] == [(long, short), (short, long)]
    assert all(b["model"] == "judge-m" and b["temperature"] == 0 for b in bodies)
    server.mode = "first"  # a judge that always says A: each order votes for a different answer
    assert judge.judge(convo("Other?"), long, short) == 0.5
    assert judge.judge(convo("Other?"), short, long) == 0.5
    # judge(x, short, long) asks the same two questions as judge(x, long, short): cached
    assert server.count == 4 and judge.stats == {"requests": 4, "retries": 0, "cache_hits": 4, "verdicts": 4}


def test_retries_on_429_and_5xx_then_succeeds(server):
    server.fail = [429, 500, 503]
    judge = make_judge(server, retries=4)
    assert judge.prefers_a(convo(), "a longer answer", "short") is True
    assert server.count == 4 and judge.stats == {"requests": 4, "retries": 3, "cache_hits": 0, "verdicts": 1}


def test_retry_after_is_honoured(server):
    server.fail, server.retry_after = [429], "0.3"
    judge = make_judge(server, backoff=0.0)
    judge.prefers_a(convo(), "x", "y")
    (t0, *_), (t1, *_) = server.requests
    assert t1 - t0 >= 0.29


def test_retries_exhausted_is_one_line_error(server):
    server.fail_forever = 503
    judge = make_judge(server, retries=2)
    with pytest.raises(JudgeError, match=r"judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions "
                                         r"\(model 'judge-m'\) failed after 3 tries: HTTP 503") as e:
        judge.prefers_a(convo(), "x", "y")
    assert server.count == 3 and "\n" not in str(e.value)


def test_unreachable_endpoint(tmp_path, tiny_model_dir, capsys):
    from rose_select.cli import main

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HttpJudge(f"http://127.0.0.1:{port}/v1", "judge-m", retries=1, backoff=0.01, cache=tmp_path / "c.jsonl")
    with pytest.raises(JudgeError, match=r"failed after 2 tries: unreachable \(.*[Cc]onnection refused") as e:
        judge.judge(convo(), "x", "y")
    assert "\n" not in str(e.value) and not (tmp_path / "c.jsonl").exists()
    tests = tmp_path / "shp_x.json"
    tests.write_text(json.dumps([{"prompt": "\n\nHuman: Hi\n\nAssistant:", "golden_answer": "Hello."}]))
    code = main(["evaluate", "--model", str(tiny_model_dir), "--test-prompts", str(tests), "--judge", "judge-m",
                 "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-retries", "0", "--max-new-tokens", "2",
                 "--device", "cpu", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: the model loader's progress bar)
    assert code == 2
    assert re.fullmatch(rf"rose evaluate: error: judge endpoint http://127\.0\.0\.1:{port}/v1/chat/completions "
                        r"\(model 'judge-m'\) failed after 1 try: unreachable \(.*\)", err)


def test_slow_endpoint_times_out(server):
    server.delay = 0.5
    judge = make_judge(server, retries=1, timeout=0.1)
    with pytest.raises(JudgeError, match=r"failed after 2 tries: no reply within 0\.1 s"):
        judge.prefers_a(convo(), "x", "y")
    assert server.count == 2


def test_api_key_from_environment(server, monkeypatch):
    server.api_key = "sekret-123"
    monkeypatch.delenv("ROSE_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match=r"refused the API key \(HTTP 401\).*\$ROSE_TEST_JUDGE_KEY is not set"):
        make_judge(server).prefers_a(convo(), "x", "y")
    assert server.count == 1  # no retries on an auth failure
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "wrong-key")
    with pytest.raises(JudgeError, match=r"check the key in \$ROSE_TEST_JUDGE_KEY") as e:
        make_judge(server).prefers_a(convo(), "x", "y")
    assert "wrong-key" not in str(e.value)
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "sekret-123")
    assert make_judge(server).prefers_a(convo(), "xx", "y") is True
    assert server.requests[-1][1]["Authorization"] == "Bearer sekret-123"


@pytest.mark.parametrize("reply,raw_body,match", [
    ("I cannot decide between them.", None, "expected A or B, got 'I cannot decide between them.'"),
    (None, b"<html>gateway</html>", "not a chat completion: '<html>gateway</html>'"),
    (None, b'{"choices": []}', "not a chat completion"),
])
def test_malformed_output_is_an_error_and_not_cached(server, tmp_path, reply, raw_body, match):
    server.reply, server.raw_body = reply, raw_body
    judge = make_judge(server, tmp_path)
    with pytest.raises(JudgeError, match=f"returned malformed output.*{re.escape(match)}") as e:
        judge.prefers_a(convo(), "x", "y")
    assert "\n" not in str(e.value) and server.count == 1
    assert VerdictCache(tmp_path / "cache.jsonl").entries == {}


def test_rate_limiter_spaces_request_starts():
    """Request starts are 1/rps apart, whatever the replies' delays (a fake clock: exact)."""
    now = [0.0]
    starts = []
    limiter = RateLimiter(10, clock=lambda: now[0], sleep=lambda dt: now.__setitem__(0, now[0] + dt))
    for reply_delay in (0.0, 0.03, 0.25, 0.0):
        limiter.wait()
        starts.append(now[0])
        now[0] += reply_delay
    assert [round(b - a, 9) for a, b in itertools.pairwise(starts)] == [0.1, 0.1, 0.25]


def test_rate_limit_spaces_requests(server):
    judge = make_judge(server, rps=10)
    for i in range(5):
        judge.prefers_a(convo(), "x" * i, "y")
    times = [t for t, *_ in server.requests]
    # request k+1 leaves after reply k, so the server sees starts 2..5 at least 3 intervals apart
    # even when a loaded machine delays it (spacing of single pairs is timing-noisy there)
    assert len(times) == 5 and times[-1] - times[0] >= 0.29


def test_cache_keyed_by_model_and_order(server, tmp_path):
    judge = make_judge(server, tmp_path)
    judge.judge(convo(), "long answer", "short")
    assert server.count == 2
    again = make_judge(server, tmp_path)  # a new process reading the same cache file
    assert again.judge(convo(), "long answer", "short") == 1.0
    assert server.count == 2 and again.stats["cache_hits"] == 2
    make_judge(server, tmp_path, model="other-judge").judge(convo(), "long answer", "short")
    assert server.count == 4  # another model: asked again
    rows = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["model"] for r in rows} == {"judge-m", "other-judge"}
    msgs = judge.messages(convo(), "long answer", "short")
    assert verdict_key("judge-m", msgs) in {r["key"] for r in rows}
    assert verdict_key("judge-m", msgs) != verdict_key("judge-m", judge.messages(convo(), "short", "long answer"))


def test_rose_evaluate_with_endpoint_judge_and_free_rerun(tiny_model_dir, server, tmp_path):
    from rose_select.cli import main

    tests = tmp_path / "test" / "shp"
    tests.mkdir(parents=True)
    rows = [{"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:", "golden_answer": "Bake."},
            {"prompt": "\n\nHuman: Capital of France?\n\nAssistant:", "golden_answer": "Paris " * 200},
            {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:",
             "golden_answer": "A"}]
    (tests / "shp_askculinary.json").write_text(json.dumps(rows))
    cache = tmp_path / "verdicts.jsonl"
    flags = ["--model", str(tiny_model_dir), "--test-prompts", str(tests), "--judge", "judge-m",
             "--judge-url", server.url, "--judge-cache", str(cache), "--judge-backoff", "0.01",
             "--max-new-tokens", "6", "--tokenize.max-length", "64", "--device", "cpu"]
    assert main(["evaluate", *flags, "--output", str(tmp_path / "e1")]) == 0
    m1 = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    gens = [json.loads(line) for line in (tmp_path / "e1" / "generations.jsonl").read_text().splitlines()]
    expected = [1.0 if len(g["answer"]) > len(g["golden"]) else 0.0 if len(g["answer"]) < len(g["golden"]) else 0.5
                for g in gens]
    assert [g["win"] for g in gens] == expected and expected[1] == 0.0
    assert m1["overall"]["judge/win_rate"] == pytest.approx(sum(expected) / 3)
    assert server.count == 6 and m1["judge_usage"]["requests"] == 6

    assert main(["evaluate", *flags, "--output", str(tmp_path / "e2")]) == 0  # the rerun costs no requests
    m2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert server.count == 6 and m2["judge_usage"] == {"requests": 0, "retries": 0, "cache_hits": 6, "verdicts": 0}
    assert m2["overall"] == m1["overall"]

    # without --judge-cache the cache lives in the output dir: a rerun into it is free as well
    cfg = EvalConfig(model=str(tiny_model_dir), test_prompts=str(tests), judge="judge-m", judge_url=server.url,
                     max_new_tokens=6, tokenize=TokenizeConfig(max_length=64), device="cpu", output=str(tmp_path / "e3"))
    run_evaluate(cfg)
    assert server.count == 12 and (tmp_path / "e3" / "judge_cache.jsonl").exists()
    run_evaluate(cfg)
    assert server.count == 12
