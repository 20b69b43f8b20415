"""Benchmark: featurization in 1 and N processes, and scoring at pool scale.

    python bench/scale.py                                  # SmolLM2-135M, 1 and 2 processes, scoring at 1M rows
    python bench/scale.py --examples 16 --score-rows 100000   # a quick run

Featurization: the same pool (real ShareGPT instructions from the bundled demo snapshot) with a
synthetic warm-up checkpoint (random LoRA weights and Adam moments), run once per process count
through torchrun (gloo on CPU); a machine's cores are split evenly between the processes
(OMP_NUM_THREADS = cores // N). Each process reports the time of its batch loop (model loading
and tokenisation excluded; the wall time with them is reported too) and its own peak RSS.
Scoring: ``bench/score.py`` in a subprocess (ROSE scores + top-5% over a synthetic float16 pool
store of ``--score-rows`` rows). Prints a table; writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--examples", type=int, default=64, help="pool examples to featurize (default 64)")
    p.add_argument("--nprocs", default="1,2",
                   help="runs to compare: N (N processes, cores // N threads each) or NxT (T threads each); "
                        "default 1,2")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dim", type=int, default=8192, help="projection dimension (default 8192)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8, the CPU demo setting)")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--score-rows", type=int, default=1_000_000, help="pool rows to score (0: skip scoring)")
    p.add_argument("--score-dim", type=int, default=8192)
    p.add_argument("--workdir", default=str(HERE / "results" / "scale_work"))
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    p.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)  # a torchrun process
    p.add_argument("--report-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- inputs

def write_inputs(args, work: Path) -> tuple[Path, Path]:
    """The pool file and a warm-up-like checkpoint (random LoRA weights and Adam moments, seeded)."""
    from rose_select.data import demo_pool, write_pool_jsonl
    from rose_select.modeling import LoraSettings
    from rose_select.testing import write_lora_checkpoint

    pool = work / "pool.jsonl"
    write_pool_jsonl(demo_pool(args.examples, seed=0), pool)
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha)
    return pool, write_lora_checkpoint(args.model, work / "ckpt", lora)


# ---------------------------------------------------------------------------- featurization

def worker(config: str, report_dir: str) -> int:
    """One process (of torchrun's N, or the only one): featurize, then report time and memory."""
    import torch

    from rose_select.config import load_yaml
    from rose_select.features.stage import FeaturizeConfig, run_featurize

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    stats = {}
    t0 = time.perf_counter()
    run_featurize(load_yaml(FeaturizeConfig, config), stats=stats)
    rank = int(os.environ.get("RANK", 0))
    report = {"rank": rank, "threads": torch.get_num_threads(), "call_s": time.perf_counter() - t0,
              "loop_s": stats["seconds"], "batches": stats["batches"],
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))
    return 0


def parse_runs(spec: str) -> list[tuple[int, int]]:
    """``"1,2,1x1"`` -> ``[(1, cores), (2, cores // 2), (1, 1)]`` (processes, threads each)."""
    from rose_select.distributed import threads_per_process

    runs = []
    for item in spec.split(","):
        n, _, t = item.strip().partition("x")
        runs.append((int(n), int(t) if t else threads_per_process(int(n))))
    return runs


def featurize_run(args, cfg_path: Path, out: Path, nproc: int, threads: int) -> dict:
    reports = out.parent / f"reports_{nproc}x{threads}"
    shutil.rmtree(reports, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    reports.mkdir(parents=True)
    me = [str(Path(__file__).resolve()), "--worker", str(cfg_path), "--report-dir", str(reports)]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ROSE_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    subprocess.run(launcher + me, env=env, check=True)
    wall = time.perf_counter() - t0
    ranks = sorted((json.loads(p.read_text()) for p in reports.glob("rank*.json")), key=lambda r: r["rank"])
    loop = max(r["loop_s"] for r in ranks)
    return {"processes": nproc, "threads_per_process": ranks[0]["threads"], "examples": args.examples,
            "loop_s": round(loop, 2), "examples_per_s": round(args.examples / loop, 3),
            "wall_s_with_startup": round(wall, 2),
            "peak_rss_gib_per_process": [round(r["peak_rss_gib"], 3) for r in ranks]}


def featurize_all(args, work: Path) -> list[dict]:
    from rose_select.config import save_yaml
    from rose_select.features.stage import FeaturizeConfig
    from rose_select.features.store import open_features
    from rose_select.tokenization import TokenizeConfig

    pool, ckpt = write_inputs(args, work)
    rows, first = [], None
    for nproc, threads in parse_runs(args.nprocs):
        out = work / f"features_{nproc}x{threads}"
        cfg = FeaturizeConfig(model=args.model, checkpoint=str(ckpt), data=str(pool), loss="sft", dim=args.dim,
                              batch_size=args.batch_size, tokenize=TokenizeConfig(max_length=args.max_length), output=str(out))
        cfg_path = work / f"featurize_{nproc}x{threads}.yaml"
        save_yaml(cfg, cfg_path)
        row = featurize_run(args, cfg_path, out, nproc, threads)
        feats = open_features(out)[0].tobytes()
        first = first or feats
        row["same_bytes_as_first"] = feats == first
        rows.append(row)
        print(f"featurize, {nproc} process(es) x {threads} thread(s): {row}", flush=True)
    return rows


# ---------------------------------------------------------------------------- scoring

def score(args, work: Path) -> dict | None:
    if args.score_rows <= 0:
        return None
    out = work / "score.json"
    subprocess.run([sys.executable, str(HERE / "score.py"), "--rows", str(args.score_rows), "--dim",
                    str(args.score_dim), "--workdir", str(work / "score_work"), "--out", str(out)], check=True)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------- report

def table(feat_rows: list[dict], scored: dict | None) -> str:
    lines = ["| stage | processes x threads | size | time (s) | throughput | peak RSS per process (GiB) |",
             "|---|---|---|---|---|---|"]
    for r in feat_rows:
        lines.append(f"| featurize | {r['processes']} x {r['threads_per_process']} | {r['examples']} examples | "
                     f"{r['loop_s']} (wall {r['wall_s_with_startup']}) | {r['examples_per_s']} ex/s | "
                     f"{', '.join(str(m) for m in r['peak_rss_gib_per_process'])} |")
    if scored:
        lines.append(f"| score + select top 5% | 1 | {scored['rows']:,} x {scored['dim']} | "
                     f"{scored['score_s']} + {scored['select_s']} | {scored['rows_per_s']:,} rows/s | "
                     f"{scored['peak_vmhwm_gib']} (anonymous {scored['peak_rss_anon_gib']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from rose_select.runtime import available_cores

    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.report_dir)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    feat_rows = featurize_all(args, work)
    scored = score(args, work)
    report = {"model": args.model, "examples": args.examples, "max_length": args.max_length,
              "batch_size": args.batch_size, "dim": args.dim, "lora_r": args.lora_r, "cores": available_cores(),
              "featurize": feat_rows, "score": scored, "command": " ".join(["python", "bench/scale.py", *sys.argv[1:]])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(feat_rows, scored))
    print(f"\n-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
