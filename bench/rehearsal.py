"""Rehearsal of ``rose plan``: real random-weight models at a named shape's full width, each
stage's step run for real at full length, measured peak memory vs the plan; on CUDA also the
step's time, so the plan's FLOPs give the achieved TFLOP/s and the MFU the plan only assumes.

    nice -n 10 python bench/rehearsal.py                         # CPU: llama-2-7b and llama-3.1-8b, 1/2/4 layers
    python bench/rehearsal.py --shapes llama-2-7b --layers 1,2 --stages featurize_pool
    python bench/rehearsal.py --device cuda --shapes llama-3.1-8b --layers 32   # a GPU holds full depth
    python bench/rehearsal.py --tiny --layers 1,2 --length 64 --rank 8 --dim 256 --repeats 1  # a minute (CI)

Each row runs in its own process (glibc's mmap threshold fixed at 64 KiB, so freed tensors go back
to the system as they do to a GPU allocator's pool). The measured peak is taken across one step of
the stage (batch 1, bf16 weights, LoRA r=128 on q/k/v/o, d=8192, 2048 tokens) after the model is
built, less the memory in use before the model existed, so the weights count, as the plan counts
them (``plan.stage_fits``: the peak of live tensor storage with the weights, buffers and the
step's own state held): on the CPU the kernel's high-water mark of the process (``VmHWM``, reset
through ``/proc/self/clear_refs``) less ``VmRSS`` before; on CUDA ``max_memory_allocated`` after
``reset_peak_memory_stats`` less ``memory_allocated`` before (0: nothing else is on the device),
so the CUDA context and the caching allocator's reserved-but-free blocks are not in it (the plan's
1 GiB reserve and 10% margin are for those). Beside it, the live tensor bytes of the same real run
(``plan_trace.LiveBytes``) and the plan for the same depth from fake tensors (its fixed and
per-layer parts, the ones that extrapolate to 32 or 40 layers).

``--repeats N`` (default: 3 on CUDA, 0 on the CPU, where one full-width step takes minutes) then
times N more steps outside the counters (synchronised; the median) and takes their peak too: the
plan's FLOPs for the step (``stage_fits``' FLOP fit at this depth, batch 1) over that time are
the achieved TFLOP/s, and over the device kind's peak (``plan.DEVICES``) the MFU. The traced step
also counts its real FLOPs, which should equal the plan's. A featurization step builds its
projector's tables each call, as the plan's step does (a real run builds them once): a little
time the MFU pays for. A row whose plan does not fit the memory available now is skipped and says
so. Writes a table and bench/results/rehearsal.json (after every row, so a timeout keeps the rows
done).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

GIB = 2**30


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _available(device: str) -> float | None:
    """Bytes free for a row: the host's available memory, or the GPU's free memory (nvidia-smi,
    so this process opens no CUDA context; None where it cannot tell, and no row is skipped)."""
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            return float(out.split()[0]) * 2**20
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _in_use(device: str) -> int:
    """Bytes in use now: the process's resident memory, or the device's allocated tensors."""
    import torch

    return torch.cuda.memory_allocated() if device == "cuda" else _status_kib("VmRSS")


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _peak(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def plan_config(args):
    from rose_select.features.stage import FeatureSettings
    from rose_select.modeling import LoraSettings
    from rose_select.plan import PlanConfig
    from rose_select.tokenization import TokenizeConfig
    from rose_select.train.stage import Schedule

    cpu = Schedule(mixed_precision="none")  # bf16 weights: no autocast, as on the GPU
    lora = LoraSettings(r=args.rank, alpha=2.0 * args.rank, dropout=0.0)
    return PlanConfig(model=args.shape, model_dtype="bfloat16", lora=lora,
                      tokenize=TokenizeConfig(max_length=args.length), featurize=FeatureSettings(dim=args.dim),
                      warmup=cpu, train=cpu)


def peak_flops(device: str) -> tuple[str, float | None]:
    """The device's name and its kind's peak dense bf16 FLOP/s (None: the CPU or an unknown kind)."""
    import torch

    from rose_select.plan import DEVICES, gpu_kind

    if device != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name()
    kind = gpu_kind(name, torch.cuda.get_device_properties(0).total_memory)
    return name, DEVICES[kind][1] if kind else None


def timed_steps(step, device: str, repeats: int) -> dict:
    """``repeats`` steps outside the counters (the traced step was their warm-up): the median
    seconds and the peak bytes in use across them (the caller subtracts its baseline)."""
    _reset_peak(device)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return {"timed_step_s": statistics.median(seconds), "timed_peak": _peak(device)}


def one(args) -> dict:
    """The measured row (this process): build on the device, reset the peak, run one step."""
    import torch
    from transformers import AutoModelForCausalLM

    from rose_select.modeling import attach_lora
    from rose_select.plan import model_config, stage_batch, stage_step
    from rose_select.plan_trace import trace

    cfg = plan_config(args)
    config = model_config(args.shape)
    config.num_hidden_layers = args.layers
    before = _in_use(args.device)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), cfg.lora)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    _reset_peak(args.device)
    t0 = time.perf_counter()
    step, held = stage_step(cfg, args.stage, model, stage_batch(args.stage, model, 1, args.length))  # on its device
    live = trace(step, [*model.parameters(), *model.buffers(), *held])
    _sync(args.device)
    row = {"measured_gib": (_peak(args.device) - before) / GIB, "live_gib": live.peak_bytes / GIB,
           "traced_tflop": live.flops / 1e12, "step_s": time.perf_counter() - t0}
    row["device_name"], row["peak_flops"] = peak_flops(args.device)
    if args.repeats:
        timed = timed_steps(step, args.device, args.repeats)
        row.update(timed_step_s=timed["timed_step_s"], timed_peak_gib=(timed["timed_peak"] - before) / GIB)
    return row


def rates(plan_flops: float, step_s: float | None, peak: float | None) -> dict:
    """Achieved TFLOP/s (the plan's FLOPs over the timed step) and the MFU (over the device's
    peak); None where there is no timed step or no known peak."""
    tflops = plan_flops / step_s / 1e12 if step_s else None
    return {"achieved_tflops": tflops, "mfu": tflops * 1e12 / peak if tflops and peak else None}


def planned(cfg, shape: str, stages, layers: list[int]) -> dict:
    from rose_select.plan import model_config, stage_fits

    fits, _ = stage_fits(cfg, model_config(shape), stages, cfg.tokenize.max_length)
    return {(s, n): fits[s][0].at(n, 1) / GIB for s in stages for n in layers} | {
        ("flops", s, n): fits[s][1].at(n, 1) for s in stages for n in layers} | {
        ("fixed", s): fits[s][0].at(0, 1) / GIB for s in stages} | {
        ("per_layer", s): fits[s][0].b / GIB + fits[s][0].d / GIB for s in stages}


def run_row(args, shape: str, layers: int, stage: str) -> dict:
    cmd = [sys.executable, __file__, "--one", "--shapes", shape, "--layers", str(layers), "--stages", stage,
           "--length", str(args.length), "--device", args.device, "--rank", str(args.rank),
           "--dim", str(args.dim), "--repeats", str(args.repeats)]
    # a fixed mmap threshold: glibc otherwise raises it after each large free and keeps later
    # tensors' freed memory in the heap, so the process would hold more than its live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # -9: the kernel's out-of-memory killer (the machine is shared)
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def skip_reason(plan_gib: float, available: float | None, max_gib: float | None) -> str | None:
    """Why a row is not run: its plan above the cap or above the memory available less 1.5 GiB."""
    room = [v for v in (max_gib, None if available is None else available / GIB - 1.5) if v is not None]
    if room and plan_gib > min(room):
        free = "unknown" if available is None else f"{available / GIB:.1f} GiB"
        return f"plan {plan_gib:.1f} GiB; {free} available, cap {max_gib}"
    return None


def rehearse(args, label: str, source: str, stage: str, layers: int, plan: dict) -> dict:
    """One row: the plan at this depth, and the measured step (``run_row``) unless it is skipped."""
    row = {"shape": label, "stage": stage, "layers": layers, "plan_gib": plan[stage, layers],
           "plan_tflop": plan["flops", stage, layers] / 1e12}
    available = _available(args.device)
    row["available_gib"] = None if available is None else available / GIB
    skipped = skip_reason(plan[stage, layers], available, args.max_gib)
    if skipped:
        return row | {"skipped": skipped}
    row.update(run_row(args, source, layers, stage))
    return row | rates(plan["flops", stage, layers], row.get("timed_step_s"), row.get("peak_flops"))


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = (f"{'shape':13s} {'stage':15s} {'layers':>6s} {'plan GiB':>9s} {'measured GiB':>12s} {'live GiB':>9s} "
          f"{'plan/measured':>13s} {'step s':>7s} {'TFLOP/s':>8s} {'MFU':>6s}")


def print_row(row: dict) -> None:
    m = row.get("measured_gib")
    head = f"{row['shape'][-13:]:13s} {row['stage']:15s} {row['layers']:6d} {row['plan_gib']:9.2f} "
    if not m:
        print(head + f"  {row.get('skipped') or row.get('error', '')[-200:]}", flush=True)
        return
    print(head + f"{m:12.2f} {row['live_gib']:9.2f} {row['plan_gib'] / m - 1:+12.1%} {row['step_s']:7.1f} "
          f"{_fmt(row.get('achieved_tflops'), '8.1f'):>8s} {_fmt(row.get('mfu'), '5.1%'):>6s}", flush=True)


def _sources(args, tmp: str) -> dict:
    """``{label: what model_config takes}``: the named shapes, config.json files or model
    directories of ``--shapes``, or with ``--tiny`` the test suite's tiny model written to ``tmp``."""
    if args.tiny:
        from transformers.utils import logging

        from rose_select.testing import write_tiny_model_dir

        logging.disable_progress_bar()
        return {"tiny": str(write_tiny_model_dir(Path(tmp) / "tiny"))}
    return {s: s for s in args.shapes.split(",") if s}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-2-7b,llama-3.1-8b",
                    help="named shapes, config.json files or model directories (what rose plan --model takes)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random model instead of --shapes (seconds a row)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", default="1,2,4")
    ap.add_argument("--stages", default="featurize_pool,validation,train,evaluate")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=128, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--dim", type=int, default=8192, help="projection dimension")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps after the traced one (default: cuda 3, cpu 0)")
    ap.add_argument("--max-gib", type=float, default=None,
                    help="skip rows planned above this (default: 12 on the CPU, a shared machine; none on CUDA)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rehearsal.json"))
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.repeats = (3 if cuda else 0) if args.repeats is None else args.repeats
    args.max_gib = (None if cuda else 12.0) if args.max_gib is None else args.max_gib
    return args


def main(argv=None) -> int:
    import torch

    from rose_select.io import write_json

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/rehearsal.py: no CUDA device; --device cpu runs the same rows", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations the plan's steps hit
    if args.one:
        args.shape, args.layers, args.stage = args.shapes, int(args.layers), args.stages
        print(json.dumps(one(args)))
        return 0
    layers, stages = [int(n) for n in args.layers.split(",")], args.stages.split(",")
    out = {"setting": {"device": args.device, "length": args.length, "dtype": "bfloat16", "lora_r": args.rank,
                       "dim": args.dim, "batch": 1, "repeats": args.repeats},
           "load_average": os.getloadavg(), "parts": {}, "rows": []}
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, source in _sources(args, tmp).items():
            args.shape = source
            plan = planned(plan_config(args), source, stages, layers)
            out["parts"][label] = {s: {"fixed_gib": plan["fixed", s], "per_layer_gib": plan["per_layer", s]}
                                   for s in stages}
            for stage in stages:
                for n in layers:
                    out["rows"].append(rehearse(args, label, source, stage, n, plan))
                    print_row(out["rows"][-1])
                    write_json(args.out, out)  # after every row: a timeout keeps the rows done
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
