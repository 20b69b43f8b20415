"""Bring your own warm-up: read LESS / Hugging Face Trainer checkpoints.

A Trainer checkpoint directory (``checkpoint-<step>/``) holds the peft adapter, the optimizer's
``state_dict()`` pickled as ``optimizer.pt`` (``optimizer.bin`` when accelerate/FSDP saved it) and
``trainer_state.json``. The optimizer file is read with ``torch.load(weights_only=True)``: tensors
and plain containers only, never code. Its state is keyed by integers, numbered across the
param groups in the order the Trainer built them: the weight-decay group first, then the
no-decay group, each in ``model.named_parameters()`` order (``Trainer.create_optimizer``). FSDP's
full optimizer state is keyed by parameter names instead; both are mapped to canonical LoRA
parameter names, and a count or shape that does not match the adapter is refused.

The checkpoint weights of ROSE/LESS come from ``trainer_state.json``: the mean logged lr of each
epoch (``log_history``), as the ROSE authors compute them.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

from rose_select.errors import CheckpointError
from rose_select.io import read_json, write_json
from rose_select.modeling import (
    canonical_name,
    load_optimizer_state,
    lora_parameters,
    resolve_model,
    save_adam_moments,
)
from rose_select.train import rundir
from rose_select.train.checkpoints import HF_STATE, step_log, write_checkpoint

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


def _import_one(ckpt: Path, target: Path, model, epoch: int) -> None:
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
        _import_one(ckpt, output / f"ckpt-{epoch}", skeleton, epoch)
    last = states[ckpts[-1]]
    rundir.write_logs(output, step_log(last), last.num_train_epochs, [])
    write_json(output / "imported.json", {"source": str(Path(source).resolve()), "model": model,
                                           "checkpoints": {str(k): v for k, v in epochs.items()}})
    return output
