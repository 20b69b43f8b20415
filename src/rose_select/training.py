"""LoRA SFT training: the warm-up run (ROSE/LESS step 1) and the final fine-tune (step 7).

One plain PyTorch loop serves both. The loss is exactly the one the featurizer differentiates:
per example, the mean token cross-entropy over response tokens
(``losses.sft_loss_per_example``), averaged over the examples of an optimizer step (with gradient
accumulation the average runs over the whole effective batch, not over micro-batches).

Optimizer: AdamW (betas 0.9/0.999, eps 1e-8, the defaults the featurizer's Adam
preconditioning assumes), gradient clipping, and a linear schedule with warm-up computed in
closed form from the step index (``linear_schedule_lr``, the same formula as transformers'
``get_linear_schedule_with_warmup``), so it needs no saved scheduler state.

Warm-up artifacts (``run_warmup``), in the run directory:
  ``config.json``            resolved config + fingerprint (a rerun with other settings is refused)
  ``warmup_ids.json``        ids of the random pool subset trained on
  ``ckpt-<epoch>/``          ``adapter_model.safetensors`` + ``adapter_config.json`` (peft format),
                             ``optimizer_state.safetensors`` (``exp_avg/<name>``,
                             ``exp_avg_sq/<name>``, metadata step/betas/eps), ``trainer_state.json``
                             (the epoch's steps with lr and loss, and their mean lr: see
                             ``checkpoints.py``)
  ``lr_log.json``            per-step lr, ``epoch_mean_lr``, ``checkpoint_weights`` (derived from
                             the checkpoints, rewritten by every rerun)
  ``train_log.json``         loss per optimizer step (likewise derived)

Resume: every checkpoint directory is written under a temporary name and renamed, so a
``ckpt-<e>`` either is complete or does not exist. A rerun with the same config restarts after the
last complete checkpoint: adapter weights and Adam moments (and step) are loaded by canonical
parameter name, and the schedule position follows from the step count. All randomness of an
epoch (data order, LoRA dropout) is drawn from generators seeded by ``(seed, epoch)`` at the start
of that epoch, so a resumed run reproduces the uninterrupted one exactly (up to the
non-determinism of the device's kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select import rundir
from rose_select.checkpoints import completed_epochs, logged_steps, write_checkpoint
from rose_select.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from rose_select.io import read_json, write_dir_atomically, write_json
from rose_select.modeling import LoraSettings, ModelSettings
from rose_select.runtime import progress_disabled, resolve_device
from rose_select.records import InstructionRecord
from rose_select.tokenization import TokenizeConfig

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


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

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
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

    fraction: float | None = field(default=None, metadata={"help": "seeded random fraction of the pool (default and paper: 0.05; none with full or selection)"})
    output: str = field(default="runs/warmup", metadata={"help": "run directory"})
    save_every_epoch: bool = field(default=True, metadata={"help": "write ckpt-<epoch>/ after every epoch (needed by featurize)"})

    def __post_init__(self):
        if self.fraction is None and not self.full and not self.selection:
            self.fraction = 0.05  # the default applies only when no other subset is chosen
        super().__post_init__()


# ---------------------------------------------------------------------------- small pure helpers

def linear_schedule_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """lr of optimizer step ``step`` (0-based): linear warm-up from 0, then linear decay to 0."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def warmup_steps_for(total_steps: int, ratio: float) -> int:
    return math.ceil(total_steps * ratio)


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; a partial accumulation at the end of an epoch is one more step."""
    return math.ceil(math.ceil(n_examples / batch_size) / grad_accum)


def epoch_batches(n_examples: int, batch_size: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """The epoch's data order: optimizer steps, each a list of micro-batches of example indices."""
    order = np.random.default_rng([seed, epoch]).permutation(n_examples).tolist()
    micro = [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]
    return [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]


def choose_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of a seeded random ``fraction`` of ``n`` items (at least one)."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False).tolist())


def _epoch_torch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 1]).integers(0, 2**63 - 1))


# ---------------------------------------------------------------------------- loss

def per_example_loss(model, batch: dict):
    """Response-only SFT loss of every example of a collated batch: ``[B]`` mean token CE; the
    very function the featurizer differentiates (output head at response positions only)."""
    from rose_select.features.gradients import sft_loss_fn

    return sft_loss_fn(model, batch)


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
        except DataError as e:
            if cfg.on_too_long == "error":  # tokenisation knows the record; name the file too
                raise DataError(f"{e.problem} (or train with on_too_long=skip)", path=e.path or cfg.selection
                                or cfg.data, record=e.record, field=e.field) from None
            skipped.append(rec.id)
    if not encoded:
        raise DataError("no trainable example (every example lost its response to truncation)")
    return encoded, ids, skipped


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt_dir: Path, model, optimizer, *, epoch: int, step: int, steps: Sequence[dict],
                    extra: dict | None = None) -> None:
    from rose_select.modeling import save_optimizer_state

    def fill(tmp: Path):
        model.save_pretrained(str(tmp))
        save_optimizer_state(tmp / "optimizer_state.safetensors", model, optimizer, step=step)

    write_checkpoint(ckpt_dir, fill, epoch=epoch, step=step, steps=steps, **(extra or {}))


def load_checkpoint_into(ckpt_dir: Path, model, optimizer) -> int:
    """Load adapter weights and Adam moments (by canonical name) into a fresh model/optimizer;
    returns the optimizer step the checkpoint was taken at."""
    import torch
    from safetensors.torch import load_file

    from rose_select.modeling import canonical_name, lora_parameters, load_optimizer_state

    params = lora_parameters(model)
    weights_path = Path(ckpt_dir) / "adapter_model.safetensors"
    if not weights_path.exists():
        raise CheckpointError(f"{ckpt_dir}: no adapter_model.safetensors")
    stored = {canonical_name(k): v for k, v in load_file(str(weights_path)).items()}
    missing = [n for n in params if n not in stored]
    if missing:
        raise CheckpointError(f"{weights_path}: lacks {len(missing)} LoRA parameters, e.g. {missing[:3]}")
    moments, meta = load_optimizer_state(ckpt_dir, list(params))
    step = int(meta.get("step", 0))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(stored[name].to(p.dtype))
            m, v = moments[name]
            optimizer.state[p] = {"step": torch.tensor(float(step)),
                                  "exp_avg": m.to(device=p.device, dtype=p.dtype),
                                  "exp_avg_sq": v.to(device=p.device, dtype=p.dtype)}
    return step


# ---------------------------------------------------------------------------- the loop

def _build(cfg: TrainConfig):
    import torch

    from rose_select.modeling import attach_lora, load_model, load_tokenizer

    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=cfg.model_dtype, device=device)
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    model = attach_lora(model, cfg.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                  weight_decay=cfg.weight_decay)
    return model, tokenizer, optimizer, device


def _train_step(model, optimizer, micro_batches, encoded, ids, pad_id, device, cfg, lr) -> float:
    """One optimizer step over its micro-batches; returns the mean per-example loss."""
    import torch

    from rose_select.tokenization import collate

    n = sum(len(mb) for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in mb], pad_id).items()}
        losses = per_example_loss(model, batch)
        if not torch.isfinite(losses).all():
            bad = [ids[mb[j]] for j in torch.nonzero(~torch.isfinite(losses)).flatten().tolist()]
            raise NonFiniteError(f"non-finite training loss for example(s) {bad}")
        (losses.float().sum() / n).backward()
        total += float(losses.detach().float().sum())
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n


def train_loop(cfg: TrainConfig, records: Sequence[InstructionRecord], run_dir: Path, *, checkpoints: bool):
    """Train a fresh LoRA adapter on ``records``; returns (model, step log).

    With ``checkpoints`` every epoch ends in ``run_dir/ckpt-<epoch>/`` and training resumes after
    the last complete one found there.
    """
    import torch
    from tqdm.auto import tqdm

    model, tokenizer, optimizer, device = _build(cfg)
    encoded, ids, skipped = _encode_all(records, tokenizer, cfg)
    per_epoch = steps_per_epoch(len(encoded), cfg.batch_size, cfg.grad_accum)
    total = per_epoch * cfg.epochs
    warm = warmup_steps_for(total, cfg.warmup_ratio)
    done = completed_epochs(run_dir) if checkpoints else []
    start_epoch, step, log = 1, 0, []
    if done:
        last = min(done[-1], cfg.epochs)
        step = load_checkpoint_into(run_dir / f"ckpt-{last}", model, optimizer)
        if step != last * per_epoch:
            raise CheckpointError(f"{run_dir}/ckpt-{last}: step {step}, expected {last * per_epoch}")
        start_epoch, log = last + 1, logged_steps(run_dir, last)
    model.train()
    bar = tqdm(total=total, initial=step, desc=f"train {run_dir.name}", disable=progress_disabled())
    for epoch in range(start_epoch, cfg.epochs + 1):
        torch.manual_seed(_epoch_torch_seed(cfg.seed, epoch))  # LoRA dropout of this epoch
        for micro_batches in epoch_batches(len(encoded), cfg.batch_size, cfg.grad_accum, cfg.seed, epoch):
            lr = linear_schedule_lr(step, total, warm, cfg.lr)
            loss = _train_step(model, optimizer, micro_batches, encoded, ids, tokenizer.pad_token_id, device, cfg, lr)
            step += 1
            log.append({"step": step, "epoch": epoch, "lr": lr, "loss": loss})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
        if checkpoints:
            epoch_losses = [s["loss"] for s in log if s["epoch"] == epoch]
            save_checkpoint(run_dir / f"ckpt-{epoch}", model, optimizer, epoch=epoch, step=step,
                            steps=[s for s in log if s["epoch"] == epoch],
                            extra={"steps_per_epoch": per_epoch, "total_steps": total, "skipped_too_long": skipped,
                                   "epoch_mean_loss": float(np.mean(epoch_losses)), "n_examples": len(encoded)})
            rundir.write_logs(run_dir, log, cfg.epochs, skipped)
    bar.close()
    model.eval()
    return model, log, skipped


# ---------------------------------------------------------------------------- stages

def run_warmup(cfg: TrainConfig, records: Sequence[InstructionRecord] | None = None) -> Path:
    """Warm-up LoRA training on a seeded random fraction of the pool (default 5%), one checkpoint
    with Adam moments per epoch. ``records``: an already-loaded pool instead of reading ``cfg.data``.
    Returns the run directory (idempotent: a finished run is returned as is)."""
    from rose_select.io import sha256_json

    run_dir = Path(cfg.output)
    if records is None:
        chosen, source = _records_for(cfg, default_fraction=0.05)
    else:
        pool = list(records)[:cfg.limit] if cfg.limit else list(records)
        fraction = 1.0 if cfg.full else (cfg.fraction if cfg.fraction is not None else 0.05)
        chosen = [pool[i] for i in choose_subset(len(pool), fraction, cfg.seed)]
        source = {"records_sha256": sha256_json([r.id for r in pool])}
    created = rundir.prepare(run_dir, cfg, source, [r.id for r in chosen])
    write_json(run_dir / "warmup_ids.json", {"ids": [r.id for r in chosen], "fraction": cfg.fraction, "seed": cfg.seed})
    if completed_epochs(run_dir)[-1:] != [cfg.epochs]:
        try:
            train_loop(cfg, chosen, run_dir, checkpoints=True)
        except BaseException:
            rundir.undo_if_empty(run_dir, created)
            raise
    rundir.logs_from_checkpoints(run_dir, cfg.epochs)
    return run_dir


def run_train(cfg: TrainConfig, records: Sequence[InstructionRecord] | None = None) -> Path:
    """Final LoRA training on a selection file, a random fraction, or the full pool; writes
    ``adapter/`` (peft format) and ``train_log.json``. ``records``: train on these instead."""
    from rose_select.io import sha256_json

    run_dir = Path(cfg.output)
    if records is None:
        chosen, source = _records_for(cfg, default_fraction=None)
    else:
        chosen, source = list(records), {"records_sha256": sha256_json([r.id for r in records])}
    created = rundir.prepare(run_dir, cfg, source, [r.id for r in chosen])
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        try:
            model, log, skipped = train_loop(cfg, chosen, run_dir, checkpoints=cfg.save_every_epoch)
        except BaseException:
            rundir.undo_if_empty(run_dir, created)
            raise

        def fill(tmp: Path):  # the log travels inside the adapter directory: no kill separates them
            model.save_pretrained(str(tmp))
            write_json(tmp / "train_log.json", {"steps": log, "skipped_too_long": skipped})

        write_dir_atomically(run_dir / "adapter", fill)
    if (run_dir / "adapter" / "train_log.json").exists():
        log = read_json(run_dir / "adapter" / "train_log.json")
        rundir.write_logs(run_dir, log["steps"], cfg.epochs, log["skipped_too_long"])
    return run_dir
