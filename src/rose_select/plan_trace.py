"""Running the project's own step functions on fake tensors: peak live memory and FLOPs.

The model is built on the meta device and materialised as fake CPU tensors (torch's
``FakeTensorMode``: shapes, dtypes and devices, no data), so an 8B model costs no memory and a
forward + backward at 2048 tokens takes seconds. Two dispatch modes watch every operator:

- ``LiveBytes`` keeps a weak reference to every tensor storage that exists and adds up the bytes
  of those still alive after each operator: the peak of live tensor storage, what
  ``torch.cuda.max_memory_allocated`` reports on a GPU (less the caching allocator's rounding);
- torch's ``FlopCounterMode`` counts the FLOPs of matrix products and attention.

Data-dependent operators: the batch (token ids, labels, masks) is a *constant* fake tensor, so
the masks, ``nonzero`` and ``.item()`` on it run for real (the response-only head selects real
positions). Only the finiteness checks read values computed from the weights; here they see
"all finite" (no data to be non-finite), which is what a healthy run sees.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_CONSTANT_LIMIT = 1 << 24  # elements a constant fake tensor (the batch) may have


def _storages(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            yield t.untyped_storage()


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage while the mode is on (plus ``fixed``: storages that
    existed before, such as the weights, registered with ``hold``)."""

    def __init__(self):
        super().__init__()
        self.held: dict[int, tuple[StorageWeakRef, int]] = {}  # swept only at the end
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.fixed = self.now = self.peak = 0

    def hold(self, tensors) -> None:
        """Count ``tensors`` (weights, optimizer state) as live for the whole measurement."""
        for st in _storages(tensors):
            if st._cdata not in self.held:
                self.held[st._cdata] = (StorageWeakRef(st), st.nbytes())
                self.fixed += st.nbytes()
        self.peak = max(self.peak, self.fixed)

    def _sweep(self) -> None:
        gone = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in gone:
            self.now -= self.live.pop(k)[1]

    def _track(self, out) -> None:
        new = [st for st in _storages(tree_flatten(out)[0])
               if st._cdata not in self.live and st._cdata not in self.held]
        if not new:
            return
        self._sweep()
        for st in new:
            if st._cdata not in self.live:
                self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
                self.now += st.nbytes()
        self.peak = max(self.peak, self.fixed + self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default and _is_fake_data(args[0]):
            x = args[0]  # a finiteness check over values the fake run does not have: all finite
            return torch.empty((0, x.dim()), dtype=torch.long, device=x.device)
        if func is torch.ops.aten._fused_sdp_choice.default and _is_fake_data(args[0]):
            return _sdp_choice(args, kwargs)
        out = func(*args, **kwargs)
        self._track(out)
        return out


def _sdp_choice(args, kwargs) -> int:
    """The attention kernel a real tensor of the same shape (batch 1) and dtype gets: fake tensors
    would get the math kernel, whose [T, T] weights a real run (flash) never holds."""
    from torch.utils._python_dispatch import _disable_current_modes

    def real(t):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.zeros((1, *t.shape[1:]) if t.dim() == 4 else t.shape, dtype=t.dtype)

    with _disable_current_modes():
        return torch.ops.aten._fused_sdp_choice.default(*map(real, args), **{k: real(v) for k, v in kwargs.items()})


def _is_fake_data(t) -> bool:
    """A fake tensor computed from the weights (not a constant of the batch)."""
    return getattr(t, "constant", None) is None and type(t).__name__ == "FakeTensor"


@dataclass
class Trace:
    """What one step cost: peak live bytes (``fixed``: what existed before the step) and FLOPs."""

    peak_bytes: int
    fixed_bytes: int
    flops: int


class _GlobalOnly:
    """FlopCounterMode's module tracker, replaced: totals only. The real one puts multi-grad
    hooks on module inputs, which ``autograd.grad`` from a leaf (the featurizer's backward from
    the input embeddings) refuses."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """torch's ``FlopCounterMode`` (matrix products and attention), counting totals only. torch
    has no formula for the CPU's fused attention kernel, the one a fake run takes
    (``_sdp_choice``) and a real CPU run too: without one, attention counted zero FLOPs. It gets
    the formulas of the CUDA kernels (the same products: ``Q K^T`` and ``P V``)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    counter = FlopCounterMode(display=False)
    cuda_kernel = counter.flop_registry  # its own copy, with the formulas already wrapped
    cuda_kernel[aten._scaled_dot_product_flash_attention_for_cpu] = cuda_kernel[aten._scaled_dot_product_flash_attention]
    cuda_kernel[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
        cuda_kernel[aten._scaled_dot_product_flash_attention_backward]
    counter.mod_tracker = _GlobalOnly()
    return counter


@contextlib.contextmanager
def fake_mode():
    """A ``FakeTensorMode`` (not entered) in which the batch may be a constant (its masks
    computed for real)."""
    import torch._subclasses.fake_tensor as FT

    saved = FT.CONSTANT_NUMEL_LIMIT
    FT.CONSTANT_NUMEL_LIMIT = _CONSTANT_LIMIT
    try:
        with _constants_are_data():
            yield FT.FakeTensorMode(allow_non_fake_inputs=True)
    finally:
        FT.CONSTANT_NUMEL_LIMIT = saved


@contextlib.contextmanager
def _constants_are_data():
    """transformers takes any fake tensor for a graph being traced and then builds the attention
    mask a real run skips (all-ones padding mask: causal kernel). A constant fake tensor (the
    batch) has values: let the masking code read them, as a real run does."""
    from transformers import masking_utils

    traced = getattr(masking_utils, "is_tracing", None)
    if traced is None:
        yield
        return

    def is_tracing(tensor=None):
        return traced(None) if getattr(tensor, "constant", None) is not None else traced(tensor)

    masking_utils.is_tracing = is_tracing
    try:
        yield
    finally:
        masking_utils.is_tracing = traced


def constant(mode, t: torch.Tensor):
    """A real (small, integer) tensor as a constant fake tensor of ``mode``."""
    return mode.fake_tensor_converter.from_real_tensor(mode, t, make_constant=True)


def trace(step, held) -> Trace:
    """Run ``step()`` under the memory and FLOP counters; ``held``: tensors that live throughout
    (weights, adapters, optimizer moments, projector). Works on real tensors alike (tests compare
    a fake run with a real one)."""
    mem = LiveBytes()
    mem.hold(held)
    flops = flop_counter()
    with flops, mem:
        out = step()
        mem._track(out)
        del out
    return Trace(peak_bytes=mem.peak, fixed_bytes=mem.fixed, flops=int(flops.get_total_flops()))
