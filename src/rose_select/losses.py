"""Pure loss functions on logits and labels (Hugging Face convention).

``labels`` use -100 for ignored positions (prompt, padding); positions are shifted by one, so
``logits[:, t]`` predicts ``labels[:, t + 1]``. Log-softmax is taken in float32 (or float64 when the
logits are float64), whatever the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rose_select.tokenization import IGNORE_INDEX


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
