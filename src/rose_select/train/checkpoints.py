"""The warm-up checkpoint format, read and written in one place.

A checkpoint ``ckpt-<epoch>/`` holds the peft adapter, ``optimizer_state.safetensors`` (Adam
moments) and ``trainer_state.json``: ``{"epoch", "step", "epoch_mean_lr", "steps": [{"step",
"epoch", "lr", "loss"}, ...], ...}`` with the optimizer steps of that epoch. Everything a later
stage reads from a checkpoint (weights, moments, the learning rates that weight its features) is
written into the temporary directory that is then renamed into place, so no kill can leave a
checkpoint without its learning rates: ``lr_log.json`` and ``train_log.json`` beside the
checkpoints are derived from them and rewritten on every rerun. ``hf_trainer_state.json`` is the
Hugging Face Trainer's own state (``global_step``, every step so far in ``log_history``): what a
resumed run hands back to the Trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select.errors import CheckpointError
from rose_select.io import read_json, write_dir_atomically, write_json
from rose_select.modeling import load_optimizer_state, lora_parameters

STATE = "trainer_state.json"
HF_STATE = "hf_trainer_state.json"


def epoch_mean_lrs(steps: Sequence[dict], epochs: int) -> list[float]:
    """Mean lr of the logged steps of each epoch (1-based epochs)."""
    out = []
    for e in range(1, epochs + 1):
        lrs = [s["lr"] for s in steps if s["epoch"] == e]
        out.append(float(np.mean(lrs)) if lrs else 0.0)
    return out


def lr_log(steps: Sequence[dict], epochs: int) -> dict:
    means = epoch_mean_lrs(steps, epochs)
    total = sum(means)
    weights = [m / total for m in means] if total > 0 else [1.0 / len(means)] * len(means)
    return {"steps": list(steps), "epoch_mean_lr": means, "checkpoint_weights": weights}


def completed_epochs(run_dir: str | Path) -> list[int]:
    """Epochs with a complete ``ckpt-<epoch>/`` (checkpoints are written atomically)."""
    out = []
    for p in Path(run_dir).glob("ckpt-*"):
        tail = p.name.removeprefix("ckpt-")
        if p.is_dir() and tail.isdigit() and (p / STATE).exists():
            out.append(int(tail))
    return sorted(out)


def checkpoint_state(epoch: int, step: int, steps: Sequence[dict], **extra) -> dict:
    """The ``trainer_state.json`` of a checkpoint: its epoch's steps and their mean lr."""
    steps = [dict(s) for s in steps]
    lrs = [float(s["lr"]) for s in steps]
    return {"epoch": epoch, "step": step, "epoch_mean_lr": float(np.mean(lrs)) if lrs else 0.0,
            "steps": steps, **extra}


def write_checkpoint(ckpt_dir: str | Path, fill, *, epoch: int, step: int, steps: Sequence[dict],
                     **extra) -> None:
    """Write ``ckpt_dir`` atomically: ``fill(tmp)`` saves the weights and optimizer state, then
    the state with the epoch's learning rates goes into the same directory before the rename."""

    def fill_all(tmp: Path):
        fill(tmp)
        write_json(tmp / STATE, checkpoint_state(epoch, step, steps, **extra))

    write_dir_atomically(Path(ckpt_dir), fill_all)


def read_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / STATE
    state = read_json(path)
    if "epoch_mean_lr" not in state or "steps" not in state:
        raise CheckpointError(f"{path} records no learning rates (written by an older rose-select); "
                              "run the warm-up again into a new directory, or give checkpoint_weights")
    return state


def read_warmup_checkpoints(run_dir: str | Path) -> list[tuple[int, Path, float]]:
    """``[(epoch, checkpoint dir, mean lr of that epoch)]`` of every complete checkpoint, by epoch."""
    run_dir = Path(run_dir)
    return [(e, run_dir / f"ckpt-{e}", float(read_state(run_dir / f"ckpt-{e}")["epoch_mean_lr"]))
            for e in completed_epochs(run_dir)]


def logged_steps(run_dir: str | Path, upto_epoch: int) -> list[dict]:
    """The step log of epochs ``1..upto_epoch``, read back from their checkpoints."""
    run_dir, out = Path(run_dir), []
    for e in range(1, upto_epoch + 1):
        if not (run_dir / f"ckpt-{e}" / STATE).exists():
            raise CheckpointError(f"{run_dir}: ckpt-{e} is missing, but ckpt-{upto_epoch} exists; "
                                  "delete the run directory and train again")
        out += read_state(run_dir / f"ckpt-{e}")["steps"]
    return out


def warmup_epochs(run_dir: str | Path) -> int | None:
    """The epoch count the warm-up in ``run_dir`` was configured with (None if unknown)."""
    path = Path(run_dir) / "config.json"
    return read_json(path).get("config", {}).get("epochs") if path.exists() else None


def step_log(state) -> list[dict]:
    """``{step, epoch, lr, loss}`` of every optimizer step from a Trainer state's ``log_history``
    (logged at every step; ``learning_rate`` is the lr that step used); ``epoch`` is 1-based."""
    per_epoch = max(1, state.max_steps // max(1, int(state.num_train_epochs)))
    return [{"step": h["step"], "epoch": (h["step"] - 1) // per_epoch + 1, "lr": h["learning_rate"],
             "loss": h["loss"]} for h in state.log_history if "loss" in h and "learning_rate" in h]


def load_moments_into(ckpt_dir: str | Path, model, optimizer, step: int) -> None:
    """Put a checkpoint's Adam moments (by canonical name) into ``optimizer`` at ``step``."""
    import torch

    params = lora_parameters(model)
    moments, meta = load_optimizer_state(ckpt_dir, list(params))
    if int(meta.get("step", -1)) != step:
        raise CheckpointError(f"{ckpt_dir}: optimizer state is at step {meta.get('step')}, the Trainer state "
                              f"at step {step}; delete this checkpoint to redo its epoch")
    with torch.no_grad():
        for name, p in params.items():
            m, v = moments[name]
            optimizer.state[p] = {"step": torch.tensor(float(step)),
                                  "exp_avg": m.to(device=p.device, dtype=p.dtype),
                                  "exp_avg_sq": v.to(device=p.device, dtype=p.dtype)}
