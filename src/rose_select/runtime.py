"""What every stage needs from its surroundings: the torch device and whether to show progress."""

from __future__ import annotations

import os


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
