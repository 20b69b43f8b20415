"""The checkpoint format, read and written in one place: adapter, Adam moments, learning rates,
the adapter's base model, and the Hugging Face Trainer / LESS imports.

Both the features wing (Adam moments for preconditioning, the adapter) and the train wing (writing
checkpoints, resuming) depend on this module; neither depends on the other.

A checkpoint ``ckpt-<epoch>/`` holds the peft adapter, ``optimizer_state.safetensors`` (Adam
moments by canonical parameter name), ``base_model.json`` (the model the adapter was trained on,
by content) and ``trainer_state.json``: ``{"epoch", "step", "epoch_mean_lr", "steps": [{"step",
"epoch", "lr", "loss"}, ...], ...}`` with the optimizer steps of that epoch. Everything a later
stage reads from a checkpoint (weights, moments, the learning rates that weight its features) is
written into the temporary directory that is then renamed into place, so no kill can leave a
checkpoint without its learning rates: ``lr_log.json`` and ``train_log.json`` beside the
checkpoints are derived from them and rewritten on every rerun. ``hf_trainer_state.json`` is the
Hugging Face Trainer's own state (``global_step``, every step so far in ``log_history``): what a
resumed run hands back to the Trainer.

Bring your own warm-up (LESS / Hugging Face Trainer checkpoints): a Trainer checkpoint directory
(``checkpoint-<step>/``) holds the peft adapter, the optimizer's ``state_dict()`` pickled as
``optimizer.pt`` (``optimizer.bin`` when accelerate/FSDP saved it) and ``trainer_state.json``. The
optimizer file is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never code. Its state is keyed by integers, numbered across the param groups in the order the
Trainer built them: the weight-decay group first, then the no-decay group, each in
``model.named_parameters()`` order (``Trainer.create_optimizer``). FSDP's full optimizer state is
keyed by parameter names instead; both are mapped to canonical LoRA parameter names, and a count or
shape that does not match the adapter is refused.

The checkpoint weights of ROSE/LESS come from ``trainer_state.json``: the mean logged lr of each
epoch (``log_history``), as the ROSE authors compute them.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from rose_select.compat import require_same
from rose_select.errors import CheckpointError
from rose_select.io import atomic_path, read_json, sha256_file, write_dir_atomically, write_json
from rose_select.modeling import canonical_name, lora_parameters, model_identity, resolve_model

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- the logs beside the checkpoints


def write_logs(run_dir: Path, log: list[dict], epochs: int, skipped: list[str]) -> None:
    write_json(run_dir / "lr_log.json", lr_log([{k: s[k] for k in ("step", "epoch", "lr")} for s in log], epochs))
    write_json(run_dir / "train_log.json", {"steps": log, "skipped_too_long": skipped})


def logs_from_checkpoints(run_dir: Path, epochs: int) -> None:
    """Rewrite lr_log.json and train_log.json from the checkpoints (a kill may have come between
    a checkpoint's rename and the logs' write)."""
    last = completed_epochs(run_dir)[-1]
    write_logs(run_dir, logged_steps(run_dir, last), epochs,
               read_state(run_dir / f"ckpt-{last}").get("skipped_too_long", []))


# --------------------------------------------------------------------------- writing a training checkpoint


def save_checkpoint(ckpt_dir: Path, model, optimizer, state, *, base_model: str, extra: dict | None = None) -> None:
    """``ckpt-<epoch>/`` of the epoch a Trainer ``state`` just finished: adapter, its base model,
    Adam moments by name, the epoch's steps (``trainer_state.json``) and the Trainer's own state,
    renamed whole."""

    per_epoch = max(1, state.max_steps // max(1, int(state.num_train_epochs)))
    epoch, steps = state.global_step // per_epoch, step_log(state)

    def fill(tmp: Path):
        model.save_pretrained(str(tmp))
        write_base_model(tmp, base_model)
        save_optimizer_state(tmp / "optimizer_state.safetensors", model, optimizer, step=state.global_step)
        state.save_to_json(str(tmp / HF_STATE))

    mine = [s for s in steps if s["epoch"] == epoch]
    write_checkpoint(ckpt_dir, fill, epoch=epoch, step=state.global_step, steps=mine,
                     steps_per_epoch=per_epoch, total_steps=state.max_steps,
                     epoch_mean_loss=float(np.mean([s["loss"] for s in mine])) if mine else 0.0, **(extra or {}))


# --------------------------------------------------------------------------- the adapter's base model

BASE_MODEL = "base_model.json"
ADAPTER_FILE = "adapter_model.safetensors"


def adapter_sha256(ckpt_dir) -> str | None:
    """The adapter weights by content (what pairs a feature store with its checkpoint)."""
    path = Path(ckpt_dir) / ADAPTER_FILE
    return sha256_file(path) if path.is_file() else None


def write_base_model(directory, model: str) -> None:
    """Record beside an adapter the base model it is trained on, by content (``model_identity``)."""
    write_json(Path(directory) / BASE_MODEL, {"model": model, "identity": model_identity(model)})


def check_base_model(adapter_dir, model: str, *, user: str) -> None:
    """Refuse to put an adapter on another base model than the one it was trained on (an adapter of
    the right shapes would load silently). Adapters without a record (other tools, older
    rose-select) cannot be checked: said in the log."""
    path = Path(adapter_dir) / BASE_MODEL
    if not path.exists():
        log.warning("%s: no %s; cannot verify that the adapter was trained on %s", adapter_dir, BASE_MODEL, model)
        return
    recorded = read_json(path)
    require_same(f"the adapter {adapter_dir} and the model of {user}",
                 (f"the adapter (trained on {recorded.get('model')})", recorded),
                 (f"{user} (model {model})", {"identity": model_identity(model)}), ["identity"],
                 hint=f"Use the model the adapter was trained on ({recorded.get('model')}), or train an adapter for {model}.")

# --------------------------------------------------------------------------- Adam moments


def save_optimizer_state(path: str | Path, model, optimizer, *, step: int) -> None:
    """Adam moments keyed by canonical parameter name, in safetensors (no pickle)."""
    group = optimizer.param_groups[0]
    moments = {name: (optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])
               for name, p in lora_parameters(model).items() if "exp_avg" in optimizer.state.get(p, {})}
    save_adam_moments(path, moments, step=step, beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])


def save_adam_moments(path: str | Path, moments: dict, *, step: int, beta1: float = 0.9, beta2: float = 0.999,
                      eps: float = 1e-8) -> None:
    """``{canonical name: (exp_avg, exp_avg_sq)}`` as ``optimizer_state.safetensors``, the one
    format ``load_optimizer_state`` reads."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, (m, v) in moments.items():
        tensors[f"exp_avg/{name}"] = m.detach().to("cpu", torch.float32).contiguous()
        tensors[f"exp_avg_sq/{name}"] = v.detach().to("cpu", torch.float32).contiguous()
    meta = {"step": str(step), "beta1": str(beta1), "beta2": str(beta2), "eps": str(eps)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_optimizer_state(ckpt_dir: str | Path, names) -> tuple[dict, dict]:
    """Moments for ``names`` -> ({name: (exp_avg, exp_avg_sq)}, metadata). Refuses pickles."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "optimizer_state.safetensors"
    if not path.exists():
        found = sorted(p.name for p in ckpt_dir.glob("*")) if ckpt_dir.exists() else "directory missing"
        raise CheckpointError(f"{ckpt_dir}: no optimizer_state.safetensors (nor a Trainer's optimizer.pt/.bin), "
                              f"needed for Adam-preconditioned features (found: {found}); re-run the warm-up "
                              "with rose, or featurize with --adam false.")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata() or {}
        missing = [n for n in names if f"exp_avg/{n}" not in keys or f"exp_avg_sq/{n}" not in keys]
        if missing:
            stored = sorted(k.split("/", 1)[1] for k in keys if k.startswith("exp_avg/"))
            raise CheckpointError(f"{path}: optimizer state lacks {len(missing)} of {len(list(names))} LoRA "
                                  f"parameters, e.g. {missing[:3]}; it has e.g. {stored[:3]}. Was it written "
                                  "for a different LoRA rank or target modules?")
        return {n: (f.get_tensor(f"exp_avg/{n}"), f.get_tensor(f"exp_avg_sq/{n}")) for n in names}, meta


# --------------------------------------------------------------------------- Hugging Face Trainer / LESS checkpoints

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")


def optimizer_file(ckpt_dir) -> Path | None:
    """The Trainer's pickled optimizer state in ``ckpt_dir``, if there is one."""
    for name in OPTIMIZER_FILES:
        if (Path(ckpt_dir) / name).is_file():
            return Path(ckpt_dir) / name
    return None


def trainer_param_order(model) -> list[str]:
    """Canonical names of the trainable parameters in the order of the Trainer's param groups."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    return [canonical_name(n) for n in named if n in decay] + [canonical_name(n) for n in named if n not in decay]


def _load_state_dict(path: Path) -> dict:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable optimizer state of tensors ({str(e).splitlines()[0][:200]}); "
                              "refusing to unpickle anything else") from None
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict):
        raise CheckpointError(f"{path}: not an optimizer state_dict (expected a dict with 'state' and 'param_groups')")
    return sd


def _names_by_key(sd: dict, path: Path, model) -> dict:
    """Optimizer-state key -> canonical parameter name."""
    state, groups = sd["state"], sd.get("param_groups") or []
    if state and all(isinstance(k, str) for k in state):  # FSDP full state: keyed by name
        return {k: canonical_name(k.replace("_fsdp_wrapped_module.", "")) for k in state}
    keys = [k for g in groups for k in g.get("params", [])]
    order = trainer_param_order(model)
    if len(keys) != len(order):
        raise CheckpointError(f"{path}: the optimizer holds {len(keys)} parameters, the adapter has {len(order)} "
                              f"trainable ones (e.g. {order[:2]}); was it saved for other LoRA target modules, "
                              "or with other trainable parameters (modules_to_save)?")
    return dict(zip(keys, order))


def read_trainer_moments(ckpt_dir, model) -> tuple[dict, dict]:
    """``({name: (exp_avg, exp_avg_sq)}, {step, beta1, beta2, eps})`` from a Trainer checkpoint's
    ``optimizer.pt``/``optimizer.bin``, for the LoRA parameters of ``model``."""
    path = optimizer_file(ckpt_dir)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: no {' or '.join(OPTIMIZER_FILES)}")
    sd = _load_state_dict(path)
    params, names = lora_parameters(model), _names_by_key(sd, path, model)
    moments, steps = {}, []
    for key, entry in sd["state"].items():
        name = names.get(key)
        if name not in params or "exp_avg" not in entry or "exp_avg_sq" not in entry:
            raise CheckpointError(f"{path}: state {key!r} ({name}) is not Adam state of a LoRA parameter of the adapter")
        shape = tuple(params[name].shape)
        for moment in ("exp_avg", "exp_avg_sq"):
            if tuple(entry[moment].shape) != shape:
                raise CheckpointError(f"{path}: {moment} of {name} has shape {tuple(entry[moment].shape)}, the adapter's "
                                      f"parameter {shape} (another LoRA rank?)")
        moments[name] = (entry["exp_avg"], entry["exp_avg_sq"])
        steps.append(int(entry.get("step", 0)))
    missing = [n for n in params if n not in moments]
    if missing:
        raise CheckpointError(f"{path}: no Adam state for {len(missing)} of {len(params)} LoRA parameters, e.g. "
                              f"{missing[:3]} (saved before the first optimizer step?)")
    group = (sd.get("param_groups") or [{}])[0]
    betas = group.get("betas", (0.9, 0.999))
    return moments, {"step": max(steps), "beta1": betas[0], "beta2": betas[1], "eps": group.get("eps", 1e-8)}


def checkpoint_moments(ckpt_dir, model) -> dict:
    """Adam moments of ``model``'s LoRA parameters from a checkpoint in either format: the
    project's ``optimizer_state.safetensors``, else a Trainer's ``optimizer.pt``/``.bin``."""
    if not (Path(ckpt_dir) / "optimizer_state.safetensors").exists() and optimizer_file(ckpt_dir) is not None:
        return read_trainer_moments(ckpt_dir, model)[0]
    return load_optimizer_state(ckpt_dir, list(lora_parameters(model)))[0]

# --------------------------------------------------------------------------- Trainer state


def _state(path: Path) -> SimpleNamespace:
    """A Trainer's ``trainer_state.json`` as an object with the fields ``step_log`` reads."""
    if not path.exists():
        raise CheckpointError(f"{path.parent}: no trainer_state.json (needed for the step and the lrs)")
    raw = read_json(path)
    try:
        return SimpleNamespace(log_history=list(raw["log_history"]), global_step=int(raw["global_step"]),
                               max_steps=int(raw["max_steps"]), num_train_epochs=int(raw["num_train_epochs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a Trainer state (field {e})") from None

# --------------------------------------------------------------------------- import a run


def trainer_checkpoints(source) -> list[Path]:
    """A checkpoint directory itself, or the ``checkpoint-<step>/`` directories of a run, by step."""
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: not a directory")
    if (source / "adapter_config.json").exists():
        return [source]
    found = [p for p in source.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    if not found:
        raise CheckpointError(f"{source}: neither a checkpoint (adapter_config.json) nor a run with checkpoint-*/ "
                              f"directories; found {sorted(p.name for p in source.iterdir())[:10]}")
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _skeleton(model_name: str, ckpt: Path):
    """The base model with the checkpoint's LoRA layout on the meta device: parameter names,
    shapes and order without loading any weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model(model_name))
    lora = LoraConfig.from_pretrained(str(ckpt))
    lora.inference_mode = False  # saved adapters say True, which would freeze the LoRA parameters
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(AutoModelForCausalLM.from_config(config), lora)


def _import_one(ckpt: Path, target: Path, model, epoch: int, base_model: str) -> None:
    """One Trainer checkpoint as ``ckpt-<epoch>/``: its adapter, its moments by name, the epoch's
    steps and mean lr (the project's ``trainer_state.json``) and the Trainer's state beside them."""
    state = _state(ckpt / "trainer_state.json")
    steps = [s for s in step_log(state) if s["epoch"] == epoch]
    if not steps:
        raise CheckpointError(f"{ckpt}/trainer_state.json: log_history has no step of epoch {epoch} with a loss "
                              "and a learning_rate, so no checkpoint weight (log the run with logging_steps=1)")
    moments, meta = read_trainer_moments(ckpt, model)

    def fill(tmp: Path):
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            if (ckpt / name).exists():
                (tmp / name).write_bytes((ckpt / name).read_bytes())
        write_base_model(tmp, base_model)
        save_adam_moments(tmp / "optimizer_state.safetensors", moments, step=state.global_step,
                          beta1=meta["beta1"], beta2=meta["beta2"], eps=meta["eps"])
        (tmp / HF_STATE).write_bytes((ckpt / "trainer_state.json").read_bytes())

    write_checkpoint(target, fill, epoch=epoch, step=state.global_step, steps=steps, imported_from=str(ckpt))


def import_trainer_run(source, output, *, model: str) -> Path:
    """Convert a LESS / Hugging Face Trainer run into warm-up checkpoints ``output/ckpt-<epoch>/``
    (adapter, named Adam moments in safetensors, each epoch's lrs) plus ``lr_log.json`` and
    ``train_log.json``. Every imported checkpoint must end an epoch."""
    ckpts, output = trainer_checkpoints(source), Path(output)
    skeleton = _skeleton(model, ckpts[0])
    epochs, states = {}, {}
    for ckpt in ckpts:
        state = states[ckpt] = _state(ckpt / "trainer_state.json")
        per_epoch = max(1, state.max_steps // max(1, state.num_train_epochs))
        if state.global_step % per_epoch:
            raise CheckpointError(f"{ckpt}: step {state.global_step} is not the end of an epoch ({per_epoch} steps "
                                  "each); import checkpoints saved with save_strategy='epoch'")
        epochs[ckpt] = state.global_step // per_epoch
    for ckpt, epoch in epochs.items():
        _import_one(ckpt, output / f"ckpt-{epoch}", skeleton, epoch, model)
    last = states[ckpts[-1]]
    write_logs(output, step_log(last), last.num_train_epochs, [])
    write_json(output / "imported.json", {"source": str(Path(source).resolve()), "model": model,
                                           "checkpoints": {str(k): v for k, v in epochs.items()}})
    return output
