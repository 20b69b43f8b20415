"""Random projections of per-example gradients, accumulated one named parameter block at a time.

A per-example LoRA gradient arrives as blocks: for each trainable parameter ``name`` a float tensor
``[B, numel(name)]``. A projector maps the concatenation of all blocks (in ``param_numels`` order)
to ``dim`` coordinates by adding each block's contribution to ``out [B, dim]``; blocks may arrive in
any order and the result is the same.

Kinds:

- ``none``: the identity; ``dim`` is the total number of parameters (pass ``dim=None`` or ``0``).
- ``rademacher``: dense ``±1/sqrt(dim)`` matrix (LESS/TRAK semantics). Never materialised whole:
  each parameter's rows are generated on demand in chunks and cached while under a byte budget.
- ``sjlt``: sparse Johnson-Lindenstrauss transform (block construction; ``sparsity=1`` is
  CountSketch). Each coordinate adds ``±1/sqrt(s)`` to ``s`` buckets, one in each of ``s`` equal
  bucket ranges (so its buckets are distinct). Cost ``O(B * P * s)``; never a dense matrix.

Randomness is a counter-based hash of ``(seed, parameter name, row, column)``: no RNG state, so a
matrix is bit-identical on CPU and CUDA, in any process, whatever the block order. The hash is
MurmurHash3's 32-bit finaliser evaluated in int64 with every product kept below 2**63 (no reliance
on overflow wrapping, no arithmetic shifts of negative numbers). Per-name keys come from blake2b,
which, unlike Python's ``hash()``, is stable across processes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from rose_select.errors import ConfigError
from rose_select.io import sha256_json

KINDS = ("none", "rademacher", "sjlt")
HASH_VERSION = "murmur3-fmix32-int64/v1"  # bump if the hash changes: it changes every projection
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# ---------------------------------------------------------------------------------------------
# Counter-based hashing (device-agnostic, exact in int64)


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``; ``c`` split in 16-bit halves so
    no intermediate product reaches 2**63."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's finaliser: a bijection on ``[0, 2**32)`` with full avalanche (int64)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def name_key(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys for a parameter, from blake2b of (seed, name): the same in every process."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value & _M32, value >> 32


def _row_hash(rows: Tensor, key: tuple[int, int]) -> Tensor:
    """Distinct 32-bit hashes for distinct rows ``< 2**32`` (composition of bijections)."""
    return fmix32(fmix32(rows ^ key[0]) ^ key[1])


def entry_hash(rows: Tensor, cols: Tensor, key: tuple[int, int]) -> Tensor:
    """Hash of every (row, col) pair, ``[len(rows), len(cols)]`` int64 in ``[0, 2**32)``."""
    row_h = _row_hash(rows, key)
    return fmix32((row_h[:, None] + _mul32(cols, _GOLDEN)[None, :]) & _M32)


def rademacher_rows(key: tuple[int, int], r0: int, r1: int, dim: int, device) -> Tensor:
    """Rows ``r0:r1`` of a parameter's ``±1/sqrt(dim)`` matrix, float32 ``[r1 - r0, dim]``.

    One 32-bit hash per (row, word of 32 columns); column ``32*w + j`` takes bit ``j`` of word
    ``w`` (bit set -> negative). Each byte of the hash is expanded to 8 signs by table lookup.
    """
    rows = torch.arange(r0, r1, dtype=torch.int64, device=device)
    words = torch.arange((dim + 31) // 32, dtype=torch.int64, device=device)
    h = entry_hash(rows, words, key)
    by = (h[:, :, None] >> torch.arange(0, 32, 8, device=device)) & 0xFF  # [R, W, 4]
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    lut = ((1 - 2 * bits).double() / math.sqrt(dim)).float().to(device)  # byte -> its 8 signs
    return torch.nn.functional.embedding(by, lut).reshape(r1 - r0, -1)[:, :dim]


def sjlt_table(key: tuple[int, int], numel: int, dim: int, s: int, device,
               chunk: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Buckets (int32 ``[s, numel]``) and signs (int8 ``[s, numel]``) of one parameter's
    coordinates. Nonzero ``k`` lies in bucket range ``[k*dim/s, (k+1)*dim/s)``; the bucket takes the
    hash's top 31 bits (multiply-shift, no modulo bias), the sign its lowest bit."""
    width = dim // s
    slots = torch.arange(s, dtype=torch.int64, device=device)
    buckets = torch.empty(s, numel, dtype=torch.int32, device=device)
    signs = torch.empty(s, numel, dtype=torch.int8, device=device)
    for p0 in range(0, numel, chunk):
        rows = torch.arange(p0, min(p0 + chunk, numel), dtype=torch.int64, device=device)
        h = entry_hash(rows, slots, key).T
        buckets[:, p0:p0 + len(rows)] = ((h >> 1) * width >> 31) + slots[:, None] * width
        signs[:, p0:p0 + len(rows)] = 1 - 2 * (h & 1)
    return buckets, signs


# ---------------------------------------------------------------------------------------------
# Projectors


class Projector(Protocol):
    kind: str
    dim: int
    seed: int

    def accumulate(self, out: Tensor, name: str, grads: Tensor) -> None:
        """``out [B, dim] += `` the projection of block ``grads [B, numel(name)]``."""

    def fingerprint(self) -> dict:
        """Everything that determines the projection, for artifact metadata."""


def _accumulate_f32(out: Tensor, add: Callable[[Tensor], None]) -> None:
    """Run ``add`` on a float32 accumulator: ``out`` itself if float32, else a temporary."""
    if out.dtype == torch.float32:
        add(out)
        return
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    add(acc)
    out.add_(acc.to(out.dtype))


class _BaseProjector:
    kind = "base"

    def __init__(self, dim: int, seed: int, param_numels: dict[str, int], device="cpu"):
        self.dim, self.seed = int(dim), int(seed)
        self.param_numels = dict(param_numels)
        self.device = torch.device(device)

    def _checked(self, out: Tensor, name: str, grads: Tensor) -> Tensor:
        """Validate one block; return it as float32 on ``out``'s device."""
        if name not in self.param_numels:
            known = list(self.param_numels)
            more = " ..." if len(known) > 3 else ""
            raise ValueError(f"unknown parameter {name!r}: this projector was built for "
                             f"{len(known)} parameters ({known[:3]}{more})")
        numel = self.param_numels[name]
        if grads.ndim != 2 or grads.shape[1] != numel:
            raise ValueError(f"gradient block {name!r}: expected shape [B, {numel}], "
                             f"got {list(grads.shape)}")
        if not grads.is_floating_point():
            raise ValueError(f"gradient block {name!r}: expected a float tensor, got {grads.dtype}")
        if out.ndim != 2 or out.shape != (grads.shape[0], self.dim):
            raise ValueError(f"output for block {name!r}: expected shape [{grads.shape[0]}, "
                             f"{self.dim}], got {list(out.shape)}")
        return grads.detach().to(device=out.device, dtype=torch.float32)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "hash": HASH_VERSION,
                "n_params": sum(self.param_numels.values()),
                "params_sha256": sha256_json(list(self.param_numels.items()))}


class IdentityProjector(_BaseProjector):
    """``none``: each block is added to its own slice of ``out`` (``param_numels`` order)."""

    kind = "none"

    def __init__(self, seed: int, param_numels: dict[str, int], device="cpu"):
        super().__init__(sum(param_numels.values()), seed, param_numels, device)
        self.offsets, start = {}, 0
        for name, numel in self.param_numels.items():
            self.offsets[name] = start
            start += numel

    def accumulate(self, out: Tensor, name: str, grads: Tensor) -> None:
        g = self._checked(out, name, grads)
        start = self.offsets[name]
        out[:, start:start + g.shape[1]] += g.to(out.dtype)

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        del fp["hash"]
        return fp


class RademacherProjector(_BaseProjector):
    """Dense ``±1/sqrt(dim)`` projection, generated in row chunks of at most ``chunk_entries``
    entries; a parameter's whole matrix is cached while the cache stays under ``cache_bytes``."""

    kind = "rademacher"

    def __init__(self, dim, seed, param_numels, device="cpu", *, cache_bytes: int = 1 << 30,
                 chunk_entries: int = 1 << 24):
        super().__init__(dim, seed, param_numels, device)
        self.cache_bytes, self.chunk_entries = int(cache_bytes), int(chunk_entries)
        self._cache: dict[str, Tensor] = {}
        self._cached_bytes = 0

    def accumulate(self, out: Tensor, name: str, grads: Tensor) -> None:
        g = self._checked(out, name, grads)

        def add(acc: Tensor) -> None:
            for r0, m in self._chunks(name, out.device):
                acc.addmm_(g[:, r0:r0 + m.shape[0]], m)

        _accumulate_f32(out, add)

    def matrix_rows(self, name: str, r0: int, r1: int, device=None) -> Tensor:
        """Rows ``r0:r1`` of ``name``'s block of the projection matrix (for tests and checks)."""
        return rademacher_rows(name_key(self.seed, name), r0, r1, self.dim, device or self.device)

    def _chunks(self, name: str, device) -> Iterator[tuple[int, Tensor]]:
        if name in self._cache:
            yield 0, self._cache[name].to(device)
            return
        numel, step = self.param_numels[name], max(1, self.chunk_entries // self.dim)
        nbytes = numel * self.dim * 4
        if self._cached_bytes + nbytes <= self.cache_bytes:
            full = torch.cat([self.matrix_rows(name, r0, min(r0 + step, numel), device)
                              for r0 in range(0, numel, step)])
            self._cache[name] = full
            self._cached_bytes += nbytes
            yield 0, full
            return
        for r0 in range(0, numel, step):
            yield r0, self.matrix_rows(name, r0, min(r0 + step, numel), device)


class SJLTProjector(_BaseProjector):
    """Sparse JL / CountSketch. Bucket (int32) and sign (int8) tables are cached per parameter on
    the device: ``5 * sparsity`` bytes per trainable parameter."""

    kind = "sjlt"

    def __init__(self, dim, seed, param_numels, device="cpu", *, sparsity: int = 4):
        super().__init__(dim, seed, param_numels, device)
        self.sparsity = int(sparsity)
        self._tables: dict[str, tuple[Tensor, Tensor]] = {}

    def accumulate(self, out: Tensor, name: str, grads: Tensor) -> None:
        g = self._checked(out, name, grads)
        buckets, signs = self._table(name, out.device)
        alpha = 1.0 / math.sqrt(self.sparsity)

        def add(acc: Tensor) -> None:  # (index_add_'s alpha= takes a slow path on CPU)
            for k in range(self.sparsity):
                acc.index_add_(1, buckets[k].long(), g * (signs[k] * alpha))

        _accumulate_f32(out, add)

    def table(self, name: str) -> tuple[Tensor, Tensor]:
        """(buckets ``[s, numel]`` int32, signs ``[s, numel]`` int8) of parameter ``name``."""
        return self._table(name, self.device)

    def _table(self, name: str, device) -> tuple[Tensor, Tensor]:
        if name not in self._tables:
            self._tables[name] = sjlt_table(name_key(self.seed, name), self.param_numels[name],
                                            self.dim, self.sparsity, self.device)
        buckets, signs = self._tables[name]
        return buckets.to(device), signs.to(device)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "sparsity": self.sparsity}


# ---------------------------------------------------------------------------------------------
# Construction and the full-vector helper

_OPTIONS = {"none": set(), "rademacher": {"cache_bytes", "chunk_entries"}, "sjlt": {"sparsity"}}


def _check_numels(param_numels: dict[str, int]) -> None:
    if not param_numels:
        raise ConfigError("projection: no trainable parameters given (param_numels is empty)")
    for name, numel in param_numels.items():
        if not isinstance(numel, int) or isinstance(numel, bool) or not 0 < numel < 2**32:
            raise ConfigError(f"projection: parameter {name!r} has numel {numel!r}; "
                              f"expected an integer in [1, 2**32)")


def _check_options(kind: str, dim, opts: dict, total: int) -> None:
    unknown = sorted(set(opts) - _OPTIONS[kind])
    if unknown:
        raise ConfigError(f"projection {kind!r}: unknown option(s) {unknown}; "
                          f"known: {sorted(_OPTIONS[kind]) or 'none'}")
    if kind == "none":
        if dim not in (None, 0, total):
            raise ConfigError(f"projection 'none' keeps all {total} gradient coordinates; "
                              f"got dim={dim}: set dim to 0 (or {total}) or choose another kind")
        return
    if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim < 2**31:
        raise ConfigError(f"projection {kind!r}: dim must be a positive integer below 2**31, "
                          f"got {dim!r}")
    s = opts.get("sparsity", 4)
    if kind == "sjlt" and (not isinstance(s, int) or s < 1 or dim % s):
        raise ConfigError(f"projection 'sjlt': sparsity must be a positive integer dividing "
                          f"dim={dim}, got {s!r}")


def make_projector(kind: str, dim: int | None, seed: int, param_numels: dict[str, int], *,
                   device="cpu", **opts) -> Projector:
    """Build a projector. ``param_numels``: ordered ``{name: numel}`` of every trainable parameter.
    ``none`` takes ``dim`` 0/None (or the total); options: rademacher ``cache_bytes`` (default
    1 GiB), ``chunk_entries`` (default 2**24); sjlt ``sparsity`` (default 4)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown projection kind {kind!r}; choose one of {list(KINDS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"projection seed must be an integer, got {seed!r}")
    _check_numels(param_numels)
    _check_options(kind, dim, opts, sum(param_numels.values()))
    if kind == "none":
        return IdentityProjector(seed, param_numels, device)
    if kind == "rademacher":
        return RademacherProjector(dim, seed, param_numels, device, **opts)
    return SJLTProjector(dim, seed, param_numels, device, **opts)


def project_full(projector: Projector, flat_grads: Tensor, param_numels: dict[str, int]) -> Tensor:
    """Project full flattened gradients ``[B, sum(numel)]`` (blocks in ``param_numels`` order) by
    accumulating each block: the same math as the blockwise path. Returns float32 ``[B, dim]``."""
    sizes = list(param_numels.values())
    if flat_grads.ndim != 2 or flat_grads.shape[1] != sum(sizes):
        raise ValueError(f"project_full: expected flat gradients [B, {sum(sizes)}], "
                         f"got {list(flat_grads.shape)}")
    out = torch.zeros(flat_grads.shape[0], projector.dim, dtype=torch.float32,
                      device=flat_grads.device)
    for name, block in zip(param_numels, flat_grads.split(sizes, dim=1)):
        projector.accumulate(out, name, block)
    return out
