"""The fastest a run could go on this machine: its matrix-product FLOPs over the measured GEMM rate.

    python bench/floor.py --config configs/demo.yaml                      # the demo
    python bench/floor.py --config configs/demo.yaml --run runs/demo      # and beside its stage times

Why: the issue's demo target (6 minutes on the 2-core CPU) is a wall-clock figure; this says what
the hardware allows at the run's settings, so a target below the floor is recognised as one.

1. FLOPs per token of every kind of pass the run makes, counted with torch's FLOP formulas
   (matrix products and attention, forward and backward) on real batches of the run's own data at
   its settings (model, LoRA, max length, batch sizes), through the project's own code paths:
   pool featurization (``per_example_features``, SFT loss), the validation pass
   (``joint_features``), a LoRA training step (forward + backward with LoRA weight gradients) and an
   evaluation forward (``response_logprobs``, no grad).
2. Tokens each stage processes, from the run's config and data: pool rows x checkpoints,
   validation triples x 2 rows x checkpoints, warm-up rows x epochs, selected rows x epochs x
   methods (mean pool row), held-out pairs x 2 rows x (methods + the base model).
3. The rate of float32 and bfloat16 matrix products at the model's layer shapes (batch x tokens
   rows), measured here, in this process, with ``rose``'s CPU settings; the best of them is used.

floor = FLOPs / best rate. It leaves out everything that is not a matrix product (norms, softmax,
elementwise ops, the projection, Adam, model loading, I/O), so a run cannot be faster than it.
Writes bench/results/floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rose_select.runtime import configure_cpu

CPU = configure_cpu() if __name__ == "__main__" else None  # before torch loads

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

from rose_select.config import load_yaml  # noqa: E402
from rose_select.data import load_pool, load_preferences  # noqa: E402
from rose_select.data.builtin import resolve_input  # noqa: E402
from rose_select.features import gradients as G  # noqa: E402
from rose_select.losses import response_logprobs  # noqa: E402
from rose_select.features.joint import joint_features  # noqa: E402
from rose_select.features.projection import make_projector  # noqa: E402
from rose_select.io import write_json  # noqa: E402
from rose_select.modeling import attach_lora, load_model, load_tokenizer, lora_parameters  # noqa: E402
from rose_select.pipeline import RunConfig, heldout_triples  # noqa: E402
from rose_select.select.topk import count_for_fraction  # noqa: E402
from rose_select.tables import markdown  # noqa: E402
from rose_select.train.stage import choose_subset  # noqa: E402
from rose_select.tokenization import collate, encode_record, encode_triple  # noqa: E402


class _FlopCount(TorchDispatchMode):
    """torch's FLOP formulas (``flop_counter.flop_registry``) summed over every op that runs.
    ``FlopCounterMode`` itself tracks modules with backward hooks that ``autograd.grad`` over a
    non-leaf input (what the featurizer runs) refuses."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _flops(fn) -> int:
    with _FlopCount() as counter:
        fn()
    return counter.total


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def lora_model(cfg: RunConfig):
    """The run's base model with a fresh LoRA adapter of its settings; only LoRA trains."""
    model = attach_lora(load_model(cfg.model, dtype=cfg.model_dtype, device="cpu"), cfg.lora)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return model


def flops_per_token(cfg: RunConfig, model, tok, sample: int) -> dict:
    """Matrix-product FLOPs per (non-pad) token of each pass, on the first ``sample`` rows, in
    batches shaped as the stages shape them (a validation batch: chosen rows, then rejected)."""
    pool = [encode_record(r, tok, cfg.tokenize) for r in load_pool(resolve_input(cfg.pool), limit=sample)]
    triples = [encode_triple(t, tok, cfg.tokenize) for t in load_preferences(resolve_input(cfg.validation))[:sample // 2]]
    projector = make_projector(cfg.featurize.projection, cfg.featurize.dim, 0, dict(G.param_numels(model)))
    pad = tok.pad_token_id

    def chunks(items, size):
        return [items[k:k + size] for k in range(0, len(items), size)]

    def per_token(batches, step):
        return sum(_flops(lambda b=b: step(b)) for b in batches) / sum(_tokens(b) for b in batches)

    def train_step(b):
        G.sft_loss_fn(model, b).mean().backward()
        for p in lora_parameters(model).values():
            p.grad = None

    def val_step(b):
        n = b["input_ids"].shape[0] // 2
        joint_features(model, b, projector, ref="auto", beta=cfg.beta, item_ids=list(range(n)))

    def eval_step(b):
        with torch.no_grad():
            response_logprobs(model, b)

    val_batches = [collate([e["chosen"] for e in c] + [e["rejected"] for e in c], pad)
                   for c in chunks(triples, cfg.featurize.batch_size)]
    pairs = [e[k] for e in triples for k in ("chosen", "rejected")]
    model.eval()
    out = {"pool": per_token([collate(c, pad) for c in chunks(pool, cfg.featurize.batch_size)],
                             lambda b: G.per_example_features(model, b, G.sft_loss_fn, projector)),
           "validation": per_token(val_batches, val_step),
           "eval": per_token([collate(c, pad) for c in chunks(pairs, cfg.evaluate.batch_size)], eval_step)}
    model.train()
    out["train"] = per_token([collate(c, pad) for c in chunks(pool, cfg.train.batch_size)], train_step)
    return out


def stage_tokens(cfg: RunConfig, tok) -> dict:
    """Tokens each stage of the run processes (training rows: the mean pool row)."""
    pool = [len(encode_record(r, tok, cfg.tokenize)["input_ids"])
            for r in load_pool(resolve_input(cfg.pool), limit=cfg.pool_limit)]
    validation = resolve_input(cfg.validation)
    val = [sum(len(e[k]["input_ids"]) for k in ("chosen", "rejected"))
           for e in (encode_triple(t, tok, cfg.tokenize) for t in load_preferences(validation))]
    _, held = heldout_triples(cfg, validation)
    ev = [sum(len(e[k]["input_ids"]) for k in ("chosen", "rejected"))
          for e in (encode_triple(t, tok, cfg.tokenize) for t in held)]
    checkpoints = len(cfg.featurize.checkpoints or range(cfg.warmup.epochs))
    mean_row = sum(pool) / len(pool)
    warm_rows = len(choose_subset(len(pool), cfg.warmup.fraction, cfg.seed)) * cfg.warmup.epochs
    train_rows = count_for_fraction(cfg.select.fraction, len(pool)) * cfg.train.epochs * len(cfg.select.methods)
    return {"pool": sum(pool) * checkpoints, "validation": sum(val) * checkpoints,
            "train": (warm_rows + train_rows) * mean_row, "eval": sum(ev) * (len(cfg.select.methods) + 1),
            "rows": {"pool": len(pool) * checkpoints, "validation triples": len(val) * checkpoints,
                     "train": warm_rows + train_rows, "eval pairs": len(ev) * (len(cfg.select.methods) + 1)}}


def gemm_rates(hidden: int, intermediate: int, rows: int, repeats: int = 20) -> dict:
    """Best GFLOP/s of float32 and bfloat16 matrix products at a model's layer shapes."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for k, n in ((hidden, intermediate), (intermediate, hidden), (hidden, hidden)):
            a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            t0 = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, 2 * rows * k * n * repeats / (time.perf_counter() - t0) / 1e9)
        out[str(dtype).removeprefix("torch.")] = best
    return out


def measured_seconds(run: Path) -> dict:
    """Stage seconds of a finished run (its ``stages.json``), grouped like the floor's stages."""
    stages = json.loads((run / "stages.json").read_text())
    got = {"pool": 0.0, "validation": 0.0, "train": 0.0, "eval": 0.0}
    for key, rec in stages.items():
        kind = ("pool" if key.endswith("/pool") else "validation" if key.startswith("featurize/")
                else "train" if key == "warmup" or key.startswith("train/") else
                "eval" if key.startswith("eval") else None)
        if kind and rec.get("seconds"):
            got[kind] += rec["seconds"]
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--run", default=None, help="a finished run dir: its stage times beside the floor")
    ap.add_argument("--sample", type=int, default=32, help="rows whose FLOPs are counted per pass")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = load_yaml(RunConfig, args.config)
    load1 = os.getloadavg()[0]
    tok, model = load_tokenizer(cfg.model), lora_model(cfg)
    rates = gemm_rates(model.config.hidden_size, model.config.intermediate_size,
                       cfg.featurize.batch_size * cfg.tokenize.max_length)
    per_tok = flops_per_token(cfg, model, tok, args.sample)
    tokens = stage_tokens(cfg, tok)
    measured = measured_seconds(Path(args.run)) if args.run else {}
    rows, total = [], {"flops": 0.0, "float32": 0.0, "bfloat16": 0.0, "measured": 0.0}
    for stage in ("pool", "validation", "train", "eval"):
        flops = per_tok[stage] * tokens[stage]
        row = {"stage": stage, "tokens": int(tokens[stage]), "MFLOP/token": f"{per_tok[stage] / 1e6:.0f}",
               "TFLOP": f"{flops / 1e12:.1f}", "floor float32 (s)": f"{flops / rates['float32'] / 1e9:.0f}",
               "floor bf16 (s)": f"{flops / rates['bfloat16'] / 1e9:.0f}"}
        if measured:
            row["measured (s)"] = f"{measured[stage]:.0f}"
            total["measured"] += measured[stage]
        total["flops"] += flops
        total["float32"] += flops / rates["float32"] / 1e9
        total["bfloat16"] += flops / rates["bfloat16"] / 1e9
        rows.append(row)
    rows.append({"stage": "all", "tokens": int(sum(tokens[s] for s in per_tok)), "MFLOP/token": "",
                 "TFLOP": f"{total['flops'] / 1e12:.1f}", "floor float32 (s)": f"{total['float32']:.0f}",
                 "floor bf16 (s)": f"{total['bfloat16']:.0f}",
                 **({"measured (s)": f"{total['measured']:.0f}"} if measured else {})})
    print(f"GEMM rate here (best of the model's layer shapes, {CPU['threads']} threads, load {load1:.2f}): "
          f"float32 {rates['float32']:.0f} GFLOP/s, bfloat16 {rates['bfloat16']:.0f} GFLOP/s")
    print(f"rows: {tokens['rows']}")
    print(markdown(rows))
    res = {"config": args.config, "cpu": CPU, "load1": load1, "gemm_gflops": rates, "flops_per_token": per_tok,
           "tokens": tokens, "floor_seconds": {"float32": total["float32"], "bfloat16": total["bfloat16"]},
           "measured_seconds": measured or None, "rows": rows}
    out = Path(args.out or Path(__file__).parent / "results" / "floor.json")
    write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
