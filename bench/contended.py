"""``bench/featurize.py --contended``: throughput idle vs under a competing CPU-bound process.

Each measurement is a fresh ``bench/featurize.py`` process (the OpenMP runtime reads its wait
policy when torch loads), run once with the machine as it is ("idle", which on a shared machine
is not idle: the load average is printed) and once beside a competitor process, side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPETITOR = ("import torch, sys\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(384, 384)\n"
              "while True:\n    a = torch.tanh(a @ a)\n")
OMP_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "ROSE_THREADS", "MKL_NUM_THREADS")


def variants(cores: int) -> dict:
    """name -> (environment settings, extra flags)."""
    return {"openmp-default": ({"OMP_NUM_THREADS": str(cores)}, ["--no-runtime"]),
            "passive": ({"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cores)}, []),
            "passive-1-thread": ({"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}, []),
            "auto (rose_select.runtime)": ({}, [])}


def _clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env.update(extra, ROSE_NO_PROGRESS="1")
    return env


def start_competitor(threads: int) -> subprocess.Popen:
    """A CPU-bound process with the OpenMP defaults (as another user's job would have)."""
    return subprocess.Popen([sys.executable, "-c", COMPETITOR, str(threads)], env=_clean_env({}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(bench_args: list[str], env: dict, flags: list[str]) -> dict:
    """One fresh bench process: its ``rows`` (ex/s of train and ours) and settings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(HERE / "featurize.py"), *bench_args, "--kinds", "sjlt",
               "--loop-examples", "0", "--out", str(out), *flags]
        done = subprocess.run(cmd, env=_clean_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_contended(bench_args: list[str], competitor_threads: int, cores: int, out: Path,
                  only: list[str] | None = None) -> dict:
    results = {"competitor_threads": competitor_threads, "cores": cores, "bench_args": bench_args, "rows": {}}
    for name, (env, flags) in variants(cores).items():
        if only and not any(o in name for o in only):
            continue
        row = {}
        for cond in ("idle", "contended"):
            comp = start_competitor(competitor_threads) if cond == "contended" else None
            try:
                time.sleep(1.0 if comp else 0)
                load = os.getloadavg()[0]
                r = measure(bench_args, env, flags)
            finally:
                if comp:
                    stop(comp)
            row[cond] = {"load1_at_start": load, "cpu": r["setting"].get("cpu"),
                         **{k: v["ex_per_s"] for k, v in r["rows"].items()}}
            print(f"  {name:28s} {cond:9s} load {load:5.2f}  threads {r['setting']['threads']}  "
                  + "  ".join(f"{k} {v['ex_per_s']:.3f} ex/s" for k, v in r["rows"].items()), flush=True)
        row["contended_vs_idle"] = {k: row["contended"][k] / row["idle"][k] for k in ("train", "ours_sjlt")}
        results["rows"][name] = row
    best = {k: max(r["idle"][k] for r in results["rows"].values()) for k in ("train", "ours_sjlt")}
    print(f"\n{'setting':28s} {'ours idle':>10s} {'ours busy':>10s} {'busy/idle':>10s} {'busy/best idle':>15s}"
          f" {'train busy/idle':>16s}")
    for name, r in results["rows"].items():
        r["contended_vs_best_idle"] = {k: r["contended"][k] / best[k] for k in best}
        print(f"{name:28s} {r['idle']['ours_sjlt']:10.3f} {r['contended']['ours_sjlt']:10.3f} "
              f"{r['contended_vs_idle']['ours_sjlt']:9.2f}x {r['contended_vs_best_idle']['ours_sjlt']:14.2f}x "
              f"{r['contended_vs_idle']['train']:15.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results
