"""A headless Chromium driven over the DevTools protocol on a pipe: to test and time ``report.html``.

No driver and no Python dependency: Chromium's ``--remote-debugging-pipe`` reads JSON commands
from file descriptor 3 and writes replies and events to descriptor 4, each message ended by a NUL
byte. ``Page`` opens one tab, collects every console error and uncaught exception, evaluates
JavaScript, types into the focused element and takes screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """``$ROSE_CHROMIUM``, else the first Chromium-family browser on PATH (None: none)."""
    if os.environ.get("ROSE_CHROMIUM"):
        return os.environ["ROSE_CHROMIUM"]
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


class BrowserError(RuntimeError):
    pass


class Page:
    """One headless tab. Use as a context manager; ``errors`` lists console errors and exceptions."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 1000, timeout: float = 60):
        exe = executable or find_chromium()
        if not exe:
            raise BrowserError("no Chromium found (apt-get install chromium, or set ROSE_CHROMIUM)")
        self.timeout, self.errors, self._events, self._next = timeout, [], [], 0
        self._profile = tempfile.TemporaryDirectory(prefix="rose-chromium-")
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        self._buf = b""
        args = [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--disable-extensions", f"--user-data-dir={self._profile.name}",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(3, 4),
                                     preexec_fn=lambda: (os.dup2(to_chrome, 3), os.dup2(from_chrome, 4)))
        os.close(to_chrome), os.close(from_chrome)
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    # ------------------------------------------------------------------ protocol
    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        return self._next

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise BrowserError("Chromium did not answer in time (or exited)")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed its DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        wanted, deadline = self._send(method, params, session), time.monotonic() + self.timeout
        while True:
            msg = self._read(deadline)
            if msg.get("id") == wanted:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("exception", {}).get("description")
                               or params["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(params["entry"].get("text"))
        elif method:
            self._events.append(method)

    def call(self, method: str, params: dict | None = None) -> dict:
        return self._call(method, params, self._session)

    # ------------------------------------------------------------------ what tests use
    def open(self, url: str) -> float:
        """Navigate and wait for the load event; returns the seconds it took."""
        t0 = time.monotonic()
        self._events.clear()
        self.call("Page.navigate", {"url": url})
        deadline = t0 + self.timeout
        while "Page.loadEventFired" not in self._events:
            self._event(self._read(deadline))
        return time.monotonic() - t0

    def js(self, expression: str):
        """Evaluate ``expression`` in the page (promises awaited); its value."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression[:60]}...: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, poll: float = 0.05):
        """Poll ``expression`` until it is truthy; its value (raises after ``timeout`` s). A DOM node
        comes back as ``{}``: test for one with ``!!``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(poll)
        raise BrowserError(f"timed out waiting for: {expression}")

    def type(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as a user would (input events fire)."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self._call("Browser.close")
        except BrowserError:
            pass
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.close(self._out), os.close(self._in)
            self._profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
