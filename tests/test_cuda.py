"""The CUDA path (``bench/gpu.sh`` runs these on a GPU machine): features on CUDA equal the CPU
ones, the bf16 autocast path stays faithful, projections agree across devices, and a 1-process
NCCL run writes the single-process store. Skipped, with the reason, where there is no CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rose_select.features import gradients as G
from rose_select.features.projection import make_projector
from rose_select.features.stage import FeaturizeConfig, run_featurize
from rose_select.features.store import open_features
from rose_select.modeling import LoraSettings, attach_lora, load_model, lora_parameters
from rose_select.tokenization import collate

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh)")]


def _model(tiny_model_dir, device):
    torch.manual_seed(0)
    model = attach_lora(load_model(str(tiny_model_dir)), LoraSettings(r=4, alpha=8.0))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.1)
    return model.to(device).eval()


def _batch(n=6, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return collate(rows, 0)


def _features(model, batch, kind, device, amp=None):
    proj = make_projector(kind, 256, 0, dict(G.param_numels(model)), device=device)
    batch = {k: v.to(device) for k, v in batch.items()}
    return G.per_example_features(model, batch, G.sft_loss_fn, proj, autocast_dtype=amp).cpu()


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_features_on_cuda_equal_cpu(tiny_model_dir, kind):
    batch = _batch()
    cpu = _features(_model(tiny_model_dir, "cpu"), batch, kind, "cpu")
    gpu = _features(_model(tiny_model_dir, "cuda"), batch, kind, "cuda")
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_projection_on_cuda_equals_cpu(kind):
    numels = {"a": 300, "b": 1000}
    g = {n: torch.randn(5, k, generator=torch.Generator().manual_seed(i)) for i, (n, k) in enumerate(numels.items())}
    outs = []
    for device in ("cpu", "cuda"):
        proj = make_projector(kind, 128, 3, numels, device=device)
        out = torch.zeros(5, 128, device=device)
        for n in numels:
            proj.accumulate(out, n, g[n].to(device))
        outs.append(out.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_is_faithful(tiny_model_dir):
    model, batch = _model(tiny_model_dir, "cuda"), _batch(8, seed=1)
    full = _features(model, batch, "sjlt", "cuda")
    bf16 = _features(model, batch, "sjlt", "cuda", amp=torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(full, bf16, dim=1)
    assert cos.min() > 0.99, cos


def test_nccl_collectives_in_one_process():
    """An NCCL group of one: the all-gather the featurizer's ranks use, then the barrier and
    teardown of ``distributed.stop`` (a 1-GPU machine cannot hold two NCCL ranks)."""
    import torch.distributed as dist

    from rose_select import distributed as D

    dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore())
    torch.cuda.set_device(0)
    d = D.Dist(rank=0, world=1, local_rank=0, device="cuda:0", owns_group=True)
    x = torch.arange(6.0, device="cuda").reshape(2, 3)
    got = D._all_gather(d, x)
    assert len(got) == 1 and torch.equal(got[0], x)
    D.stop(d)
    assert not dist.is_initialized()


def test_torchrun_one_process_on_cuda_equals_direct_run(tiny_model_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"p{i}", "messages": [
        {"role": "user", "content": "Tell me about bread." * (1 + i % 3)},
        {"role": "assistant", "content": "Bread is baked." + " yes" * i}]}) + "\n" for i in range(6)))
    kw = dict(model=str(tiny_model_dir), data=str(pool), dim=64, batch_size=2, max_length=64, dtype="float32",
              adam=False, device="cuda", autocast="none")
    run_featurize(FeaturizeConfig(**kw, output=str(tmp_path / "single")))
    args = [a for k, v in {**kw, "output": str(tmp_path / "nccl")}.items()
            for a in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "ROSE_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "-m", "rose_select", "featurize", *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    single, _, _ = open_features(tmp_path / "single")
    nccl, _, _ = open_features(tmp_path / "nccl")
    np.testing.assert_allclose(np.array(nccl), np.array(single), rtol=1e-5, atol=1e-7)
