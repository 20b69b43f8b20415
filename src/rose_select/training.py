"""LoRA SFT training: the warm-up run (ROSE/LESS step 1) and the final fine-tune (step 7).

Both run on Hugging Face's ``Trainer`` (``engine.py``: the loss, which is exactly the one the
featurizer differentiates, resume, seeding), in one process or data-parallel under ``torchrun``
(``rose warmup --nproc N``). This module holds the configuration, the run directory and the
checkpoint format.

Warm-up artifacts (``run_warmup``), in the run directory:
  ``config.json``            resolved config + fingerprint (a rerun with other settings is refused)
  ``warmup_ids.json``        ids of the random pool subset trained on
  ``ckpt-<epoch>/``          ``adapter_model.safetensors`` + ``adapter_config.json`` (peft format),
                             ``optimizer_state.safetensors`` (``exp_avg/<name>``,
                             ``exp_avg_sq/<name>``, metadata step/betas/eps), ``trainer_state.json``
                             (the Trainer's state: ``global_step``, and in ``log_history`` the lr
                             and loss of every step so far), ``lr_log.json`` (the same lrs, per
                             epoch means and checkpoint weights)
  ``lr_log.json``            copy of the last checkpoint's ``lr_log.json``
  ``train_log.json``         loss and lr per optimizer step

Resume: every checkpoint directory is written complete under a temporary name and renamed, so a
``ckpt-<e>`` either is complete or does not exist. A rerun with the same config restarts after the
last complete checkpoint: the Trainer resumes from it (adapter, state), the Adam moments are put
back by canonical parameter name and the schedule continues at the step. Data order and dropout
are seeded per epoch, so a resumed run reproduces the uninterrupted one (on CPU exactly; on GPU up
to the kernels' non-determinism).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select.checkpoint_format import (completed_epochs, load_moments_into, publish_logs, remove_stale_temporaries,
                                           save_checkpoint, write_dir_atomically, write_logs)
from rose_select.errors import ConfigError, DataError, StoreMismatchError
from rose_select.modeling import LoraSettings
from rose_select.records import InstructionRecord
from rose_select.tokenization import TokenizeConfig

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Keys of the config that do not change the result (left out of the fingerprint).
_NOT_FINGERPRINTED = ("output", "device", "save_every_epoch", "report_to", "gradient_checkpointing")
ENGINE = "hf-trainer-1"  # in the fingerprint: runs of the former hand-written loop are not resumed


@dataclass
class TrainConfig:
    """LoRA SFT on a pool subset: a selection file, a random fraction, or the full pool."""

    model: str = field(default="smollm2-135m", metadata={"help": "base model: HF id, local dir, or smollm2-135m"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    data: str = field(default="", metadata={"help": "instruction pool file (any format data.load_pool reads)"})
    data_format: str = field(default="auto", metadata={"help": "pool format (auto: detect)"})
    selection: str | None = field(default=None, metadata={"help": "selected.jsonl to train on (records in the pool's own format)"})
    fraction: float | None = field(default=None, metadata={"help": "train on a seeded random fraction of the pool"})
    full: bool = field(default=False, metadata={"help": "train on the whole pool"})
    epochs: int = field(default=4, metadata={"help": "training epochs"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (paper: 2e-5)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear lr warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=1, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=32, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    seed: int = field(default=42, metadata={"help": "seed of the subset, LoRA init, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32 | bfloat16 | float16"})
    output: str = field(default="runs/train", metadata={"help": "run directory"})
    save_every_epoch: bool = field(default=False, metadata={"help": "write ckpt-<epoch>/ after every epoch (enables resume)"})
    limit: int | None = field(default=None, metadata={"help": "read at most this many pool records (smoke runs)"})
    on_too_long: str = field(default="error", metadata={"help": "error | skip: an example with no response token left after truncation"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA with float32 weights) | none | bf16 | fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (less memory, ~30% slower)"})
    report_to: str = field(default="none", metadata={"help": "Trainer logging integrations: none | all | tensorboard,wandb,..."})

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.fraction is None or 0.0 < self.fraction <= 1.0, f"fraction must be in (0, 1], got {self.fraction}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.dtype in ("float32", "bfloat16", "float16", "float64"), f"dtype must be float32|bfloat16|float16|float64, got {self.dtype!r}"),
            (self.on_too_long in ("error", "skip"), f"on_too_long must be error|skip, got {self.on_too_long!r}"),
            (self.mixed_precision in ("auto", "none", "bf16", "fp16"),
             f"mixed_precision must be auto|none|bf16|fp16, got {self.mixed_precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        chosen = [name for name, on in (("selection", self.selection), ("fraction", self.fraction is not None),
                                        ("full", self.full)) if on]
        if len(chosen) > 1:
            raise ConfigError(f"give one of selection / fraction / full, got {chosen}")


@dataclass
class WarmupConfig(TrainConfig):
    """The warm-up run: a random 5% of the pool, a checkpoint with Adam moments per epoch."""

    fraction: float | None = field(default=0.05, metadata={"help": "seeded random fraction of the pool (paper: 0.05)"})
    output: str = field(default="runs/warmup", metadata={"help": "run directory"})
    save_every_epoch: bool = field(default=True, metadata={"help": "write ckpt-<epoch>/ after every epoch (needed by featurize)"})


# ---------------------------------------------------------------------------- small pure helpers

def choose_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded random ``fraction`` of ``n`` items (at least one)."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False).tolist())


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def progress_disabled() -> bool:
    return os.environ.get("ROSE_NO_PROGRESS", "") not in ("", "0")


# ---------------------------------------------------------------------------- data

def _records_for(cfg: TrainConfig, default_fraction: float | None) -> tuple[list[InstructionRecord], dict]:
    """The records to train on and a description of where they came from (for the fingerprint)."""
    from rose_select import data
    from rose_select.io import sha256_file

    if cfg.selection:
        if not Path(cfg.selection).exists():
            raise ConfigError(f"selection file not found: {cfg.selection}")
        records = data.load_pool(cfg.selection, format=cfg.data_format)
        return records, {"selection_sha256": sha256_file(cfg.selection)}
    if not cfg.data:
        raise ConfigError("no training data: give data (the pool) or selection")
    if not Path(cfg.data).exists():
        raise ConfigError(f"pool file not found: {cfg.data}")
    pool = data.load_pool(cfg.data, format=cfg.data_format, limit=cfg.limit)
    source = {"data_sha256": sha256_file(cfg.data), "pool_size": len(pool)}
    fraction = cfg.fraction if cfg.fraction is not None else (None if cfg.full else default_fraction)
    if fraction is None or cfg.full:
        return pool, source
    return [pool[i] for i in choose_subset(len(pool), fraction, cfg.seed)], source


def _encode_all(records: Sequence[InstructionRecord], tokenizer, cfg: TrainConfig) -> tuple[list[dict], list[str], list[str]]:
    from rose_select.tokenization import encode_record

    encoded, ids, skipped = [], [], []
    for rec in records:
        try:
            encoded.append(encode_record(rec, tokenizer, cfg.tokenize))
            ids.append(rec.id)
        except DataError:
            if cfg.on_too_long == "error":
                raise
            skipped.append(rec.id)
    if not encoded:
        raise DataError("no trainable example (every example lost its response to truncation)")
    return encoded, ids, skipped


# ---------------------------------------------------------------------------- run directory

def _fingerprint(cfg: TrainConfig, source: dict, ids: Sequence[str], processes: int) -> tuple[dict, str]:
    """The resolved config (plus the engine and the number of processes, which change the result
    of a per-device batch size) and its fingerprint."""
    from rose_select.config import to_dict
    from rose_select.io import sha256_json

    resolved = {**to_dict(cfg), "engine": ENGINE, "processes": processes}
    key = {k: v for k, v in resolved.items() if k not in _NOT_FINGERPRINTED}
    key.update(source=source, ids_sha256=sha256_json(list(ids)))
    return resolved, sha256_json(key)


def _check_or_write_config(run_dir: Path, resolved: dict, fingerprint: str) -> None:
    from rose_select.io import read_json, write_json

    path = run_dir / "config.json"
    if path.exists():
        old = read_json(path)
        if old.get("fingerprint") != fingerprint:
            old_cfg = old.get("config", {})
            diff = sorted(k for k in set(old_cfg) | set(resolved)
                          if k not in _NOT_FINGERPRINTED and old_cfg.get(k) != resolved.get(k))
            raise StoreMismatchError(
                f"{run_dir} holds a run with other settings (differing keys: {diff or 'the data'}); "
                "use a new output directory or delete this one")
        return
    write_json(path, {"config": resolved, "fingerprint": fingerprint})


# ---------------------------------------------------------------------------- the Trainer

def training_arguments(cfg: TrainConfig, run_dir: Path):
    """The ``TrainingArguments`` of a run (the paper's schedule and optimizer, a log per step)."""
    from transformers import TrainingArguments

    device = resolve_device(cfg.device)
    if device.startswith("cuda:"):
        raise ConfigError(f"device {device!r}: pick the GPU with CUDA_VISIBLE_DEVICES and give device cuda "
                          "(the Trainer uses cuda:LOCAL_RANK)")
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" and cfg.dtype == "float32" else "none"
    if precision != "none" and device != "cuda":
        raise ConfigError(f"mixed_precision {precision} needs device cuda, got {device}")
    report = cfg.report_to if cfg.report_to in ("none", "all") else cfg.report_to.split(",")
    return TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        lr_scheduler_type="linear", warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, optim="adamw_torch",
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed, logging_strategy="steps",
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to=report, disable_tqdm=True,
        use_cpu=device == "cpu", bf16=precision == "bf16", fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        remove_unused_columns=False, label_names=["labels"], ddp_find_unused_parameters=False)


def _fit(cfg: TrainConfig, args, records: Sequence[InstructionRecord], run_dir: Path, *, checkpoints: bool,
         resume: Path | None):
    """Train a fresh LoRA adapter on ``records`` (resuming from ``resume``); with ``checkpoints``
    every epoch ends in a complete ``run_dir/ckpt-<epoch>/``. Returns (trainer, skipped ids)."""
    import torch

    from rose_select.engine import Collator, EpochCallback, Examples, LoraSFTTrainer, ProgressBar, quiet_callbacks
    from rose_select.modeling import attach_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    encoded, ids, skipped = _encode_all(records, tokenizer, cfg)
    model = load_model(cfg.model, dtype=cfg.dtype, device="cpu")
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    model = attach_lora(model, cfg.lora)

    def save(epoch: int, model, optimizer, state):
        save_checkpoint(run_dir / f"ckpt-{epoch}", model, optimizer, state, epochs=cfg.epochs, skipped=skipped)
        publish_logs(run_dir, run_dir / f"ckpt-{epoch}")

    trainer = LoraSFTTrainer(model=model, args=args, train_dataset=Examples(encoded),
                             data_collator=Collator(tokenizer.pad_token_id), example_ids=ids,
                             load_moments=load_moments_into,
                             callbacks=[EpochCallback(cfg.seed, save if checkpoints else None)])
    quiet_callbacks(trainer, ProgressBar(f"train {run_dir.name}", progress_disabled()))
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.model.eval()
    return trainer, skipped


def _prepare_run(cfg: TrainConfig, chosen: Sequence[InstructionRecord], source: dict, extra: dict | None = None):
    """TrainingArguments, and the run directory with its config checked (by the main process
    first: under torchrun every process gets here)."""
    from rose_select.io import write_json

    run_dir = Path(cfg.output)
    args = training_arguments(cfg, run_dir)
    resolved, fp = _fingerprint(cfg, source, [r.id for r in chosen], args.world_size)
    with args.main_process_first(desc="run directory"):
        if args.process_index == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            _check_or_write_config(run_dir, resolved, fp)
            remove_stale_temporaries(run_dir)
            for name, content in (extra or {}).items():
                write_json(run_dir / name, content)
    return run_dir, args


def _resume_point(run_dir: Path) -> Path | None:
    done = completed_epochs(run_dir)
    return run_dir / f"ckpt-{done[-1]}" if done else None


# ---------------------------------------------------------------------------- stages

def run_warmup(cfg: TrainConfig, records: Sequence[InstructionRecord] | None = None) -> Path:
    """Warm-up LoRA training on a seeded random fraction of the pool (default 5%), one checkpoint
    with Adam moments per epoch. ``records``: an already-loaded pool instead of reading ``cfg.data``.
    Returns the run directory (idempotent: a finished run is returned as is)."""
    from rose_select.io import sha256_json

    if records is None:
        chosen, source = _records_for(cfg, default_fraction=0.05)
    else:
        pool = list(records)[:cfg.limit] if cfg.limit else list(records)
        fraction = 1.0 if cfg.full else (cfg.fraction if cfg.fraction is not None else 0.05)
        chosen = [pool[i] for i in choose_subset(len(pool), fraction, cfg.seed)]
        source = {"records_sha256": sha256_json([r.id for r in pool])}
    ids = {"ids": [r.id for r in chosen], "fraction": cfg.fraction, "seed": cfg.seed}
    run_dir, args = _prepare_run(cfg, chosen, source, {"warmup_ids.json": ids})
    if completed_epochs(run_dir)[-1:] != [cfg.epochs]:
        _fit(cfg, args, chosen, run_dir, checkpoints=True, resume=_resume_point(run_dir))
    if args.process_index == 0:  # also repairs logs of a run killed right after its last checkpoint
        publish_logs(run_dir, run_dir / f"ckpt-{cfg.epochs}")
    return run_dir


def run_train(cfg: TrainConfig, records: Sequence[InstructionRecord] | None = None) -> Path:
    """Final LoRA training on a selection file, a random fraction, or the full pool; writes
    ``adapter/`` (peft format, with ``train_log.json`` and ``lr_log.json`` inside) and the logs
    beside it. ``records``: train on these instead."""
    from rose_select.io import sha256_json

    if records is None:
        chosen, source = _records_for(cfg, default_fraction=None)
    else:
        chosen, source = list(records), {"records_sha256": sha256_json([r.id for r in records])}
    run_dir, args = _prepare_run(cfg, chosen, source)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        resume = _resume_point(run_dir) if cfg.save_every_epoch else None
        trainer, skipped = _fit(cfg, args, chosen, run_dir, checkpoints=cfg.save_every_epoch, resume=resume)
        if args.process_index == 0:
            write_dir_atomically(adapter, lambda tmp: (trainer.model.save_pretrained(str(tmp)),
                                                        write_logs(tmp, trainer.state, cfg.epochs, skipped)))
    if args.process_index == 0:
        publish_logs(run_dir, adapter)
    return run_dir


# ---------------------------------------------------------------------------- CLI hooks

def add_cli_arguments(command: str, parser) -> None:
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes on this machine: >1 starts torchrun with that many, data-parallel "
                             "(effective batch = batch_size x grad_accum x processes)")
    if command == "warmup":
        parser.add_argument("--import", dest="import_dir", default=None, metavar="DIR",
                            help="convert a LESS / Hugging Face Trainer run (checkpoint-*/ with a peft adapter, "
                                 "optimizer.pt or optimizer.bin, trainer_state.json) into this format at --output")


def handle_cli(command: str, args) -> int | None:
    from rose_select.config import from_args

    cls = WarmupConfig if command == "warmup" else TrainConfig
    if getattr(args, "import_dir", None):
        from rose_select.hf_import import import_trainer_run

        cfg = from_args(cls, args, args.config)
        print(import_trainer_run(args.import_dir, cfg.output, model=cfg.model))
        return 0
    if args.nproc == 1:
        return None
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    from rose_select.features import distributed as D

    return D.launch(command, from_args(cls, args, args.config), args.nproc)
