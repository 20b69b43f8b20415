"""What every stage needs from its surroundings: the torch device, whether to show progress,
and the CPU settings (how many intra-op threads, and how idle threads wait).

``configure_cpu()`` runs once, in the ``rose`` command before torch is imported (the OpenMP
runtime reads its environment when torch loads it). What it chooses, and why (README,
"Performance"; measured with ``bench/featurize.py --contended``):

- ``OMP_WAIT_POLICY=PASSIVE``: an OpenMP worker that finishes its share of an op sleeps instead of
  spinning. Spinning costs nothing on an idle machine, but when another process wants the core,
  the spinning threads steal its time slices and then wait for the descheduled one: throughput
  fell 7x-10x under one competing process. Passive waiting costs little when idle.
- intra-op threads: the cores not already kept busy by other processes (at least 1), from the
  CPU time the machine spent busy during 0.3 s when the command starts (``/proc/stat``; elsewhere
  the 1-minute load average). Threads on a core another process keeps busy make every op wait
  for the slowest thread.

Settings the user made win: ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` already in the environment
are kept, and ``ROSE_THREADS=N`` forces N threads.
"""

from __future__ import annotations

import os
import sys
import time

from rose_select.errors import ConfigError
from rose_select.features.distributed import available_cores


def choose_threads(cores: int, busy: float) -> int:
    """Intra-op threads for ``cores`` cores when other processes keep ``busy`` of them busy."""
    return max(1, min(cores, cores - int(busy + 0.5)))


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # (total, idle + iowait), in jiffies


def busy_cores(seconds: float = 0.3) -> float:
    """Cores other processes keep busy now: the machine's busy CPU time over ``seconds`` (this
    process sleeps meanwhile), or the 1-minute load average where ``/proc/stat`` is missing."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(seconds)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = max(1, total1 - total0)
    return (os.cpu_count() or 1) * (1.0 - (idle1 - idle0) / total)


def _thread_count(env) -> tuple[int, str]:
    if env.get("ROSE_THREADS"):
        try:
            n = int(env["ROSE_THREADS"])
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"ROSE_THREADS must be a positive integer, got {env['ROSE_THREADS']!r}")
        return n, "ROSE_THREADS"
    if env.get("OMP_NUM_THREADS"):
        return int(env["OMP_NUM_THREADS"].split(",")[0]), "OMP_NUM_THREADS"
    busy = busy_cores()
    return choose_threads(available_cores(), busy), f"{available_cores()} cores, {busy:.2f} busy"


def configure_cpu(environ=None) -> dict:
    """Set the OpenMP wait policy (before torch is imported), then torch's intra-op thread count.
    Returns what was chosen: ``{"wait_policy", "threads", "reason"}``."""
    env = os.environ if environ is None else environ
    if "torch" not in sys.modules:  # too late otherwise: the OpenMP runtime has read its environment
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads, reason = _thread_count(env)
    import torch

    torch.set_num_threads(threads)
    return {"wait_policy": env.get("OMP_WAIT_POLICY", "(OpenMP default)"), "threads": threads, "reason": reason}

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
