"""What every stage needs from its surroundings: the torch device, whether to show progress,
and the CPU settings (how many intra-op threads, and how idle threads wait).

``configure_cpu()`` runs once, in the ``rose`` command before torch is imported (the OpenMP
runtime reads its environment when torch loads it). What it chooses, and why (README,
"Performance"; measured with ``bench/featurize.py --contended``):

- ``OMP_WAIT_POLICY=PASSIVE``: an OpenMP worker that finishes its share of an op sleeps instead of
  spinning. Spinning costs nothing on an idle machine, but when another process wants the core,
  the spinning threads steal its time slices and then wait for the descheduled one. On the shared
  machine the OpenMP default stayed below 0.133 ex/s (stopped after 240 s) where passive waiting
  made 0.495 ex/s; the issue measured 232 s vs 32 s beside one competing process.
- intra-op threads: every core this process may use, busy machine or not. Measured side by side
  beside a 2-thread competitor on the shared 2-core machine (two runs): 2 passive threads kept
  0.52x-0.53x of their own idle throughput, 1 thread fell below 0.31x (it timed out). Under a
  fair scheduler a process's share grows with its runnable threads, and passive threads no longer
  stall each other by spinning, so fewer threads than cores only gives CPU away.

Settings the user made win: ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` already in the environment
are kept, and ``ROSE_THREADS=N`` forces N threads.
"""

from __future__ import annotations

import os
import sys

from rose_select.errors import ConfigError


_CHOSEN: dict = {}


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _positive(env, name: str) -> int:
    try:
        n = int(env[name].split(",")[0])  # OMP_NUM_THREADS may list counts per nesting level
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{name} must be a positive integer, got {env[name]!r}")
    return n


def _thread_count(env) -> tuple[int, str]:
    for name in ("ROSE_THREADS", "OMP_NUM_THREADS"):
        if env.get(name):
            return _positive(env, name), name
    return available_cores(), "every available core"


def configure_cpu(environ=None) -> dict:
    """Set the OpenMP wait policy (before torch is imported), then torch's intra-op thread count.
    Returns what was chosen: ``{"wait_policy", "threads", "reason"}``."""
    env = os.environ if environ is None else environ
    if environ is None and _CHOSEN:  # once per process: later commands in it keep the choice
        return dict(_CHOSEN)
    if "torch" not in sys.modules:  # too late otherwise: the OpenMP runtime has read its environment
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads, reason = _thread_count(env)
    import torch

    torch.set_num_threads(threads)
    chosen = {"wait_policy": env.get("OMP_WAIT_POLICY", "(OpenMP default)"), "threads": threads, "reason": reason}
    if environ is None:
        _CHOSEN.update(chosen)
    return chosen


def resolve_device(device: str = "auto", local_rank: int | None = None):
    """The ``torch.device`` for a device setting: ``auto`` picks CUDA, then MPS, then the CPU; in a
    multi-process run a CUDA device is ``cuda:LOCAL_RANK``."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    return torch.device("cuda", local_rank) if local_rank is not None and dev.type == "cuda" else dev


def progress_disabled() -> bool:
    """``ROSE_NO_PROGRESS`` set to anything but empty or ``0`` hides progress bars (CI, logs)."""
    return os.environ.get("ROSE_NO_PROGRESS", "") not in ("", "0")


# Third-party messages that say nothing a rose user can act on: weight-loading progress bars and
# the deprecation notices the libraries raise at each other (transformers <-> peft <-> torch).
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}


def quiet_libraries(environ=None) -> None:
    """Keep the console to rose's own output: run before transformers is imported (it reads these
    at import). Settings the user made win; rose's own progress bars are unaffected."""
    import warnings

    env = os.environ if environ is None else environ
    for key, value in _QUIET_ENV.items():
        env.setdefault(key, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|accelerate|torch|trl)(\.|$)")
