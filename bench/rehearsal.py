"""Rehearsal of ``rose plan`` on the CPU: real random-weight models at a named shape's full width
with few layers, each stage's step run for real at full length, measured peak memory vs the plan.

    nice -n 10 python bench/rehearsal.py                         # llama-2-7b and llama-3.1-8b, 1/2/4 layers
    python bench/rehearsal.py --shapes llama-2-7b --layers 1,2 --stages featurize_pool

Each row runs in its own process (glibc's mmap threshold fixed at 64 KiB, so freed tensors go back
to the system as they do to a GPU allocator's pool): after the model is built, the kernel's high-water mark of the
process (``VmHWM``, reset through ``/proc/self/clear_refs``) is taken across one step of the
stage (batch 1, bf16 weights, LoRA r=128 on q/k/v/o, d=8192, 2048 tokens), less the process's
memory before the model existed. Beside it, the live tensor bytes of the same real run
(``plan_trace.LiveBytes``) and the plan for the same depth from fake tensors (``plan.stage_fits``:
its fixed and per-layer parts, the ones that extrapolate to 32 or 40 layers). A row whose plan
does not fit the memory available now is skipped and says so. Writes a table and
bench/results/rehearsal.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def plan_config(args):
    from rose_select.features.stage import FeatureSettings
    from rose_select.modeling import LoraSettings
    from rose_select.plan import PlanConfig
    from rose_select.tokenization import TokenizeConfig
    from rose_select.train.stage import Schedule

    cpu = Schedule(mixed_precision="none")  # bf16 weights: no autocast, as on the GPU
    return PlanConfig(model=args.shape, model_dtype="bfloat16", lora=LoraSettings(r=128, alpha=256.0, dropout=0.0),
                      tokenize=TokenizeConfig(max_length=args.length), featurize=FeatureSettings(dim=8192),
                      warmup=cpu, train=cpu)


def one(args) -> dict:
    """The measured row (this process): build, reset the high-water mark, run one step."""
    import torch
    from transformers import AutoModelForCausalLM

    from rose_select.modeling import attach_lora
    from rose_select.plan import model_config, stage_trace

    cfg = plan_config(args)
    config = model_config(args.shape)
    config.num_hidden_layers = args.layers
    before = _status_kib("VmRSS")
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), cfg.lora)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    live = stage_trace(cfg, args.stage, model, 1, args.length)
    return {"measured_gib": (_status_kib("VmHWM") - before) / GIB, "live_gib": live.peak_bytes / GIB,
            "step_s": time.perf_counter() - t0}


def planned(cfg, shape: str, stages, layers: list[int]) -> dict:
    from rose_select.plan import model_config, stage_fits

    fits, _ = stage_fits(cfg, model_config(shape), stages, cfg.tokenize.max_length)
    return {(s, n): fits[s][0].at(n, 1) / GIB for s in stages for n in layers} | {
        ("fixed", s): fits[s][0].at(0, 1) / GIB for s in stages} | {
        ("per_layer", s): fits[s][0].b / GIB + fits[s][0].d / GIB for s in stages}


def run_row(args, shape: str, layers: int, stage: str) -> dict:
    cmd = [sys.executable, __file__, "--one", "--shapes", shape, "--layers", str(layers), "--stages", stage,
           "--length", str(args.length)]
    # a fixed mmap threshold: glibc otherwise raises it after each large free and keeps later
    # tensors' freed memory in the heap, so the process would hold more than its live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # -9: the kernel's out-of-memory killer (the machine is shared)
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-2-7b,llama-3.1-8b")
    ap.add_argument("--layers", default="1,2,4")
    ap.add_argument("--stages", default="featurize_pool,train,evaluate")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--max-gib", type=float, default=12.0, help="skip rows planned above this (shared machine)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rehearsal.json"))
    args = ap.parse_args(argv)
    if args.one:
        args.shape, args.layers, args.stage = args.shapes, int(args.layers), args.stages
        print(json.dumps(one(args)))
        return 0
    layers, stages = [int(n) for n in args.layers.split(",")], args.stages.split(",")
    rows, parts = [], {}
    print(f"{'shape':13s} {'stage':15s} {'layers':>6s} {'plan GiB':>9s} {'measured GiB':>12s} {'live GiB':>9s} "
          f"{'plan/measured':>13s} {'step s':>7s}", flush=True)
    for shape in args.shapes.split(","):
        args.shape = shape
        plan = planned(plan_config(args), shape, stages, layers)
        parts[shape] = {s: {"fixed_gib": plan["fixed", s], "per_layer_gib": plan["per_layer", s]} for s in stages}
        for stage in stages:
            for n in layers:
                row = {"shape": shape, "stage": stage, "layers": n, "plan_gib": plan[stage, n],
                       "available_gib": _available() / GIB}
                if plan[stage, n] > min(args.max_gib, row["available_gib"] - 1.5):
                    row["skipped"] = f"plan {plan[stage, n]:.1f} GiB; {row['available_gib']:.1f} GiB available, cap {args.max_gib}"
                else:
                    row.update(run_row(args, shape, n, stage))
                rows.append(row)
                m = row.get("measured_gib")
                print(f"{shape:13s} {stage:15s} {n:6d} {row['plan_gib']:9.2f} "
                      + (f"{m:12.2f} {row['live_gib']:9.2f} {row['plan_gib'] / m - 1:+12.1%} {row['step_s']:7.0f}"
                         if m else f"  {row.get('skipped') or row.get('error', '')[-200:]}"), flush=True)
    out = {"setting": {"length": args.length, "dtype": "bfloat16", "lora_r": 128, "dim": 8192, "batch": 1},
           "load_average": os.getloadavg(), "parts": parts, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
