"""The training engine: LoRA SFT on Hugging Face's ``Trainer`` (accelerate underneath), so one
run scales from a laptop CPU to several GPUs under ``torchrun`` (DDP) without a second loop.

What the Trainer is given, and why:

- The loss is the featurizer's (``losses.sft_loss_fn``): per example, the mean token
  cross-entropy over response tokens; an optimizer step averages it over the examples of the
  whole effective batch (micro-batches x accumulation x processes). ``get_batch_samples`` counts
  those examples once per step (summed over processes), and ``compute_loss`` returns
  ``sum(example losses) * processes / examples``, which DDP's gradient average turns into exactly
  the mean over the effective batch, whatever its split into processes and micro-batches.
- AdamW (betas 0.9/0.999, eps 1e-8: what the featurizer's Adam preconditioning assumes), gradient
  clipping, and transformers' linear schedule with warm-up (``warmup_steps`` < 1 is a ratio of the
  total steps, rounded up).
- Randomness of an epoch: the data order comes from accelerate's seedable sampler (seed + epoch),
  and LoRA dropout from a torch seed set by ``EpochCallback`` at the start of every epoch from
  ``(seed, epoch)``. A run resumed after epoch ``e`` therefore replays epochs ``e+1..`` exactly.
- Resume reads the project's own checkpoint (``checkpoint.py``: adapter + Adam moments by parameter
  name in safetensors + ``trainer_state.json``): the Trainer loads the adapter and the state;
  ``_load_optimizer_and_scheduler`` puts the moments back and moves the schedule to the step.
  No pickled optimizer/scheduler/RNG files are written or read.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rose_select.errors import CheckpointError, NonFiniteError
from rose_select.losses import sft_loss_fn
from rose_select.tokenization import collate


class Examples(torch.utils.data.Dataset):
    """Encoded examples (``input_ids``, ``labels``) with their position, for error messages."""

    def __init__(self, encoded: list[dict]):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        return {**self.encoded[i], "index": i}


class Collator:
    """The project's padding (``tokenization.collate``) plus each row's example index."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        batch = collate(rows, self.pad_id)
        batch["index"] = torch.tensor([r["index"] for r in rows])
        return batch


def epoch_torch_seed(seed: int, epoch: int) -> int:
    """The torch seed of epoch ``epoch`` (1-based): LoRA dropout draws from it."""
    return int(np.random.default_rng([seed, epoch, 1]).integers(0, 2**63 - 1))


def fast_forward_schedule(scheduler, optimizer, step: int) -> None:
    """Put a LambdaLR schedule (transformers' linear one) at optimizer step ``step``."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise CheckpointError(f"cannot resume a {type(scheduler).__name__} schedule (only LambdaLR)")
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.last_epoch = step
    scheduler._last_lr = lrs


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class LoraSFTTrainer(Trainer):
    """``Trainer`` with the project's loss and resume from the project's checkpoint format.

    ``load_moments(ckpt_dir, model, optimizer, step)`` puts a checkpoint's Adam moments into the
    optimizer (the checkpoint format lives in ``checkpoint.py``)."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, example_ids: list[str], load_moments, **kwargs):
        super().__init__(*args, **kwargs)
        self.example_ids, self.load_moments = example_ids, load_moments
        self._step_examples = 1

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        n = torch.tensor(sum(len(b["input_ids"]) for b in batches), device=device)
        if self.accelerator.num_processes > 1:
            n = self.accelerator.reduce(n, reduction="sum")
        self._step_examples = max(1, int(n))
        return batches, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("index")
        losses = sft_loss_fn(model, inputs)
        if not torch.isfinite(losses).all():
            bad = [self.example_ids[int(index[j])] for j in torch.nonzero(~torch.isfinite(losses)).flatten()]
            raise NonFiniteError(f"non-finite training loss for example(s) {bad}")
        loss = losses.float().sum() * self.accelerator.num_processes / self._step_examples
        return (loss, None) if return_outputs else loss

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        inner = unwrap_optimizer(self.optimizer)
        self.load_moments(checkpoint, self.model, inner, self.state.global_step)
        fast_forward_schedule(self.lr_scheduler, inner, self.state.global_step)


class EpochCallback(TrainerCallback):
    """Seeds every epoch, and hands each finished epoch to ``save(epoch, model, optimizer,
    state)`` on the main process (``save=None``: no checkpoints)."""

    def __init__(self, seed: int, save=None):
        self.seed, self.save = seed, save

    @staticmethod
    def epoch_of(state) -> int:
        """1-based index of the epoch that the next optimizer step belongs to."""
        per_epoch = max(1, state.max_steps // max(1, int(state.num_train_epochs)))
        return state.global_step // per_epoch + 1

    def on_epoch_begin(self, args, state, control, **kwargs):
        torch.manual_seed(epoch_torch_seed(self.seed, self.epoch_of(state)))

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.save is not None and state.is_world_process_zero:
            self.save(self.epoch_of(state) - 1, model, unwrap_optimizer(optimizer), state)


class ProgressBar(TrainerCallback):
    """One tqdm bar on the main process, loss and lr as its postfix (instead of the Trainer's
    printed log dictionaries)."""

    def __init__(self, desc: str, disable: bool):
        self.desc, self.disable, self.bar = desc, disable, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, disable=self.disable)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.n = state.global_step
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def quiet_callbacks(trainer: Trainer, progress: ProgressBar) -> None:
    """Swap the Trainer's printers (a dict per logged step) for our progress bar."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
