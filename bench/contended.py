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


def measure(bench_args: list[str], env: dict, flags: list[str], timeout: float) -> dict:
    """One fresh bench process, featurization only: ``{"ex_per_s", "threads"}``; past ``timeout``
    seconds it is stopped and the rate is recorded as an upper bound (``n_examples / timeout``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(HERE / "featurize.py"), *bench_args, "--kinds", "sjlt", "--no-train",
               "--loop-examples", "0", "--out", str(out), *flags]
        try:
            done = subprocess.run(cmd, env=_clean_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            n = int(bench_args[bench_args.index("--n-examples") + 1])
            return {"ex_per_s": n / timeout, "upper_bound": True, "threads": None}
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        r = json.loads(out.read_text())
        return {"ex_per_s": r["rows"]["ours_sjlt"]["ex_per_s"], "upper_bound": False,
                "threads": r["setting"]["threads"]}


def _one(name: str, env: dict, flags: list[str], bench_args, competitor_threads: int, timeout: float) -> dict:
    row = {}
    for cond in ("idle", "contended"):
        comp = start_competitor(competitor_threads) if cond == "contended" else None
        try:
            time.sleep(1.0 if comp else 0)
            load = os.getloadavg()[0]
            row[cond] = {"load1_at_start": load, **measure(bench_args, env, flags, timeout)}
        finally:
            if comp:
                stop(comp)
        r = row[cond]
        print(f"  {name:28s} {cond:9s} load {load:5.2f}  threads {r['threads']}  ours_sjlt "
              f"{'<' if r['upper_bound'] else ''}{r['ex_per_s']:.3f} ex/s", flush=True)
    row["contended_vs_idle"] = row["contended"]["ex_per_s"] / row["idle"]["ex_per_s"]
    return row


def run_contended(bench_args: list[str], competitor_threads: int, cores: int, out: Path,
                  only: list[str] | None = None, timeout: float = 300) -> dict:
    results = {"competitor_threads": competitor_threads, "cores": cores, "bench_args": bench_args,
               "timeout_s": timeout, "rows": {}}
    for name, (env, flags) in variants(cores).items():
        if not only or any(o in name for o in only):
            results["rows"][name] = _one(name, env, flags, bench_args, competitor_threads, timeout)
    best = max(r["idle"]["ex_per_s"] for r in results["rows"].values())
    print(f"\nfeaturization (ex/s), '<': stopped after {timeout:.0f} s, an upper bound")
    print(f"{'setting':28s} {'idle':>9s} {'contended':>10s} {'cont./idle':>10s} {'cont./best idle':>16s}")
    mark = lambda r: "<" if r["upper_bound"] else " "  # noqa: E731
    for name, r in results["rows"].items():
        r["contended_vs_best_idle"] = r["contended"]["ex_per_s"] / best
        print(f"{name:28s} {mark(r['idle'])}{r['idle']['ex_per_s']:8.3f} {mark(r['contended'])}"
              f"{r['contended']['ex_per_s']:9.3f} {r['contended_vs_idle']:9.2f}x {r['contended_vs_best_idle']:15.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results
