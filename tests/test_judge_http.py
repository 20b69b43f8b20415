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
from rose_select import verdicts
from rose_select.judge_http import HttpJudge, RateLimiter, VerdictCache, chat_completions_url, verdict_key
from rose_select.records import Message
from rose_select.tokenization import TokenizeConfig

_PAIR = re.compile(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nWhich response", re.DOTALL)


class JudgeServer:
    """A deterministic OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``mode``: "longer" answers the letter of the longer response (A on a tie), "first" always A
    (a judge with pure position bias). ``fail``: statuses to answer, in order, before any success
    (``fail_forever``: answer this status every time). ``api_key``: required Bearer token.
    ``reply`` / ``raw_body``: a fixed message content / response body (malformed output);
    ``no_verdict_on``: a text that makes every question containing it get ``ASKS_BACK``;
    ``replies``: message contents to answer first, in order. The verdict is written in the form the
    prompt asks for (a JSON object, or "... [[A]]"). ``reject_formats``: ``response_format`` types
    answered with ``reject_status`` and a message naming the field (as llama-cpp-python's server
    answers ``json_schema``). ``delay``: seconds to wait before answering.
    ``requests``: (arrival time, headers, parsed body) of every request, failures included."""

    def __init__(self):
        self.mode, self.fail, self.fail_forever, self.retry_after = "longer", [], None, "0"
        self.api_key, self.reply, self.replies, self.raw_body, self.delay = None, None, [], None, 0.0
        self.reject_formats, self.reject_status, self.no_verdict_on = set(), 422, None
        self.requests, self.lock = [], threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def count(self) -> int:
        return len(self.requests)

    def verdict(self, body: dict) -> str:
        question = body["messages"][1]["content"]
        a, b = _PAIR.search(question).groups()
        label = "A" if self.mode == "first" or len(a) >= len(b) else "B"
        return f"Response {label} is more complete. [[{label}]]" if "[[A]]" in question else json.dumps({"verdict": label})

    def content(self, body: dict) -> str:
        with self.lock:
            if self.replies:
                return self.replies.pop(0)
        if self.no_verdict_on and self.no_verdict_on in body["messages"][1]["content"]:
            return ASKS_BACK
        return self.reply if self.reply is not None else self.verdict(body)

    @property
    def bodies(self) -> list[dict]:
        return [b for _, _, b in self.requests]

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
                if (body.get("response_format") or {}).get("type") in server.reject_formats:
                    return self._send(server.reject_status, json.dumps({"detail": [{
                        "loc": ["body", "response_format", "type"], "msg": "Input should be 'text' or 'json_object'"}]}).encode())
                if server.raw_body is not None:
                    return self._send(200, server.raw_body)
                content = server.content(body)
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


USAGE = {"requests": 0, "retries": 0, "cache_hits": 0, "verdicts": 0, "not_verdicts": 0, "reasks": 0}


def convo(q="How do I bake bread?"):
    return [Message("user", q)]


def make_judge(server, tmp_path=None, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("api_key_env", "ROSE_TEST_JUDGE_KEY")
    return HttpJudge(server.url, kw.pop("model", "judge-m"), cache=tmp_path / "cache.jsonl" if tmp_path else None, **kw)


# ---------------------------------------------------------------------------- pure helpers

# the two replies SmolLM2-135M gave as a judge behind llama-cpp-python's server (issue 25): an answer
# of its own that a lenient reader took for the verdict A, and the question asked back
ANSWERS_ITSELF = ("Response A:\nThe terminal window needs to remain open while the command runs, otherwise "
                  "the process it started is killed along with it.")
ASKS_BACK = "Which response is more helpful, honest and harmless?"


@pytest.mark.parametrize("reply,verdict", [
    ('{"verdict": "A"}', "A"), (' {"verdict":"B"}\n', "B"), ('{"verdict": "C"}', "C"),
    ('```json\n{"verdict": "B"}\n```', "B"), ('<think>A is vague; B gives steps.</think>\n{"verdict": "B"}', "B"),
    ('{"verdict": "A", "reason": "it answers the question"}', "A"),
    (ANSWERS_ITSELF, None), (ASKS_BACK, None), ("A", None), ("**B**", None), ("Answer: B", None),
    ("Response A is better.", None), ('Response B is better. {"verdict": "B"}', None),
    ('{"verdict": "B"} because it is longer', None), ('{"verdict": "a"}', None), ('{"verdict": "D"}', None),
    ('{"verdict": ["A"]}', None), ('["A"]', None), ('{"verdict": "A"', None), ('{"verdict": "A", "verdict": "B"}', None),
    ('{"winner": "A"}', None), ("[[A]]", None), ("", None)])
def test_json_protocol_reads_only_the_verdict_object(reply, verdict):
    assert verdicts.parse("json", reply) == verdict


@pytest.mark.parametrize("reply,verdict", [
    ("[[A]]", "A"), ("Response B lists the steps and warns about the heat; A does not. [[B]]", "B"),
    ("Both are equally vague. [[C]]", "C"), ("A is better: [[A]]. Final verdict: [[A]]", "A"),
    ("<think>Is it [[A]] or [[B]]?</think>Response B. [[B]]", "B"),
    (ANSWERS_ITSELF, None), (ASKS_BACK, None), ("A", None), ("Response A is better.", None), ("[A]", None),
    ("[[A]] or [[B]]", None), ("[[D]]", None), ("[[A]] [[D]]", None), ('{"verdict": "A"}', None), ("", None)])
def test_brackets_protocol_reads_one_label(reply, verdict):
    assert verdicts.parse("brackets", reply) == verdict


def test_both_orders_outcome():
    assert verdicts.both_orders_outcome("A", "B") == 1.0 and verdicts.both_orders_outcome("B", "A") == 0.0
    assert verdicts.both_orders_outcome("A", "A") == 0.5 == verdicts.both_orders_outcome("B", "B")
    assert verdicts.both_orders_outcome("C", "C") == 0.5 and verdicts.both_orders_outcome("A", "C") == 0.75


def test_the_prompt_asks_for_the_fixed_form():
    for protocol, form in (("json", '{"verdict": "A"}'), ("brackets", '"[[A]]"')):
        prompt = verdicts.user_prompt(protocol, "Human: Hi", "Hello!", "Hey.")
        assert form in prompt and "Response A:\nHello!\n\nResponse B:\nHey." in prompt
        assert verdicts.parse(protocol, form.strip('"')) == "A"  # the form shown is one the parser reads


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
    for bad, match in ((dict(judge_protocol="letter"), "judge_protocol must be json|brackets, got 'letter'"),
                       (dict(judge_response_format="grammar"), "judge_response_format must be auto"),
                       (dict(judge_reasks=-1), "judge_reasks"), (dict(judge_max_tokens=0), "judge_max_tokens"),
                       (dict(judge_max_invalid_share=1.5), r"judge_max_invalid_share must be in \[0, 1\]")):
        with pytest.raises(ConfigError, match=match):
            EvalConfig(judge="m", judge_url="http://127.0.0.1:1/v1", **bad)


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
    assert server.count == 4 and judge.stats == dict(USAGE, requests=4, cache_hits=4, verdicts=4)
    assert all(b["response_format"] == verdicts.RESPONSE_FORMATS["json_schema"] for b in bodies)


def test_retries_on_429_and_5xx_then_succeeds(server):
    server.fail = [429, 500, 503]
    judge = make_judge(server, retries=4)
    assert judge.verdict(convo(), "a longer answer", "short") == "A"
    assert server.count == 4 and judge.stats == dict(USAGE, requests=4, retries=3, verdicts=1)


def test_retry_after_is_honoured(server):
    server.fail, server.retry_after = [429], "0.3"
    judge = make_judge(server, backoff=0.0)
    judge.verdict(convo(), "x", "y")
    (t0, *_), (t1, *_) = server.requests
    assert t1 - t0 >= 0.29


def test_retries_exhausted_is_one_line_error(server):
    server.fail_forever = 503
    judge = make_judge(server, retries=2)
    with pytest.raises(JudgeError, match=r"judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions "
                                         r"\(model 'judge-m'\) failed after 3 tries: HTTP 503") as e:
        judge.verdict(convo(), "x", "y")
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
        judge.verdict(convo(), "x", "y")
    assert server.count == 2


def test_api_key_from_environment(server, monkeypatch):
    server.api_key = "sekret-123"
    monkeypatch.delenv("ROSE_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match=r"refused the API key \(HTTP 401\).*\$ROSE_TEST_JUDGE_KEY is not set"):
        make_judge(server).verdict(convo(), "x", "y")
    assert server.count == 1  # no retries on an auth failure
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "wrong-key")
    with pytest.raises(JudgeError, match=r"check the key in \$ROSE_TEST_JUDGE_KEY") as e:
        make_judge(server).verdict(convo(), "x", "y")
    assert "wrong-key" not in str(e.value)
    monkeypatch.setenv("ROSE_TEST_JUDGE_KEY", "sekret-123")
    assert make_judge(server).verdict(convo(), "xx", "y") == "A"
    assert server.requests[-1][1]["Authorization"] == "Bearer sekret-123"


@pytest.mark.parametrize("raw_body,match", [
    (b"<html>gateway</html>", "not a chat completion: '<html>gateway</html>'"),
    (b'{"choices": []}', "not a chat completion"),
])
def test_a_reply_that_is_not_a_chat_completion_is_an_error(server, tmp_path, raw_body, match):
    server.raw_body = raw_body
    judge = make_judge(server, tmp_path)
    with pytest.raises(JudgeError, match=f"returned malformed output.*{re.escape(match)}") as e:
        judge.verdict(convo(), "x", "y")
    assert "\n" not in str(e.value) and server.count == 1
    assert VerdictCache(tmp_path / "cache.jsonl").entries == {}


def test_a_reply_that_is_no_verdict_is_reasked_with_a_reminder(server, tmp_path):
    server.replies = [ANSWERS_ITSELF, ASKS_BACK]  # then the verdict object
    judge = make_judge(server, tmp_path, reasks=2)
    assert judge.verdict(convo(), "a longer answer", "short") == "A"
    first, second, third = server.bodies
    assert second["messages"] == first["messages"] + [
        {"role": "assistant", "content": ANSWERS_ITSELF}, {"role": "user", "content": verdicts.REMINDERS["json"]}]
    assert third["messages"][-2]["content"] == ASKS_BACK
    assert judge.stats == dict(USAGE, requests=3, verdicts=1, not_verdicts=2, reasks=2)
    # cached under the question first asked: another process asks nothing
    assert make_judge(server, tmp_path).verdict(convo(), "a longer answer", "short") == "A" and server.count == 3


def test_no_verdict_after_the_reasks_is_counted_never_guessed_nor_cached(server, tmp_path):
    server.reply = ANSWERS_ITSELF  # a lenient reader took this for "A"
    judge = make_judge(server, tmp_path, reasks=1)
    outcome = judge.judge(convo(), "x", "y")
    assert outcome == verdicts.NoVerdict(ANSWERS_ITSELF)
    assert server.count == 4 and judge.stats == dict(USAGE, requests=4, not_verdicts=4, reasks=2)
    assert VerdictCache(tmp_path / "cache.jsonl").entries == {} and not (tmp_path / "cache.jsonl").exists()
    server.reply = None  # a rerun asks again, and now gets verdicts
    assert make_judge(server, tmp_path).judge(convo(), "x", "y") == 0.5 and server.count == 6


def test_one_order_without_verdict_makes_the_pair_invalid(server):
    server.replies = ['{"verdict": "A"}', ASKS_BACK]
    assert make_judge(server, reasks=0).judge(convo(), "x", "y") == verdicts.NoVerdict(ASKS_BACK)


def test_brackets_protocol_end_to_end(server):
    judge = make_judge(server, protocol="brackets")
    assert judge.judge(convo(), "a longer answer", "short") == 1.0
    assert all("[[C]]" in b["messages"][1]["content"] and "response_format" not in b and b["max_tokens"] == 512
               for b in server.bodies)


@pytest.mark.parametrize("rejected,status,sent", [
    ({"json_schema"}, 500, "json_object"),       # llama-cpp-python's server (its validation error is a 500)
    ({"json_schema"}, 422, "json_object"),
    ({"json_schema", "json_object"}, 400, "none"),  # a server with no structured output
])
def test_response_format_falls_back_when_rejected(server, rejected, status, sent):
    server.reject_formats, server.reject_status = rejected, status
    judge = make_judge(server)
    assert judge.judge(convo(), "a longer answer", "short") == 1.0
    assert judge.response_format == sent
    types = [(b.get("response_format") or {}).get("type") for b in server.bodies]
    expected_tries = [t for t in ("json_schema", "json_object") if t in rejected]
    assert types == expected_tries + [None if sent == "none" else sent] * 2  # each rejection once only
    assert judge.stats["verdicts"] == 2


def test_a_rejected_response_format_set_explicitly_is_an_error(server):
    server.reject_formats = {"json_schema"}
    with pytest.raises(JudgeError, match=r"answered HTTP 422: .*response_format"):
        make_judge(server, response_format="json_schema").verdict(convo(), "x", "y")
    assert server.count == 1


def test_a_rejection_not_about_the_format_is_an_error_at_once(server):
    server.fail_forever = 400  # e.g. a prompt longer than the judge's context
    with pytest.raises(JudgeError, match=r"answered HTTP 400: .*try later"):
        make_judge(server).verdict(convo(), "x", "y")
    assert server.count == 1


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
        judge.verdict(convo(), "x" * i, "y")
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
    assert server.count == 6 and m2["judge_usage"] == dict(USAGE, cache_hits=6, protocol="json", response_format="json_schema")
    assert m2["overall"] == m1["overall"]

    # without --judge-cache the cache lives in the output dir: a rerun into it is free as well
    cfg = EvalConfig(model=str(tiny_model_dir), test_prompts=str(tests), judge="judge-m", judge_url=server.url,
                     max_new_tokens=6, tokenize=TokenizeConfig(max_length=64), device="cpu", output=str(tmp_path / "e3"))
    run_evaluate(cfg)
    assert server.count == 12 and (tmp_path / "e3" / "judge_cache.jsonl").exists()
    run_evaluate(cfg)
    assert server.count == 12


def test_win_rate_leaves_out_and_counts_the_pairs_without_verdict():
    from rose_select.evaluation import InvalidBudget, overall_win_rate, win_rate_metrics

    no = verdicts.NoVerdict("?")
    sub1, sub2 = win_rate_metrics([1.0, no, 0.5, 0.0]), win_rate_metrics([no, no])
    assert sub1 == {"judge/win_rate": 0.5, "judge/judged": 3, "judge/invalid": 1, "judge/invalid_share": 0.25}
    assert sub2 == {"judge/win_rate": None, "judge/judged": 0, "judge/invalid": 2, "judge/invalid_share": 1.0}
    assert overall_win_rate([sub1, sub2, win_rate_metrics([1.0])]) == {
        "judge/win_rate": 0.625, "judge/judged": 4, "judge/invalid": 3, "judge/invalid_share": 3 / 7}
    budget = InvalidBudget(10, 0.1, "judge endpoint X")
    assert budget.check(no) is no and budget.check(1.0) == 1.0  # 1 of 10: at the threshold, not past it
    with pytest.raises(JudgeError, match=r"judge endpoint X: 2 of 10 test prompts have no valid verdict \(20% or more\), "
                                         r"above judge_max_invalid_share 10%; e\.g\. the reply '\?'"):
        budget.check(no)
    InvalidBudget(3, 1.0, "X").check(no)  # a share of 1 never stops


def test_rose_evaluate_counts_invalid_verdicts_and_stops_past_the_share(tiny_model_dir, server, tmp_path, capsys):
    from rose_select.cli import main

    tests = tmp_path / "test"
    tests.mkdir()
    ask = "\n\nHuman: {}\n\nAssistant:"
    (tests / "shp_askculinary.json").write_text(json.dumps([
        {"prompt": ask.format("How do I bake bread?"), "golden_answer": "Bake."},
        {"prompt": ask.format("Tell me a joke."), "golden_answer": "No."},
        {"prompt": ask.format("Is salt needed?"), "golden_answer": "Salt " * 50}]))
    (tests / "shp_askvet.json").write_text(json.dumps([
        {"prompt": ask.format("Why does my cat sneeze?"), "golden_answer": "Dust."},
        {"prompt": ask.format("Dog food for cats?"), "golden_answer": "No " * 50}]))
    server.no_verdict_on = "joke"
    flags = ["evaluate", "--model", str(tiny_model_dir), "--test-prompts", str(tests), "--judge", "judge-m",
             "--judge-url", server.url, "--judge-cache", str(tmp_path / "v.jsonl"), "--judge-reasks", "1",
             "--max-new-tokens", "6", "--tokenize.max-length", "64", "--device", "cpu"]
    assert main([*flags, "--judge-max-invalid-share", "0.2", "--output", str(tmp_path / "e1")]) == 0
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    gens = [json.loads(line) for line in (tmp_path / "e1" / "generations.jsonl").read_text().splitlines()]
    culinary, overall = m["per_subtask"]["askculinary"], m["overall"]
    assert (culinary["judge/judged"], culinary["judge/invalid"], culinary["judge/invalid_share"]) == (2, 1, pytest.approx(1 / 3))
    assert (overall["judge/judged"], overall["judge/invalid"], overall["judge/invalid_share"]) == (4, 1, 0.2)
    assert [g["win"] is None for g in gens] == [False, True, False, False, False]
    assert gens[1]["no_verdict_reply"] == ASKS_BACK
    valid = [g["win"] for g in gens if g["win"] is not None]
    assert overall["judge/win_rate"] == pytest.approx(sum(valid) / 4) and set(valid) <= {0.0, 0.5, 1.0}
    assert "judge/invalid_share" in (tmp_path / "e1" / "metrics.md").read_text()
    assert server.count == 5 * 2 + 2 and m["judge_usage"]["not_verdicts"] == 4  # the joke: 2 orders, each re-asked once

    # a rerun re-asks only the pair without a verdict (2 orders x (1 + 1 re-ask))
    assert main([*flags, "--judge-max-invalid-share", "0.2", "--output", str(tmp_path / "e2")]) == 0
    assert server.count == 12 + 4 and json.loads((tmp_path / "e2" / "metrics.json").read_text())["overall"] == overall

    # the default share (10%): 1 of 5 is past it, the run stops with the share and the reply, writes no metrics
    capsys.readouterr()
    assert main([*flags, "--output", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"rose evaluate: error: judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions \(model 'judge-m'\): "
                        r"1 of 5 test prompts have no valid verdict \(20% or more\), above judge_max_invalid_share 10%; "
                        rf"e\.g\. the reply '{re.escape(ASKS_BACK)}'\. The valid verdicts are cached .*", err)
    assert not (tmp_path / "e3" / "metrics.json").exists()
