"""LoRA SFT training: the warm-up run (ROSE/LESS step 1) and the final fine-tune (step 7).

Both run on Hugging Face's ``Trainer`` (``engine.py``: the loss, which is exactly the one the
featurizer differentiates, resume, seeding), in one process or data-parallel under ``torchrun``
(``rose warmup --nproc N``). This module holds the configuration, the run directory and the
stages; the checkpoint format is ``rose_select/checkpoint.py``.

Warm-up artifacts (``run_warmup``), in the run directory:
  ``config.json``            resolved config + fingerprint (a rerun with other settings is refused)
  ``warmup_ids.json``        ids of the random pool subset trained on
  ``ckpt-<epoch>/``          ``adapter_model.safetensors`` + ``adapter_config.json`` (peft format),
                             ``optimizer_state.safetensors`` (``exp_avg/<name>``,
                             ``exp_avg_sq/<name>``, metadata step/betas/eps), ``trainer_state.json``
                             (the epoch's steps with lr and loss, and their mean lr: see
                             ``checkpoint.py``), ``hf_trainer_state.json`` (the Trainer's own state,
                             what resume reads; its ``log_history`` has every step so far)
  ``lr_log.json``            per-step lr, ``epoch_mean_lr``, ``checkpoint_weights`` (derived from
                             the checkpoints, rewritten by every rerun)
  ``train_log.json``         loss per optimizer step (likewise derived)

Resume: every checkpoint directory is written complete under a temporary name and renamed, so a
``ckpt-<e>`` either is complete or does not exist. A rerun with the same config restarts after the
last complete checkpoint: the Trainer resumes from it (adapter, state), the Adam moments are put
back by canonical parameter name and the schedule continues at the step. Data order and dropout
are seeded per epoch, so a resumed run reproduces the uninterrupted one (on CPU exactly; on GPU up
to the kernels' non-determinism). The number of processes and the engine are part of the
fingerprint: they change the per-step batch, or the data order.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select import data, distributed as D
from rose_select.checkpoint import (
    HF_STATE,
    STATE,
    completed_epochs,
    import_trainer_run,
    load_moments_into,
    logs_from_checkpoints,
    save_checkpoint,
    step_log,
    write_base_model,
    write_logs,
)
from rose_select.config import from_args, require
from rose_select.errors import ConfigError, DataError
from rose_select.io import read_json, sha256_file, sha256_json, write_dir_atomically, write_json
from rose_select.modeling import (
    LoraSettings,
    ModelSettings,
    attach_lora,
    load_model,
    load_tokenizer,
)
from rose_select.records import InstructionRecord
from rose_select.runtime import progress_disabled, resolve_device
from rose_select.tokenization import TokenizeConfig, encode_record
from rose_select.train import rundir
from rose_select.train.engine import (
    Collator,
    EpochCallback,
    Examples,
    LoraSFTTrainer,
    ProgressBar,
    quiet_callbacks,
)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ENGINE = "hf-trainer-1"  # in the fingerprint: runs of the former hand-written loop are not resumed


@dataclass
class Schedule:
    """The optimisation schedule: the ``warmup`` and ``train`` sections of a run."""

    epochs: int = field(default=4, metadata={"help": "training epochs"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (paper: 2e-5)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear lr warm-up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=1, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=32, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA with float32 weights) | none | bf16 | fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (less memory, more compute)"})
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
            (self.mixed_precision in ("auto", "none", "bf16", "fp16"),
             f"mixed_precision must be auto|none|bf16|fp16, got {self.mixed_precision!r}"),
        ]
        require(checks)
        getattr(super(), "__post_init__", lambda: None)()


@dataclass
class TrainConfig(ModelSettings, Schedule):
    """LoRA SFT on a pool subset: a selection file, a random fraction, or the full pool."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    data: str = field(default="", metadata={"help": "instruction pool file (any format rose_select.data.load_pool reads)"})
    data_format: str = field(default="auto", metadata={"help": "pool format (auto: detect)"})
    selection: str | None = field(default=None, metadata={"help": "selected.jsonl to train on (records in the pool's own format)"})
    fraction: float | None = field(default=None, metadata={"help": "train on a seeded random fraction of the pool"})
    full: bool = field(default=False, metadata={"help": "train on the whole pool"})
    seed: int = field(default=42, metadata={"help": "seed of the subset, LoRA init, data order and dropout"})
    output: str = field(default="runs/train", metadata={"help": "run directory"})
    save_every_epoch: bool = field(default=False, metadata={"help": "write ckpt-<epoch>/ after every epoch (enables resume)"})
    limit: int | None = field(default=None, metadata={"help": "read at most this many pool records (smoke runs)"})
    on_too_long: str = field(default="error", metadata={"help": "error | skip: an example with no response token left after truncation"})

    RENAMED = {"dtype": "model_dtype"}

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.fraction is None or 0.0 < self.fraction <= 1.0, f"fraction must be in (0, 1], got {self.fraction}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.on_too_long in ("error", "skip"), f"on_too_long must be error|skip, got {self.on_too_long!r}"),
        ]
        require(checks)
        chosen = [name for name, on in (("selection", self.selection), ("fraction", self.fraction is not None),
                                        ("full", self.full)) if on]
        if len(chosen) > 1:
            raise ConfigError(f"give one of selection / fraction / full, got {chosen}")


@dataclass
class WarmupConfig(TrainConfig):
    """The warm-up run: a random 5% of the pool, a checkpoint with Adam moments per epoch."""

    fraction: float | None = field(default=None, metadata={"help": "seeded random fraction of the pool (default and paper: 0.05; none with full or selection)"})
    output: str = field(default="runs/warmup", metadata={"help": "run directory"})
    save_every_epoch: bool = field(default=True, metadata={"help": "write ckpt-<epoch>/ after every epoch (needed by featurize)"})

    def __post_init__(self):
        if self.fraction is None and not self.full and not self.selection:
            self.fraction = 0.05  # the default applies only when no other subset is chosen
        super().__post_init__()

# ---------------------------------------------------------------------------- small pure helpers


def choose_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded random ``fraction`` of ``n`` items (at least one)."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False).tolist())

# ---------------------------------------------------------------------------- data


def _records_for(cfg: TrainConfig, default_fraction: float | None) -> tuple[list[InstructionRecord], dict]:
    """The records to train on and a description of where they came from (for the fingerprint)."""

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

    encoded, ids, skipped = [], [], []
    for rec in records:
        try:
            encoded.append(encode_record(rec, tokenizer, cfg.tokenize))
            ids.append(rec.id)
        except DataError as e:
            if cfg.on_too_long == "error":  # tokenisation knows the record; name the file too
                raise DataError(f"{e.problem} (or train with on_too_long=skip)", path=e.path or cfg.selection
                                or cfg.data, record=e.record, field=e.field) from None
            skipped.append(rec.id)
    if not encoded:
        raise DataError("no trainable example (every example lost its response to truncation)")
    return encoded, ids, skipped

# ---------------------------------------------------------------------------- checkpoints


def _resume_view(ckpt: Path, tmp: Path) -> Path:
    """A directory to hand the Trainer as ``resume_from_checkpoint``: links to the checkpoint's
    files, with the Trainer's state under the name the Trainer reads (``trainer_state.json``
    itself is the project's record of the epoch)."""
    for f in ckpt.iterdir():
        if f.name not in (STATE, HF_STATE):
            os.symlink(f.resolve(), tmp / f.name)
    (tmp / STATE).write_bytes((ckpt / HF_STATE).read_bytes())
    return tmp

# ---------------------------------------------------------------------------- the Trainer


def training_arguments(cfg: TrainConfig, run_dir: Path):
    """The ``TrainingArguments`` of a run (the paper's schedule and optimizer, a log per step)."""
    from transformers import TrainingArguments

    device = resolve_device(cfg.device)
    if device.index is not None:
        raise ConfigError(f"device {cfg.device!r}: pick the GPU with CUDA_VISIBLE_DEVICES and give device cuda "
                          "(the Trainer uses cuda:LOCAL_RANK)")
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and cfg.model_dtype == "float32" else "none"
    if precision != "none" and device.type != "cuda":
        raise ConfigError(f"mixed_precision {precision} needs device cuda, got {device.type}")
    report = cfg.report_to if cfg.report_to in ("none", "all") else cfg.report_to.split(",")
    return TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        lr_scheduler_type="linear", warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, optim="adamw_torch",
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed, logging_strategy="steps",
        logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to=report, disable_tqdm=True,
        use_cpu=device.type == "cpu", bf16=precision == "bf16", fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        remove_unused_columns=False, label_names=["labels"], ddp_find_unused_parameters=False)


def _fit(cfg: TrainConfig, args, records: Sequence[InstructionRecord], run_dir: Path, *, checkpoints: bool,
         resume: Path | None):
    """Train a fresh LoRA adapter on ``records`` (resuming from ``resume``); with ``checkpoints``
    every epoch ends in a complete ``run_dir/ckpt-<epoch>/``. Returns (trainer, skipped ids)."""
    import torch

    tokenizer = load_tokenizer(cfg.model)
    encoded, ids, skipped = _encode_all(records, tokenizer, cfg)
    model = load_model(cfg.model, dtype=cfg.model_dtype, device="cpu")
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    model = attach_lora(model, cfg.lora)

    def save(epoch: int, model, optimizer, state):
        save_checkpoint(run_dir / f"ckpt-{epoch}", model, optimizer, state, base_model=cfg.model,
                        extra={"skipped_too_long": skipped, "n_examples": len(encoded)})
        logs_from_checkpoints(run_dir, cfg.epochs)

    trainer = LoraSFTTrainer(model=model, args=args, train_dataset=Examples(encoded),
                             data_collator=Collator(tokenizer.pad_token_id), example_ids=ids,
                             load_moments=load_moments_into,
                             callbacks=[EpochCallback(cfg.seed, save if checkpoints else None)])
    quiet_callbacks(trainer, ProgressBar(f"train {run_dir.name}", progress_disabled()))
    with tempfile.TemporaryDirectory(prefix="rose-resume-") as tmp:
        trainer.train(resume_from_checkpoint=str(_resume_view(resume, Path(tmp))) if resume else None)
    trainer.model.eval()
    return trainer, skipped


def _prepare_run(cfg: TrainConfig, chosen: Sequence[InstructionRecord], source: dict, extra: dict | None = None):
    """(run dir, TrainingArguments, whether this call created the dir): the config is checked or
    written by the main process first (under torchrun every process gets here)."""
    run_dir = Path(cfg.output)
    args = training_arguments(cfg, run_dir)
    created = False
    with args.main_process_first(desc="run directory"):
        if args.process_index == 0:
            created = rundir.prepare(run_dir, cfg, source, [r.id for r in chosen],
                                     extra={"engine": ENGINE, "processes": args.world_size})
            for name, content in (extra or {}).items():
                write_json(run_dir / name, content)
    return run_dir, args, created


def _fit_or_undo(cfg, args, chosen, run_dir: Path, created: bool, *, checkpoints: bool):
    """``_fit``, resuming after the last complete checkpoint; a first run that fails before its
    first result leaves no directory behind."""
    done = completed_epochs(run_dir) if checkpoints else []
    try:
        return _fit(cfg, args, chosen, run_dir, checkpoints=checkpoints,
                    resume=run_dir / f"ckpt-{done[-1]}" if done else None)
    except BaseException:
        if args.process_index == 0:
            rundir.undo_if_empty(run_dir, created)
        raise

# ---------------------------------------------------------------------------- stages


def run_warmup(cfg: TrainConfig, records: Sequence[InstructionRecord] | None = None) -> Path:
    """Warm-up LoRA training on a seeded random fraction of the pool (default 5%), one checkpoint
    with Adam moments per epoch. ``records``: an already-loaded pool instead of reading ``cfg.data``.
    Returns the run directory (idempotent: a finished run is returned as is)."""

    if records is None:
        chosen, source = _records_for(cfg, default_fraction=0.05)
    else:
        pool = list(records)[:cfg.limit] if cfg.limit else list(records)
        fraction = 1.0 if cfg.full else (cfg.fraction if cfg.fraction is not None else 0.05)
        chosen = [pool[i] for i in choose_subset(len(pool), fraction, cfg.seed)]
        source = {"records_sha256": sha256_json([r.id for r in pool])}
    ids = {"ids": [r.id for r in chosen], "fraction": cfg.fraction, "seed": cfg.seed}
    run_dir, args, created = _prepare_run(cfg, chosen, source, {"warmup_ids.json": ids})
    if completed_epochs(run_dir)[-1:] != [cfg.epochs]:
        _fit_or_undo(cfg, args, chosen, run_dir, created, checkpoints=True)
    if args.process_index == 0:  # also repairs logs of a run killed right after a checkpoint
        logs_from_checkpoints(run_dir, cfg.epochs)
    return run_dir


def run_train(cfg: TrainConfig, records: Sequence[InstructionRecord] | None = None) -> Path:
    """Final LoRA training on a selection file, a random fraction, or the full pool; writes
    ``adapter/`` (peft format) and ``train_log.json``. ``records``: train on these instead."""

    if records is None:
        chosen, source = _records_for(cfg, default_fraction=None)
    else:
        chosen, source = list(records), {"records_sha256": sha256_json([r.id for r in records])}
    run_dir, args, created = _prepare_run(cfg, chosen, source)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        trainer, skipped = _fit_or_undo(cfg, args, chosen, run_dir, created, checkpoints=cfg.save_every_epoch)

        def fill(tmp: Path):  # the log travels inside the adapter directory: no kill separates them
            trainer.model.save_pretrained(str(tmp))
            write_base_model(tmp, cfg.model)
            write_json(tmp / "train_log.json", {"steps": step_log(trainer.state), "skipped_too_long": skipped})

        if args.process_index == 0:
            write_dir_atomically(adapter, fill)
    if args.process_index == 0 and (adapter / "train_log.json").exists():
        log = read_json(adapter / "train_log.json")
        write_logs(run_dir, log["steps"], cfg.epochs, log["skipped_too_long"])
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

    cls = WarmupConfig if command == "warmup" else TrainConfig
    if getattr(args, "import_dir", None):

        cfg = from_args(cls, args, args.config)
        print(import_trainer_run(args.import_dir, cfg.output, model=cfg.model))
        return 0
    if args.nproc == 1:
        return None
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")

    return D.launch(command, from_args(cls, args, args.config), args.nproc)
