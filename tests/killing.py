"""SIGKILL a stage at a chosen point, for the kill-anywhere tests.

The stage runs in a forked child process (no re-import: milliseconds, not seconds) that kills
itself with SIGKILL, the signal nothing can catch or clean up after, at one of these points:

- ``("before", NAME)`` / ``("after", NAME)``: just before / after an ``os.replace`` onto a path
  named NAME (every artifact is renamed into place, so these are the moments that matter);
- ``("step", N)``: at the N-th optimizer step (mid-epoch), before the step is taken.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: tuple[str, object]) -> None:
    kind, arg = point
    if kind == "step":
        import torch

        real_step, calls = torch.optim.AdamW.step, []

        def step(self, *a, **k):
            calls.append(1)
            if len(calls) == arg:
                _die()
            return real_step(self, *a, **k)

        torch.optim.AdamW.step = step
        return
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if kind == "before" and Path(dst).name == arg:
            _die()
        real_replace(src, dst, *a, **k)
        if kind == "after" and Path(dst).name == arg:
            _die()

    os.replace = replace


def one_thread():
    """Generator for a module fixture: torch on one intra-op thread while the module runs. A
    forked child must not enter an OpenMP region its parent's pool owns (libgomp is not fork-safe;
    DataLoader workers set one thread for the same reason), and one thread makes the reference
    and the resumed runs agree bit for bit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_killed(fn, point: tuple[str, object], timeout_s: float = 300.0) -> None:
    """Run ``fn()`` in a child process that SIGKILLs itself at ``point``; fail unless it did."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            _install(point)
            fn()
        except BaseException:
            code = 3
        os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child killed at {point} did not finish within {timeout_s}s")
        time.sleep(0.02)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child never reached {point} (exit status {os.waitstatus_to_exitcode(status)})")


def _digest(p: Path) -> str:
    """sha256 of a file; of a safetensors file's tensors and metadata (its header lists the
    metadata in an order that changes from process to process)."""
    if p.suffix != ".safetensors":
        return hashlib.sha256(p.read_bytes()).hexdigest()
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(p), framework="np") as f:
        h.update(repr(sorted((f.metadata() or {}).items())).encode())
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            h.update(f"{k}{t.dtype}{t.shape}".encode() + t.tobytes())
    return h.hexdigest()


def snapshot(path: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative name -> digest of every file under ``path``, hidden temporaries included."""
    return {str(p.relative_to(path)): _digest(p)
            for p in sorted(Path(path).rglob("*")) if p.is_file() and p.name not in skip}


def hidden_leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in Path(path).rglob(".*"))
