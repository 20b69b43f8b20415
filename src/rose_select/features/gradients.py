"""Per-example LoRA gradients in one forward and one backward pass per batch.

For a LoRA layer ``y = W x + s * B (A x)`` the gradient of example ``b``'s loss is

    G_B[b] = sum_t  dB[b, t]^T h[b, t]          (h = A x, the lora_B input)
    G_A[b] = sum_t (dB[b, t] W_B)^T x[b, t]     (x, the lora_A input)

where ``dB = d(total loss)/d(lora_B output)``. Examples in a batch do not interact, so the
gradient of the summed loss with respect to row ``b``'s activations is the gradient of row ``b``'s
own loss: one backward of the batch total yields every per-row gradient. Forward hooks record
``x`` and ``h``; a tensor hook on every lora_B output receives ``dB`` during the backward pass,
forms that module's per-row gradients, Adam-transforms them (optional) and projects them into a
``[rows, dim]`` accumulator at once, so only one module's per-row gradients exist at a time.

The backward pass is ``torch.autograd.grad(total, input_embeddings_output)``: it propagates the
activation gradients the hooks need and computes no parameter gradient at all (training's weight
gradient GEMMs are replaced by the per-example contractions above).

Losses are opaque to the engine: ``loss_fn(model, batch) -> [n_items]`` losses, and a
``row_to_item`` map says which output item each batch row belongs to. A pairwise (DPO) item has
two rows, chosen and rejected; its gradient is the sum of its rows' gradients, so its feature is
``proj(g_chosen_row) + proj(g_rejected_row)`` (projections are linear). Adam preconditioning is
nonlinear and therefore needs one row per item.

Features are taken with the model in eval mode: LoRA dropout is off.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from rose_select.errors import ConfigError, NonFiniteError
from rose_select.features.projection import project_full
from rose_select.losses import dpo_loss, sequence_logprob_of, sft_loss_fn
from rose_select.modeling import lora_parameters
from rose_select.checkpoint import checkpoint_moments

LossFn = Callable[[object, dict], Tensor]

# --------------------------------------------------------------------------- Adam preconditioning


@dataclass
class AdamState:
    """First/second Adam moments by canonical parameter name (LESS's preconditioning)."""

    moments: dict  # name -> (exp_avg, exp_avg_sq), shaped like the parameter
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    _terms: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # see ``apply``

    def to(self, device, dtype=torch.float32) -> "AdamState":
        moved = {n: (m.to(device, dtype).reshape(-1), v.to(device, dtype).reshape(-1))
                 for n, (m, v) in self.moments.items()}
        return AdamState(moved, self.beta1, self.beta2, self.eps)

    def apply(self, name: str, g: Tensor) -> Tensor:
        """``adam_transform`` of a ``[B, P]`` block, with the per-parameter terms ``beta1 m`` and
        ``beta2 v + eps`` computed once per checkpoint: four passes over the block instead of nine
        (the transform is a large share of featurization time at high LoRA rank)."""
        if name not in self._terms:
            m, v = self.moments[name]
            m, v = m.reshape(-1), v.reshape(-1)
            self._terms[name] = (self.beta1 * m, self.beta2 * v + self.eps)
        m_term, v_term = self._terms[name]
        g = g.to(m_term.dtype)
        denom = torch.addcmul(v_term, g, g, value=1 - self.beta2).sqrt_()
        return torch.add(m_term, g, alpha=1 - self.beta1).div_(denom)


def adam_transform(g: Tensor, m: Tensor, v: Tensor, beta1: float = 0.9, beta2: float = 0.999,
                   eps: float = 1e-8) -> Tensor:
    """LESS's Adam feature: ``m' / sqrt(v' + eps)`` with ``m' = b1 m + (1-b1) g`` and
    ``v' = b2 v + (1-b2) g^2`` (no bias correction, eps inside the root). ``g`` is ``[B, P]``."""
    if g.ndim == 2:
        m, v = m.reshape(-1), v.reshape(-1)
    m_new = beta1 * m.to(g.dtype) + (1 - beta1) * g
    v_new = beta2 * v.to(g.dtype) + (1 - beta2) * g * g
    return m_new / torch.sqrt(v_new + eps)


def load_adam_state(ckpt_dir, model, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                    device="cpu") -> AdamState:
    """The checkpoint's Adam moments (``optimizer_state.safetensors``, or a Hugging Face Trainer's
    ``optimizer.pt``/``optimizer.bin``) for ``model``'s LoRA parameters."""
    return AdamState(checkpoint_moments(ckpt_dir, model), beta1, beta2, eps).to(device)

# --------------------------------------------------------------------------- LoRA modules


@dataclass
class LoraPair:
    a_name: str  # canonical parameter names
    b_name: str
    lora_A: torch.nn.Module
    lora_B: torch.nn.Module


def lora_pairs(model) -> "OrderedDict[str, LoraPair]":
    """Every trainable LoRA (A, B) pair by lora_B canonical name; refuses other trainable params."""
    params = lora_parameters(model)
    by_id = {id(p): n for n, p in params.items()}
    found: dict[str, torch.nn.Module] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) in by_id:
            found[by_id[id(mod.weight)]] = mod
    pairs = OrderedDict()
    for name in params:
        if name.endswith(".lora_B.weight"):
            a_name = name[: -len(".lora_B.weight")] + ".lora_A.weight"
            if a_name not in found or name not in found:
                raise ConfigError(f"LoRA parameter {name!r} has no matching lora_A/lora_B linear module")
            pairs[name] = LoraPair(a_name, name, found[a_name], found[name])
    covered = {n for p in pairs.values() for n in (p.a_name, p.b_name)}
    other = [n for n in params if n not in covered]
    if other:
        raise ConfigError(f"per-example gradients support LoRA A/B matrices only; the model also trains "
                          f"{len(other)} other parameter(s), e.g. {other[:3]} (biases, DoRA magnitudes, "
                          "embeddings?)")
    for p in pairs.values():
        if p.lora_A.bias is not None or p.lora_B.bias is not None:
            raise ConfigError(f"LoRA module {p.b_name!r} has a bias; only bias-free LoRA is supported")
    return pairs


def param_numels(model) -> "OrderedDict[str, int]":
    return OrderedDict((n, p.numel()) for n, p in lora_parameters(model).items())

# --------------------------------------------------------------------------- the engine


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Emitter:
    """Receives per-row gradient blocks, Adam-transforms them, and adds them to ``out``."""

    def __init__(self, out: Tensor, projector, adam: AdamState | None, offsets: dict | None):
        self.out, self.projector, self.adam, self.offsets = out, projector, adam, offsets
        self.seen: set[str] = set()

    def __call__(self, name: str, g: Tensor) -> None:
        self.seen.add(name)
        if self.adam is not None:
            g = self.adam.apply(name, g)
        if self.projector is None:
            off = self.offsets[name]
            self.out[:, off[0]:off[1]] = g.to(self.out.dtype)
        else:
            self.projector.accumulate(self.out, name, g)


def _exact_offsets(numels: dict) -> tuple[dict, int]:
    offsets, start = {}, 0
    for n, k in numels.items():
        offsets[n] = (start, start + k)
        start += k
    return offsets, start


class _GradientHooks:
    """The hooks of one forward/backward: forward hooks keep each LoRA layer's inputs (``x`` of
    lora_A, ``h`` of lora_B); a tensor hook on every lora_B output receives ``dB`` in the backward
    pass and hands that layer's per-row gradients to ``emit``; the input-embedding output is the
    tensor the backward starts from. A context manager: the hooks exist only inside it."""

    def __init__(self, model, pairs: dict, emit, rows: int):
        self.model, self.pairs, self.emit, self.rows = model, pairs, emit, rows
        self.saved: dict[str, Tensor] = {}
        self.emb: list[Tensor] = []
        self.handles: list = []

    def __enter__(self) -> "_GradientHooks":
        for pair in self.pairs.values():
            self.handles.append(pair.lora_A.register_forward_hook(self._keep_input(pair.a_name)))
            self.handles.append(pair.lora_B.register_forward_hook(self._on_b_output(pair)))
        self.handles.append(self.model.get_input_embeddings().register_forward_hook(self._embedding_output))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.saved.clear()
        self.emb.clear()

    def backward(self, losses: Tensor) -> None:
        """Propagate activation gradients only (no parameter gradient is formed)."""
        if len(self.emb) != 1:
            raise ConfigError(f"expected one input-embedding call in the forward pass, saw {len(self.emb)}")
        torch.autograd.grad(losses.sum(), self.emb, allow_unused=True)

    def _keep_input(self, name: str):
        def hook(_mod, inputs, _output):
            if torch.is_grad_enabled():
                self.saved[name] = inputs[0]
        return hook

    def _on_b_output(self, pair: LoraPair):
        def hook(_mod, inputs, output):
            if torch.is_grad_enabled():
                self.saved[pair.b_name] = inputs[0]
                output.register_hook(lambda dB: self._layer_gradients(pair, dB))
        return hook

    def _layer_gradients(self, pair: LoraPair, dB: Tensor) -> None:
        x, h = self.saved.pop(pair.a_name), self.saved.pop(pair.b_name)
        ct = dB.dtype
        gB = torch.einsum("bto,btr->bor", dB, h.to(ct))
        dA = dB @ pair.lora_B.weight.to(ct)
        del dB
        gA = torch.einsum("btr,bti->bri", dA, x.to(ct))
        del dA
        self.emit(pair.a_name, gA.reshape(self.rows, -1))
        del gA
        self.emit(pair.b_name, gB.reshape(self.rows, -1))

    def _embedding_output(self, _mod, _inputs, output):
        if torch.is_grad_enabled():
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.emb.append(output)
            return output


def _item_map(rows: int, device, row_to_item, n_items, adam) -> tuple[Tensor | None, int]:
    """Which item each batch row belongs to (None: row r is item r, decided without reading the
    device), and how many items (Adam needs one row per item)."""
    if row_to_item is None and n_items in (None, rows):
        return None, rows
    row_to_item = (torch.arange(rows, device=device) if row_to_item is None
                   else torch.as_tensor(row_to_item, device=device, dtype=torch.long))
    n_items = int(row_to_item.max().item()) + 1 if n_items is None else n_items
    if adam is not None and (n_items != rows or not torch.equal(row_to_item.cpu(), torch.arange(rows))):
        raise ConfigError("Adam preconditioning is nonlinear: it needs exactly one batch row per item "
                          "(use it with the SFT loss only)")
    return row_to_item, n_items


def _check_losses(losses: Tensor, n_items: int, ids: Sequence[str]) -> None:
    if losses.shape != (n_items,):
        raise ValueError(f"loss_fn returned shape {list(losses.shape)}, expected [{n_items}]")
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(f"non-finite loss for {len(bad)} item(s): {[ids[i] for i in bad][:20]}")


def per_example_features(model, batch: dict, loss_fn: LossFn, projector=None, *,
                         row_to_item: Tensor | Sequence[int] | None = None, n_items: int | None = None,
                         item_ids: Sequence[str] | None = None, adam: AdamState | None = None,
                         autocast_dtype=None, out_dtype=torch.float32) -> Tensor:
    """Per-item (projected) LoRA gradients of ``loss_fn`` for one batch: ``[n_items, dim]``.

    ``loss_fn(model, batch)`` returns the ``[n_items]`` losses; the total is their sum.
    ``row_to_item[r]`` is the item of batch row ``r`` (default: row r is item r). ``projector``
    None returns the exact flattened gradient (parameters in ``lora_parameters`` order, in
    ``out_dtype``). ``adam`` applies LESS's Adam preconditioning per row (one row per item only).
    Raises NonFiniteError naming ``item_ids`` of non-finite losses or features.
    """
    if model.training:
        raise ConfigError("per-example features are taken in eval mode (no LoRA dropout): call model.eval()")
    pairs, numels = lora_pairs(model), param_numels(model)
    rows, device = batch["input_ids"].shape[0], batch["input_ids"].device
    row_to_item, n_items = _item_map(rows, device, row_to_item, n_items, adam)
    ids = list(item_ids) if item_ids is not None else [str(i) for i in range(n_items)]
    offsets, dim = _exact_offsets(numels) if projector is None else (None, projector.dim)
    row_out = torch.zeros(rows, dim, dtype=out_dtype if projector is None else torch.float32, device=device)
    emit = _Emitter(row_out, projector, adam, offsets)
    with _GradientHooks(model, pairs, emit, rows) as hooks:
        with torch.enable_grad(), _autocast(device, autocast_dtype):
            losses = loss_fn(model, batch)
        _check_losses(losses, n_items, ids)
        hooks.backward(losses)
    if adam is not None:  # a parameter whose gradient is zero still has an Adam feature
        for pair in pairs.values():
            for n in (pair.a_name, pair.b_name):
                if n not in emit.seen:
                    emit(n, torch.zeros(rows, numels[n], device=device, dtype=torch.float32))
    if row_to_item is None:
        out = row_out
    else:
        out = torch.zeros(n_items, dim, dtype=row_out.dtype, device=device)
        out.index_add_(0, row_to_item, row_out)
    _check_finite(out, ids)
    return out


def _check_finite(out: Tensor, ids: Sequence[str]) -> None:
    bad = (~torch.isfinite(out).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(f"non-finite gradient for {len(bad)} item(s): {[ids[i] for i in bad][:20]}")

# --------------------------------------------------------------------------- losses as row functions


def pairwise_loss_fn(beta: float = 0.1, ref="base") -> LossFn:
    """DPO loss per triple for a batch of ``2n`` rows: rows ``[:n]`` chosen, ``[n:]`` rejected.

    ``ref``: ``"base"`` (the same network with adapters disabled), ``"self"`` (pi_ref = pi: the
    weight sigma(0) = 1/2, no extra forward), or a model object (a separate reference, no grad).
    """

    def fn(model, batch: dict) -> Tensor:
        n = batch["labels"].shape[0] // 2
        pol = sequence_logprob_of(model, batch)
        if isinstance(ref, str) and ref == "self":
            ref_lp = pol.detach()
        elif isinstance(ref, str) and ref == "base":
            with torch.no_grad(), model.disable_adapter():
                ref_lp = sequence_logprob_of(model, batch)
        elif isinstance(ref, str):
            raise ConfigError(f"ref must be 'base', 'self' or a model, got {ref!r}")
        else:
            with torch.no_grad():
                ref_lp = sequence_logprob_of(ref, batch)
        return dpo_loss(pol[:n], pol[n:], ref_lp[:n], ref_lp[n:], beta)

    return fn


def pair_row_to_item(n: int, device="cpu") -> Tensor:
    return torch.arange(n, device=device).repeat(2)

# --------------------------------------------------------------------------- the LESS-style reference


def loop_features(model, batches: Sequence[dict], loss_fn: LossFn, projector=None, *,
                  adam: AdamState | None = None, out_dtype=torch.float32) -> Tensor:
    """Reference path (LESS): one item per batch, ``loss.backward()``, the full flattened gradient
    of ``lora_parameters`` (in order), Adam transform, then ``project_full``. ``[len(batches), dim]``."""

    params = lora_parameters(model)
    numels = OrderedDict((n, p.numel()) for n, p in params.items())
    feats = []
    for batch in batches:
        for p in params.values():
            p.grad = None
        loss = loss_fn(model, batch).sum()
        loss.backward()
        blocks = []
        for n, p in params.items():
            g = p.grad.reshape(1, -1) if p.grad is not None else torch.zeros(1, p.numel(), dtype=p.dtype,
                                                                             device=p.device)
            if adam is not None:
                m, v = adam.moments[n]
                g = adam_transform(g.to(m.dtype), m, v, adam.beta1, adam.beta2, adam.eps)
            blocks.append(g)
        flat = torch.cat(blocks, dim=1)
        feats.append(flat.to(out_dtype) if projector is None else project_full(projector, flat, numels))
    for p in params.values():
        p.grad = None
    return torch.cat(feats)
