"""Pure loss functions on logits and labels (Hugging Face convention).

``labels`` use -100 for ignored positions (prompt, padding); positions are shifted by one, so
``logits[:, t]`` predicts ``labels[:, t + 1]``. Log-softmax is taken in float32 (or float64 when the
logits are float64), whatever the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rose_select.errors import ConfigError
from rose_select.tokenization import IGNORE_INDEX

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass
class DpoSettings:
    """DPO's β, one value wherever a run uses it: the pairwise loss featurize differentiates (β
    scales each triple's gradient and sets its weight σ(-β·margin); cosine scores with ``ref: auto``
    do not depend on it) and the implicit reward β·log(π/π_ref), reward margins and DPO loss
    evaluate reports (accuracy does not depend on it). A base of ``FeaturizeConfig``, ``EvalConfig``
    and ``RunConfig`` (the run's top-level ``beta``)."""

    beta: float = field(default=0.1, metadata={"help": "DPO beta: of the pairwise loss featurized and of the implicit reward evaluated"})

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        getattr(super(), "__post_init__", lambda: None)()


def _shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {list(logits.shape)} "
                         f"and {list(labels.shape)}")
    logits = logits[:, :-1]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    return logits, target.masked_fill(~mask, 0), mask


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of every next token, ``[B, T-1]``; 0 where the label is ignored."""
    logits, target, mask = _shift(logits, labels)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return lp * mask


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probability of each example's response tokens, ``[B]``."""
    return token_logprobs(logits, labels).sum(-1)


def sft_loss_per_example(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy over each example's own response tokens, ``[B]``.
    An example with no response token gets loss 0 (and so a zero gradient)."""
    logits, target, mask = _shift(logits, labels)
    ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * mask
    return ce.sum(-1) / mask.sum(-1).clamp(min=1)


def sum_per_row(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Sum of packed per-token ``values`` into their batch ``rows``: ``[n_rows]``."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def packed_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probability of each packed response token: ``logits [n, V]``, ``targets [n]`` -> ``[n]``."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sft_loss_from_packed(logp: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """``sft_loss_per_example`` from packed token log-probs: mean over each row's own tokens."""
    count = sum_per_row(torch.ones_like(logp), rows, n_rows)
    return -sum_per_row(logp, rows, n_rows) / count.clamp(min=1)


def dpo_loss(pol_w: Tensor, pol_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float = 0.1) -> Tensor:
    """DPO loss per triple: ``-logsigmoid(beta * ((pol_w - ref_w) - (pol_l - ref_l)))``."""
    return -F.logsigmoid(beta * ((pol_w - ref_w) - (pol_l - ref_l)))

# --------------------------------------------------------------------------- on a model: the engine's losses
# (shared by featurization, training and evaluation, so none of them imports another's wing)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def forward_logits(model, batch: dict) -> Tensor:
    return model(**model_inputs(batch), use_cache=False).logits


def response_logprobs(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the response tokens only, packed: ``(logp [n], row [n])``.

    The output head and the log-softmax run only where a label is predicted: a pre-hook on the
    model's output embeddings hands it the hidden states of those positions. Over a 50k vocabulary
    the head and softmax are a large share of a small model's cost, and prompt positions need
    neither. Equal to ``losses.token_logprobs`` at the response positions (tested).
    """

    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX

    def select(_mod, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            raise ConfigError(f"the output head received hidden states {list(hidden.shape)}; expected "
                              f"[batch, seq, hidden] = {list(keep.shape)} + [...] (an unusual model head?)")
        return (hidden[keep], *args[1:])

    owner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    handle = owner.get_output_embeddings().register_forward_pre_hook(select)
    try:
        logits = model(**model_inputs(batch), use_cache=False).logits
    finally:
        handle.remove()
    targets = labels[:, 1:][keep[:, :-1]]
    return packed_logprobs(logits, targets), keep.nonzero()[:, 0]


def sft_loss_fn(model, batch: dict) -> Tensor:
    """Per-row SFT loss (mean token cross-entropy over response tokens)."""
    logp, rows = response_logprobs(model, batch)
    return sft_loss_from_packed(logp, rows, batch["labels"].shape[0])


def sequence_logprob_of(model, batch: dict) -> Tensor:
    """Per-row summed log-probability of the response tokens (DPO's sequence log-prob)."""
    logp, rows = response_logprobs(model, batch)
    return sum_per_row(logp, rows, batch["labels"].shape[0])
