"""The checkpoint format of warm-up and training runs, in small functions that only read and
write (no training): one ``ckpt-<epoch>/`` directory holds everything a later stage reads about
that epoch, written complete under a temporary name and renamed into place.

``ckpt-<epoch>/``:
  ``adapter_model.safetensors``, ``adapter_config.json``   the LoRA adapter (peft format)
  ``optimizer_state.safetensors``   Adam moments ``exp_avg/<name>``, ``exp_avg_sq/<name>`` keyed by
                                    canonical parameter name; metadata step/beta1/beta2/eps
  ``trainer_state.json``            the Hugging Face Trainer's state (``global_step``; the lr and
                                    loss of every step in ``log_history``): what resume reads
  ``lr_log.json``                   lr of every step, per-epoch mean lr, checkpoint weights
  ``train_log.json``                loss and lr of every step, examples skipped as too long
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select.errors import CheckpointError
from rose_select.io import read_json, write_json
from rose_select.modeling import load_optimizer_state, lora_parameters, save_optimizer_state


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


def step_log(log_history: Sequence[dict], steps_per_epoch: int) -> list[dict]:
    """``{step, epoch, lr, loss}`` of every optimizer step from the Trainer's ``log_history``
    (logged at every step; ``learning_rate`` is the lr that step used)."""
    return [{"step": h["step"], "epoch": (h["step"] - 1) // steps_per_epoch + 1, "lr": h["learning_rate"],
             "loss": h["loss"]} for h in log_history if "loss" in h and "learning_rate" in h]


def completed_epochs(run_dir: Path) -> list[int]:
    """Epochs with a complete ``ckpt-<epoch>/`` (checkpoints are written atomically)."""
    out = []
    for p in Path(run_dir).glob("ckpt-*"):
        tail = p.name.removeprefix("ckpt-")
        if p.is_dir() and tail.isdigit() and (p / "trainer_state.json").exists():
            out.append(int(tail))
    return sorted(out)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporaries of directory writes that a kill interrupted (``.<name>.*.tmp``)."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def write_dir_atomically(target: Path, fill) -> None:
    """Call ``fill(tmp_dir)``, then rename the temporary directory onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_logs(directory: Path, state, epochs: int, skipped: Sequence[str]) -> None:
    """``lr_log.json`` and ``train_log.json`` of a Trainer state into ``directory``."""
    steps = step_log(state.log_history, max(1, state.max_steps // max(1, int(state.num_train_epochs))))
    write_json(directory / "lr_log.json", lr_log([{k: s[k] for k in ("step", "epoch", "lr")} for s in steps], epochs))
    write_json(directory / "train_log.json", {"steps": steps, "skipped_too_long": list(skipped)})


def publish_logs(run_dir: Path, source: Path) -> None:
    """Copy the logs written inside a finished checkpoint or adapter directory to the run
    directory (where ``rose select`` reads ``lr_log.json``)."""
    for name in ("lr_log.json", "train_log.json"):
        write_json(run_dir / name, read_json(source / name))


def save_checkpoint(ckpt_dir: Path, model, optimizer, state, *, epochs: int, skipped: Sequence[str] = ()) -> None:
    """One complete checkpoint: adapter, Adam moments by name, Trainer state, lr and loss logs."""
    def fill(tmp: Path):
        model.save_pretrained(str(tmp))
        save_optimizer_state(tmp / "optimizer_state.safetensors", model, optimizer, step=state.global_step)
        state.save_to_json(str(tmp / "trainer_state.json"))
        write_logs(tmp, state, epochs, skipped)

    write_dir_atomically(Path(ckpt_dir), fill)


def load_moments_into(ckpt_dir: Path, model, optimizer, step: int) -> None:
    """Put a checkpoint's Adam moments (by canonical name) into ``optimizer`` at ``step``."""
    import torch

    params = lora_parameters(model)
    moments, meta = load_optimizer_state(ckpt_dir, list(params))
    if int(meta.get("step", -1)) != step:
        raise CheckpointError(f"{ckpt_dir}: optimizer state is at step {meta.get('step')}, "
                              f"trainer_state.json at step {step}; delete this checkpoint to redo its epoch")
    with torch.no_grad():
        for name, p in params.items():
            m, v = moments[name]
            optimizer.state[p] = {"step": torch.tensor(float(step)),
                                  "exp_avg": m.to(device=p.device, dtype=p.dtype),
                                  "exp_avg_sq": v.to(device=p.device, dtype=p.dtype)}
