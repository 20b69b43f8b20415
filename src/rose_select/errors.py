"""Domain exceptions. Every user-facing failure is a ``RoseError``; bad input is also a ``ValueError``."""

from __future__ import annotations

import errno


class RoseError(Exception):
    """Base class for errors rose-select raises on purpose."""


class DataError(RoseError, ValueError):
    """A data file is malformed. Names the file, the line or record, and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 record: str | None = None, field: str | None = None):
        self.path, self.line, self.record, self.field = path, line, record, field
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if record is not None:
            where.append(f"record {record!r}")
        if field is not None:
            where.append(f"field {field!r}")
        self.problem = message
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class ConfigError(RoseError, ValueError):
    """A configuration value is invalid or a config file is malformed."""


class StoreMismatchError(RoseError, ValueError):
    """An existing artifact was written with other settings; we refuse to mix."""


class IncompatibleError(StoreMismatchError):
    """Two artifacts, each valid on its own, were not made to be used together (another model,
    checkpoint, projection, data file or subtask layout); names the key and both sides."""


class BusyError(RoseError, RuntimeError):
    """Another live process is writing the same output directory; two at once would interleave
    their stages' files."""


class CheckpointError(RoseError, ValueError):
    """A checkpoint is missing something a stage needs (adapter, optimizer state, lr log)."""


class ModelLoadError(RoseError, ValueError):
    """A model or tokenizer cannot be found or loaded."""


class NonFiniteError(RoseError, ValueError):
    """A loss or gradient is NaN/inf; names the offending example ids."""


class PeerError(RoseError, RuntimeError):
    """Another process of a multi-process run failed; this one stops too (its error is above)."""


class JudgeError(RoseError, RuntimeError):
    """A judge endpoint is unreachable, refuses the API key, keeps failing, or answers something
    that is not a verdict. One line: the endpoint, the model and what went wrong."""


_OS_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another output directory",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another output directory",
    errno.EACCES: "permission denied; choose a path you may write to (or read, for inputs)",
    errno.EPERM: "operation not permitted; choose a path you may write to",
    errno.EROFS: "read-only file system; choose another output directory",
    errno.ENOTDIR: "a part of this path is a file, not a directory",
    errno.EISDIR: "is a directory, where a file was expected",
    errno.EEXIST: "exists and is not a directory; an output must be a directory (choose another path)",
    errno.ENOENT: "no such file or directory",
}


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: the path, what went wrong and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "(path unknown)"
    return f"{where}: {_OS_HINTS.get(e.errno, e.strerror or type(e).__name__)}"
