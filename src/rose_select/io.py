"""Atomic file writes and fingerprints: an output either exists whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from rose_select.errors import BusyError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should have normal permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(row) -> str:
    """One JSON line that is valid UTF-8: other characters as they are, but a record holding a lone
    surrogate (JSON accepts ``"\\ud800"``, UTF-8 cannot hold it; e.g. in a pool record's unused
    field, which a selection writes back) is written with ``\\u`` escapes, as its input file had it."""
    line = json.dumps(row, ensure_ascii=False)
    return json.dumps(row) if _SURROGATE.search(line) else line


def write_jsonl(path: str | os.PathLike, rows) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json_line(row) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Fingerprint of a JSON-able object (key order independent)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike, tag: str = "tmp") -> None:
    """Delete half-built siblings ``.NAME.TAG-PID-*`` of ``path`` whose creating process died
    (a kill during a directory's write leaves one behind)."""
    path = Path(path)
    prefix = f".{path.name}.{tag}-"
    if not path.parent.is_dir():
        return
    for tmp in path.parent.iterdir():
        pid = tmp.name[len(prefix):].split("-")[0] if tmp.name.startswith(prefix) else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def write_dir_atomically(target: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp_dir)``, then rename the temporary directory onto ``target`` (replacing
    it), so ``target`` is always complete or absent whenever the process is killed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:  # name the directory the user gave, not the temporary's name
        raise OSError(e.errno, e.strerror, str(target.parent)) from None
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def content_fingerprint(directory: str | os.PathLike, *, head: int = 1 << 20, samples: int = 256,
                        block: int = 4096) -> str:
    """A cheap, stable hash of a directory's files (hidden ones left out): each file's name, size,
    first ``head`` bytes (a safetensors header and more) and ``samples`` blocks spread evenly over
    the rest. Copies and moves hash the same; other weights of the same shapes do not (a model
    replaced in place differs in almost every block)."""
    directory = Path(directory)
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(directory).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(head))
            if size > head:
                for k in range(samples):
                    fh.seek(head + max(0, size - head - block) * k // max(1, samples - 1))
                    h.update(fh.read(block))
    return h.hexdigest()


def run_once(out: str | os.PathLike, fn: Callable[[], Any], stamp: Any) -> None:
    """``fn()`` unless ``out/done.json`` holds exactly ``stamp`` (JSON: e.g. the step's config and
    its inputs' hashes), which is written after ``fn`` returns: a killed or repeated step resumes,
    a changed config reruns."""
    want = json.loads(json.dumps(stamp))
    done = Path(out) / "done.json"
    if done.exists() and json.loads(done.read_text()) == want:
        return
    fn()
    write_json(done, want)


LOCK_NAME = ".lock"


def hold_directory(directory: str | os.PathLike, what: str) -> IO:
    """An exclusive lock on ``directory`` for as long as the returned file stays open. The kernel
    drops it when the process ends, killed or not, so a crash never leaves a lock that blocks the
    rerun; a second live process gets ``BusyError`` naming the holder, before it writes anything."""
    path = Path(directory) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise BusyError(f"{directory} is in use by another {what} ({holder}); wait for it to end, or "
                        f"choose another output directory") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle
