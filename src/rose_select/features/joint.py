"""One validation pass: ROSE's pairwise features and LESS's chosen-answer features together.

Both validation feature kinds are linear combinations of the same per-row gradients. With
``G_r = proj(-grad log pi(y_r | x))`` for the chosen row ``w`` and the rejected row ``l`` of a triple
(summed token log-probabilities of the response):

    pairwise (DPO):     grad L_DPO = beta * sigma(-z) * (G_w - G_l),
                        z = beta * ((log pi_w - log ref_w) - (log pi_l - log ref_l))
    sft_chosen (LESS):  grad of the mean token loss of the chosen answer = G_w / n_w

(``n_w``: the chosen answer's response tokens). Projection is linear, so projecting each row and
then combining equals projecting the combined gradient. One forward and one backward over the
chosen + rejected rows therefore yield both stores' rows; the separate passes did the chosen
rows twice.

The reference: ``sigma(-z)`` is one positive scalar per triple. Cosine scoring (ROSE, KNN-Shapley)
L2-normalises each triple's feature, so the scalar, and with it the reference model, cancels
exactly. ``ref="auto"`` skips the reference forward and uses ``sigma(0) = 1/2`` (the weight of
``ref="self"``); the store records this as ``pair_scale: "unweighted"`` and consumers that need
the true DPO scale (the influence baseline) refuse such a store.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rose_select.errors import ConfigError
from rose_select.features.gradients import _autocast, _check_finite, per_example_features
from rose_select.losses import response_logprobs
from rose_select.losses import sum_per_row
from rose_select.modeling import load_model

REFS = ("auto", "base", "self")


def pair_scale(ref: str) -> str:
    """What a pairwise store's rows carry: the DPO gradient (``dpo``) or the same direction with
    the per-triple weight ``sigma(-z)`` replaced by 1/2 (``unweighted``, ``ref: auto``)."""
    return "unweighted" if ref == "auto" else "dpo"


def load_reference(ref: str, model_dtype: str, device):
    """The pairwise reference: ``auto`` runs as ``self`` (the same numbers, sigma(0) = 1/2, and no
    extra forward), ``base``/``self`` as named, anything else is a model path (frozen)."""

    if ref in REFS:
        return "self" if ref == "auto" else ref
    model = load_model(ref, dtype=model_dtype, device=str(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class RowLogprobs:
    """``loss_fn`` of the joint pass: ``-log pi(y_r | x)`` per batch row (summed over the
    response tokens); remembers the values and the token counts of the last call."""

    def __init__(self):
        self.logp: Tensor | None = None
        self.count: Tensor | None = None

    def __call__(self, model, batch: dict) -> Tensor:
        logp, rows = response_logprobs(model, batch)
        n = batch["labels"].shape[0]
        self.logp = sum_per_row(logp.detach().float(), rows, n)
        self.count = sum_per_row(torch.ones_like(logp, dtype=torch.float32), rows, n)
        return -sum_per_row(logp, rows, n)


def reference_logprobs(model, batch: dict, ref) -> Tensor | None:
    """``[rows]`` reference log-probabilities: adapters off (``base``), a separate model, or None
    (``auto``/``self``: the policy itself, z = 0)."""
    if isinstance(ref, str) and ref in ("auto", "self"):
        return None
    with torch.no_grad():
        if isinstance(ref, str) and ref == "base":
            with model.disable_adapter():
                logp, rows = response_logprobs(model, batch)
        elif isinstance(ref, str):
            raise ConfigError(f"ref must be one of {list(REFS)} or a model, got {ref!r}")
        else:
            logp, rows = response_logprobs(ref, batch)
    return sum_per_row(logp.float(), rows, batch["labels"].shape[0])


def combine(rows: Tensor, pol: Tensor, count: Tensor, ref: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """``(pairwise [n, d], sft_chosen [n, d])`` from the ``[2n, d]`` per-row features
    ``G_r = proj(-grad log pi_r)`` (rows ``[:n]`` chosen, ``[n:]`` rejected)."""
    n = rows.shape[0] // 2
    delta = None if ref is None else pol - ref
    z = torch.zeros(n, device=rows.device) if delta is None else beta * (delta[:n] - delta[n:])
    weight = beta * torch.sigmoid(-z)
    pairwise = weight[:, None].to(rows.dtype) * (rows[:n] - rows[n:])
    sft = rows[:n] / count[:n].clamp(min=1)[:, None].to(rows.dtype)
    return pairwise, sft


def joint_features(model, batch: dict, projector, *, ref, beta: float, item_ids, autocast_dtype=None) -> Tensor:
    """``[n, 2 * dim]``: pairwise features in columns ``[:dim]``, sft_chosen in ``[dim:]``, of the
    ``n`` triples of a ``2n``-row batch (rows ``[:n]`` chosen, ``[n:]`` rejected), in one pass."""
    n = batch["input_ids"].shape[0] // 2
    ids = [str(i) for i in item_ids]
    row_ids = [f"{i} (chosen)" for i in ids] + [f"{i} (rejected)" for i in ids]
    row_loss = RowLogprobs()
    rows = per_example_features(model, batch, row_loss, projector, n_items=2 * n, item_ids=row_ids,
                                autocast_dtype=autocast_dtype)
    with _autocast(batch["input_ids"].device, autocast_dtype):
        ref_lp = reference_logprobs(model, batch, ref)
    pairwise, sft = combine(rows, row_loss.logp, row_loss.count, ref_lp, beta)
    _check_finite(pairwise, ids)
    return torch.cat([pairwise, sft], dim=1)
