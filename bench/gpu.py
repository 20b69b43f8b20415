"""Featurization vs LoRA training on Llama-shaped models with random weights (``bench/gpu.sh``).

    python bench/gpu.py                 # CUDA: ~1B and ~8B shapes, bf16, LoRA r=128 q/k/v/o, d=8192, 2048 tokens
    python bench/gpu.py --dry-run       # CPU, a tiny shape: the same code path, in seconds (CI)

Per shape, on the same batches of the same tokens: (a) LoRA training (forward + backward + AdamW
step) and (c) our per-example features (one forward + one backward, Adam-preconditioned, sjlt
projection). Prints tokens/s, examples/s, the ratio to training and the peak GPU memory, and
writes JSON. A batch that does not fit is retried at half the size (recorded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from featurize import _batches, bench_ours, bench_train

from rose_select.features import gradients as G
from rose_select.features.projection import make_projector
from rose_select.modeling import LoraSettings, attach_lora, lora_parameters

warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks transformers a deprecated question
LLAMA = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0)
SHAPES = {  # Llama-3.2-1B and Llama-3-8B
    "llama-1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True),
    "llama-8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


def build(shape: str, device: torch.device, dtype, seq_len: int, rank: int):
    """A random-weight Llama of ``shape`` in ``dtype`` on ``device``, LoRA on q/k/v/o (B ~ N(0, 1e-3))."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 128))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model = attach_lora(model, LoraSettings(r=rank, alpha=2.0 * rank, dropout=0.0)).to(device).eval()
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    return model


def _measure(model, device, batch_size: int, args) -> dict:
    vocab = model.get_input_embeddings().weight.shape[0]
    batches = _batches(args.n_examples, batch_size, args.seq_len, vocab, device)
    numels = dict(G.param_numels(model))
    adam = G.AdamState({n: (torch.zeros(p.shape), torch.full(p.shape, 1e-6))
                        for n, p in lora_parameters(model).items()}).to(device)
    proj = make_projector("sjlt", args.dim, 0, numels, device=device)
    row = {"batch_size": batch_size}
    for name, fn in (("train", lambda: bench_train(model, batches, device, None)),
                     ("featurize", lambda: bench_ours(model, batches, device, proj, None, adam))):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ex_s = fn()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        row[name] = {"examples_per_s": ex_s, "tokens_per_s": ex_s * args.seq_len, "peak_gpu_gib": peak}
    row["featurize_vs_train"] = row["featurize"]["examples_per_s"] / row["train"]["examples_per_s"]
    return row


def run_shape(shape: str, device, dtype, args) -> dict:
    t0 = time.perf_counter()
    model = build(shape, device, dtype, args.seq_len, args.rank)
    info = {"params": sum(p.numel() for p in model.parameters()),
            "lora_params": sum(G.param_numels(model).values()), "build_s": time.perf_counter() - t0,
            "lora_dtype": str(next(iter(lora_parameters(model).values())).dtype)}
    bs = args.batch_size
    while True:
        try:
            row = _measure(model, device, bs, args)
            break
        except torch.cuda.OutOfMemoryError:
            info.setdefault("oom_at_batch", []).append(bs)
            if bs == 1:
                raise
            bs //= 2
            torch.cuda.empty_cache()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**info, **row}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-1b,llama-8b")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--n-examples", type=int, default=16)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, r=8, d=256, 64 tokens, 4 examples")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = ap.parse_args(argv)
    if args.dry_run:
        args.shapes, args.rank, args.dim, args.seq_len, args.batch_size, args.n_examples = "tiny", 8, 256, 64, 2, 4
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    results = {"setting": {k: getattr(args, k) for k in ("rank", "dim", "seq_len", "n_examples", "dry_run")},
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "dtype": str(dtype), "shapes": {}}
    print(f"{'shape':10s} {'batch':>5s} {'train tok/s':>12s} {'feat tok/s':>11s} {'train ex/s':>10s} "
          f"{'feat ex/s':>9s} {'feat/train':>10s} {'peak GiB (train/feat)':>22s}", flush=True)
    for shape in [s for s in args.shapes.split(",") if s]:
        r = results["shapes"][shape] = run_shape(shape, device, dtype, args)
        peak = "-" if r["train"]["peak_gpu_gib"] is None else \
            f"{r['train']['peak_gpu_gib']:.1f}/{r['featurize']['peak_gpu_gib']:.1f}"
        print(f"{shape:10s} {r['batch_size']:5d} {r['train']['tokens_per_s']:12.0f} "
              f"{r['featurize']['tokens_per_s']:11.0f} {r['train']['examples_per_s']:10.3f} "
              f"{r['featurize']['examples_per_s']:9.3f} {r['featurize_vs_train']:9.2f}x {peak:>22s}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
