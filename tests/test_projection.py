"""Projectors: exactness of `none`, Rademacher entries, JL statistics, determinism, bad input."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import pytest
import torch

from rose_select.errors import ConfigError
from rose_select.features.projection import (entry_hash, fmix32, make_projector, name_key, project_full,
                                    rademacher_rows)

NUMELS = {"layers.0.q.lora_A": 7000, "layers.0.q.lora_B": 5000, "layers.1.v.lora_A": 8000}
TOTAL = sum(NUMELS.values())


def _blocks(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(NUMELS, flat.split(list(NUMELS.values()), dim=1)))


def _accumulate(projector, blocks: dict, order) -> torch.Tensor:
    out = torch.zeros(next(iter(blocks.values())).shape[0], projector.dim)
    for name in order:
        projector.accumulate(out, name, blocks[name])
    return out


def _py_fmix32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & m
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def test_fmix32_matches_python_reference_without_overflow():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
    gen = torch.Generator().manual_seed(0)
    values += torch.randint(0, 2**32, (2000,), dtype=torch.int64, generator=gen).tolist()
    got = fmix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_py_fmix32(v) for v in values]
    h = entry_hash(torch.tensor([0, 2**32 - 1]), torch.arange(300), name_key(1, "x"))
    assert int(h.min()) >= 0 and int(h.max()) < 2**32


def test_name_key_is_stable_and_name_dependent():
    assert name_key(0, "a") == name_key(0, "a")
    assert len({name_key(0, "a"), name_key(0, "b"), name_key(1, "a")}) == 3


def test_none_is_concatenation_in_any_order():
    projector = make_projector("none", 0, 0, NUMELS)
    flat = torch.randn(3, TOTAL)
    out = _accumulate(projector, _blocks(flat), reversed(list(NUMELS)))
    assert projector.dim == TOTAL
    assert torch.equal(out, flat)
    assert torch.equal(project_full(projector, flat, NUMELS), flat)


def test_none_dim_must_be_zero_or_total():
    assert make_projector("none", None, 0, NUMELS).dim == TOTAL
    assert make_projector("none", TOTAL, 0, NUMELS).dim == TOTAL
    with pytest.raises(ConfigError, match="keeps all 20000"):
        make_projector("none", 8192, 0, NUMELS)


@pytest.mark.parametrize("dim", [256, 100])
def test_rademacher_entries_and_moments(dim):
    numels = {"a": 1500, "b": 1000}
    projector = make_projector("rademacher", dim, 7, numels)
    m = project_full(projector, torch.eye(2500), numels)  # the matrix itself
    scale = torch.tensor(1 / math.sqrt(dim), dtype=torch.float32)
    assert torch.equal(m.abs(), scale.expand_as(m))
    signs = (m / scale).double()
    n = signs.numel()
    assert abs(signs.mean().item()) < 5 / math.sqrt(n)
    gram = signs.T @ signs / signs.shape[0]  # columns: identity up to O(1/sqrt(P)) noise
    off = gram - torch.eye(dim, dtype=torch.float64)
    assert torch.allclose(torch.diagonal(gram), torch.ones(dim, dtype=torch.float64))
    assert off.abs().max().item() < 6 / math.sqrt(signs.shape[0])
    rows = signs @ signs.T / dim
    rows_off = rows - torch.eye(2500, dtype=torch.float64)
    assert abs(rows_off.mean().item()) < 5 / dim  # rows uncorrelated on average
    assert abs(rows_off.pow(2).mean().item() * dim - 1) < 0.1  # Var = 1/dim for independent rows


def test_rademacher_chunking_and_cache_do_not_change_the_matrix():
    key = name_key(3, "w")
    full = rademacher_rows(key, 0, 900, 96, "cpu")
    parts = torch.cat([rademacher_rows(key, r, min(r + 128, 900), 96, "cpu")
                       for r in range(0, 900, 128)])
    assert torch.equal(full, parts)
    flat = torch.randn(4, TOTAL)
    cached = make_projector("rademacher", 96, 3, NUMELS)
    chunked = make_projector("rademacher", 96, 3, NUMELS, cache_bytes=0, chunk_entries=96 * 500)
    a, b = project_full(cached, flat, NUMELS), project_full(chunked, flat, NUMELS)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(project_full(cached, flat, NUMELS), a)  # second call served from the cache


def test_sjlt_table_structure():
    projector = make_projector("sjlt", 64, 5, NUMELS, sparsity=4)
    buckets, signs = projector.table("layers.0.q.lora_A")
    assert buckets.shape == signs.shape == (4, 7000)
    for k in range(4):  # nonzero k lies in the k-th quarter: buckets of a coordinate are distinct
        assert buckets[k].min() >= 16 * k and buckets[k].max() < 16 * (k + 1)
    assert set(signs.unique().tolist()) == {-1, 1}
    counts = torch.bincount(buckets.flatten().long(), minlength=64).double()
    expected = 4 * 7000 / 64
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


KINDS = [("rademacher", {}), ("sjlt", {}), ("sjlt", {"sparsity": 1})]


@pytest.mark.parametrize("kind,opts", KINDS)
def test_jl_preserves_norms_and_cosines(kind, opts):
    d, pairs = 1024, 64
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(pairs, TOTAL, generator=gen), dim=1)
    z = torch.randn(pairs, TOTAL, generator=gen)
    z = torch.nn.functional.normalize(z - (z * x).sum(1, keepdim=True) * x, dim=1)
    cos = torch.linspace(-0.9, 0.9, pairs)[:, None]
    y = cos * x + (1 - cos**2).sqrt() * z
    projector = make_projector(kind, d, 11, NUMELS, **opts)
    px, py = project_full(projector, x, NUMELS), project_full(projector, y, NUMELS)
    norms = torch.cat([px, py]).pow(2).sum(1)  # inputs have unit norm; Var = 2/d
    assert (norms - 1).abs().max().item() < 6 * math.sqrt(2 / d)
    assert abs(norms.mean().item() - 1) < 5 * math.sqrt(2 / d / len(norms))
    cos_p = torch.nn.functional.cosine_similarity(px, py).double()
    assert (cos_p - cos[:, 0]).abs().max().item() < 5 / math.sqrt(d)
    ip_err = (px * py).sum(1).double() - cos[:, 0]
    ratio = (ip_err.pow(2) / ((1 + cos[:, 0].double() ** 2) / d)).mean().item()
    assert 0.5 < ratio < 2.0, ratio  # inner-product variance (1 + cos^2)/d, as for dense JL


@pytest.mark.parametrize("kind,opts", KINDS)
def test_block_order_and_projector_state_do_not_matter(kind, opts):
    flat = torch.randn(5, TOTAL)
    blocks = _blocks(flat)
    first = make_projector(kind, 128, 2, NUMELS, **opts)
    forward = _accumulate(first, blocks, NUMELS)
    backward = _accumulate(first, blocks, reversed(list(NUMELS)))
    assert torch.allclose(forward, backward, rtol=1e-4, atol=1e-4)  # float sums, other order
    name = "layers.0.q.lora_B"
    fresh = make_projector(kind, 128, 2, NUMELS, **opts)
    assert torch.equal(_accumulate(fresh, blocks, [name]), _accumulate(first, blocks, [name]))
    assert torch.equal(project_full(fresh, flat, NUMELS), forward)  # same order -> same bits


@pytest.mark.parametrize("kind,opts", KINDS)
def test_seed_and_name_determine_the_projection(kind, opts):
    flat = torch.randn(3, TOTAL)
    a = project_full(make_projector(kind, 64, 1, NUMELS, **opts), flat, NUMELS)
    b = project_full(make_projector(kind, 64, 1, NUMELS, **opts), flat, NUMELS)
    c = project_full(make_projector(kind, 64, 2, NUMELS, **opts), flat, NUMELS)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    renamed = {f"x.{k}": v for k, v in NUMELS.items()}
    d = project_full(make_projector(kind, 64, 1, renamed, **opts), flat, renamed)
    assert not torch.allclose(a, d)


_CHILD = """
import hashlib, torch
from rose_select.features.projection import make_projector, project_full
numels = {numels!r}
flat = torch.sin(torch.arange(3 * {total}, dtype=torch.float64)).float().reshape(3, {total})
for kind in ("rademacher", "sjlt"):
    out = project_full(make_projector(kind, 64, 123, numels), flat, numels)
    print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def test_identical_across_processes():
    code = _CHILD.format(numels=NUMELS, total=TOTAL)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    flat = torch.sin(torch.arange(3 * TOTAL, dtype=torch.float64)).float().reshape(3, TOTAL)
    here = [hashlib.sha256(project_full(make_projector(kind, 64, 123, NUMELS), flat, NUMELS)
                           .numpy().tobytes()).hexdigest() for kind in ("rademacher", "sjlt")]
    assert child.stdout.split() == here


@pytest.mark.parametrize("kind,opts", KINDS)
def test_low_precision_output_accumulates_in_float32(kind, opts):
    flat = torch.randn(2, TOTAL)
    projector = make_projector(kind, 64, 0, NUMELS, **opts)
    ref = project_full(projector, flat, NUMELS)
    out = torch.zeros(2, 64, dtype=torch.bfloat16)
    for name, block in _blocks(flat.to(torch.bfloat16)).items():
        projector.accumulate(out, name, block)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 rounding only


def test_fingerprint():
    fp = make_projector("sjlt", 64, 9, NUMELS, sparsity=2).fingerprint()
    assert {k: fp[k] for k in ("kind", "dim", "seed", "sparsity", "n_params")} == {
        "kind": "sjlt", "dim": 64, "seed": 9, "sparsity": 2, "n_params": TOTAL}
    other = make_projector("sjlt", 64, 9, {**NUMELS, "extra": 1}, sparsity=2).fingerprint()
    assert other["params_sha256"] != fp["params_sha256"]
    assert make_projector("rademacher", 64, 9, NUMELS).fingerprint()["kind"] == "rademacher"
    assert "hash" not in make_projector("none", 0, 9, NUMELS).fingerprint()


def test_bad_inputs():
    projector = make_projector("sjlt", 64, 0, NUMELS)
    out = torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"'layers.0.q.lora_A': expected shape \[B, 7000\]"):
        projector.accumulate(out, "layers.0.q.lora_A", torch.zeros(2, 6999))
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        projector.accumulate(out, "nope", torch.zeros(2, 7000))
    with pytest.raises(ValueError, match=r"expected shape \[3, 64\]"):
        projector.accumulate(out, "layers.0.q.lora_A", torch.zeros(3, 7000))
    with pytest.raises(ValueError, match="float tensor"):
        projector.accumulate(out, "layers.0.q.lora_A", torch.zeros(2, 7000, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"flat gradients \[B, 20000\]"):
        project_full(projector, torch.zeros(2, 10), NUMELS)
    with pytest.raises(ConfigError, match="unknown projection kind 'gaussian'"):
        make_projector("gaussian", 64, 0, NUMELS)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['sparsity'\]"):
        make_projector("rademacher", 64, 0, NUMELS, sparsity=2)
    with pytest.raises(ConfigError, match="sparsity must be a positive integer dividing dim=64"):
        make_projector("sjlt", 64, 0, NUMELS, sparsity=3)
    with pytest.raises(ConfigError, match="dim must be a positive integer"):
        make_projector("rademacher", 0, 0, NUMELS)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        make_projector("sjlt", 64, 0, {})
    with pytest.raises(ConfigError, match="'a' has numel 0"):
        make_projector("sjlt", 64, 0, {"a": 0})
    with pytest.raises(ConfigError, match="seed must be an integer"):
        make_projector("sjlt", 64, "0", NUMELS)
