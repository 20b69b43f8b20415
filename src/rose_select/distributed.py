"""Several processes (featurize, warm-up, training): the torchrun environment, the process group,
the three collectives the featurizer needs, and the ``--nproc`` launcher.

Launched by ``torchrun`` (or ``rose featurize --nproc N``, which starts torchrun itself), each
process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Only rank 0 touches the feature store;
the other ranks send it their batches' features every round. One writer needs no filesystem
shared between nodes, never has two hosts writing the same memmap page, and leaves the bytes on
disk independent of how many processes computed them.

Every collective also carries a failure flag, so when one rank fails the others stop with an
error naming it instead of waiting forever for a peer that is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rose_select.config import save_yaml
from rose_select.errors import ConfigError, PeerError
from rose_select.runtime import available_cores


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; ``world == 1`` means no process group at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective buffers live: cpu (gloo) or cuda:LOCAL_RANK (nccl)
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks(environ=None) -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's variables; ``(0, 1, 0)`` when not set."""
    env = os.environ if environ is None else environ
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/"
                          f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got RANK={rank}, "
                          f"WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def start(use_cuda: bool) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), if there is one."""
    rank, world, local = env_ranks()
    if world == 1:
        return Dist()
    import torch
    import torch.distributed as dist

    device = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, device, owns)


def stop(d: Dist) -> None:
    """Leave the process group this process joined, together (see ``leave_open_group``)."""
    if d.owns_group:
        leave_open_group(finished=True)


def leave_open_group(finished: bool) -> None:
    """Leave a process group a library opened and left open (the Trainer's, under ``torchrun``).
    A process that exits with its gloo group alive can abort in the group's threads ("terminate
    called without an active exception") while its peers still work. After a finished command the
    ranks first meet at a barrier, so none tears down while another is inside a collective; after
    a failure they do not (a dead peer would never arrive)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def end_rank(code: int) -> int:
    """Under torchrun, end this process now with ``code``, skipping the interpreter's teardown;
    alone, return ``code``. After ``leave_open_group`` every output is written and closed, but a
    gloo group's threads can still abort the process while it tears down ("terminate called
    without an active exception", seen once in CI on rank 1 of a finished two-process
    featurize): that turns a finished rank into a failed run. Nothing is left to do at teardown that matters: files are closed, flocks
    go with the process, and stdout, stderr and the log handlers are flushed first."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return code
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say on it
            pass
    os._exit(code)

# --------------------------------------------------------------------------- collectives


def _all_gather(d: Dist, tensor):
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(tensor) for _ in range(d.world)]
    dist.all_gather(out, tensor)
    return out


def attempt(fn: Callable[[], object]) -> tuple[object, Exception | None]:
    """``(fn(), None)``, or ``(None, error)``: a failure is reported to the peers, then raised."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised by ``agree`` after the peers know
        return None, e


def agree(d: Dist, error: Exception | None, token: int = 0) -> list[int]:
    """Barrier that shares failures: raise ``error`` here, or ``PeerError`` if another rank
    failed; otherwise return every rank's ``token`` (e.g. a settings hash to compare)."""
    if d.world == 1:
        if error is not None:
            raise error
        return [token]
    import torch

    mine = torch.tensor([int(error is not None), token], dtype=torch.int64, device=d.device)
    flags, tokens = zip(*(t.tolist() for t in _all_gather(d, mine)))
    if error is not None:
        raise error
    failed = [r for r, f in enumerate(flags) if f]
    if failed:
        raise PeerError(f"rank(s) {failed} failed (see their messages above); rank {d.rank} stops too")
    return list(tokens)


def gather_features(d: Dist, feats, n_max: int, dim: int) -> list:
    """Every rank's ``[n_i, dim]`` float32 features (``None``: no batch this round), all ranks
    taking part; rank 0 gets them as CPU tensors, the others get an empty list."""
    import torch

    if d.world == 1:
        return [None if feats is None else feats.float().cpu()]
    n = 0 if feats is None else feats.shape[0]
    counts = [int(c) for c in _all_gather(d, torch.tensor([n], dtype=torch.int64, device=d.device))]
    buf = torch.zeros(n_max, dim, dtype=torch.float32, device=d.device)
    if n:
        buf[:n] = feats.float()
    got = _all_gather(d, buf)
    if not d.is_main:
        return []
    return [g[:c].cpu() if c else None for g, c in zip(got, counts)]


def broadcast_mask(d: Dist, mask) -> "object":
    """Rank 0's ``[N]`` uint8 numpy mask on every rank (the others pass an array of the size)."""
    if d.world == 1:
        return mask
    import numpy as np
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.uint8).to(d.device)
    dist.broadcast(t, src=0)
    return t.cpu().numpy()

# --------------------------------------------------------------------------- launching


def threads_per_process(nproc: int, cores: int | None = None) -> int:
    """CPU threads for each of ``nproc`` processes sharing this machine's cores."""
    return max(1, (available_cores() if cores is None else cores) // nproc)


def torchrun_command(nproc: int, module_args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m rose_select ...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "rose_select", *module_args]


def launch(command: str, cfg, nproc: int) -> int:
    """Run ``rose <command>`` with ``cfg`` in ``nproc`` processes on this machine under torchrun;
    returns its exit status. Each process gets ``cores // nproc`` threads unless OMP_NUM_THREADS
    is set."""

    if env_ranks()[1] > 1:
        raise ConfigError("--nproc starts torchrun itself; inside torchrun leave it at 1")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    with tempfile.TemporaryDirectory(prefix="rose-launch-") as tmp:
        config = Path(tmp) / f"{command}.yaml"
        save_yaml(cfg, config)
        return subprocess.run(torchrun_command(nproc, [command, "--config", str(config)]), env=env).returncode
