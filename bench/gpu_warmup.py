"""Benchmark (needs a CUDA GPU for its purpose): bf16 warm-up of a Llama-shaped model of about
1.1B parameters (random weights: the speed and memory of training do not depend on them) on one
GPU, through ``rose_select.train.stage.run_warmup``: LoRA r=128 on q/k/v/o, bf16 autocast over
float32 weights, a checkpoint per epoch. Prints examples/s and the peak GPU memory.

    python bench/gpu_warmup.py                         # 1.1B: hidden 2048, 22 layers (TinyLlama's shape)
    python bench/gpu_warmup.py --hidden 64 --layers 2 --examples 8 --device cpu   # smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def write_model(path: Path, hidden: int, layers: int) -> int:
    """A random Llama (TinyLlama-1.1B's proportions) with the tiny test tokenizer; returns its
    parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rose_select.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 512), max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def write_pool(path: Path, n: int, words: int) -> None:
    text = " ".join(["bread flour water salt yeast"] * (words // 5))
    path.write_text("".join(json.dumps({"id": f"x{i}", "messages": [
        {"role": "user", "content": f"Question {i}: {text}"},
        {"role": "assistant", "content": f"Answer {i}: {text}"}]}) + "\n" for i in range(n)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)

    import torch

    from rose_select.modeling import LoraSettings
    from rose_select.tokenization import TokenizeConfig
    from rose_select.train.stage import WarmupConfig, run_warmup

    with tempfile.TemporaryDirectory(prefix="gpu-warmup-") as tmp:
        n_params = write_model(Path(tmp) / "model", args.hidden, args.layers)
        write_pool(Path(tmp) / "pool.jsonl", args.examples, args.max_length)
        cfg = WarmupConfig(model=str(Path(tmp) / "model"), data=str(Path(tmp) / "pool.jsonl"), fraction=1.0,
                           lora=LoraSettings(), tokenize=TokenizeConfig(max_length=args.max_length), epochs=1,
                           batch_size=args.batch_size, grad_accum=1, device=args.device,
                           gradient_checkpointing=args.gradient_checkpointing, output=str(Path(tmp) / "run"))
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run_warmup(cfg)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    result = {"params": n_params, "examples": args.examples, "tokens_per_example": args.max_length,
              "seconds_with_loading": seconds, "examples_per_s": args.examples / seconds, "peak_gib": peak,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
