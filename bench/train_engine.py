"""Benchmark: the warm-up and final-training stages of ``make demo`` on two training engines,
side by side in one run (the machine may be shared: rounds alternate the engines, so load
changes hit both).

    git archive <rev> src | tar -x -C /tmp/old      # the engine to compare against (e.g. main)
    python bench/train_engine.py --old-src /tmp/old/src --rounds 2

Settings are configs/demo.yaml's: SmolLM2-135M, the first 300 records of the built-in ShareGPT
pool, LoRA r=8/alpha 32/dropout 0.1, 128 tokens, batch 4, 2 epochs; warm-up on a seeded 5%
(15 records, lr 1e-4, a checkpoint per epoch), final training on a seeded 10% (30 records, the
size of the demo's selections, lr 2e-4). Every stage runs in a fresh process with
OMP_NUM_THREADS=1 (unless set), and reports the wall time of ``run_warmup`` / ``run_train``
(model loading included, as in the demo), and its CPU time (the work done, which
load on a shared machine disturbs less than the wall time). Prints a table; writes bench/results/train_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parent / "src"
STAGES = {"warmup": dict(fraction=0.05, lr=1e-4), "train": dict(fraction=0.1, lr=2e-4)}


def child(stage: str, out: str) -> None:
    """Run one stage in this process and print its wall time as JSON."""
    from rose_select.data.builtin import resolve_input
    from rose_select.modeling import LoraSettings
    from rose_select.tokenization import TokenizeConfig

    try:  # the layout of this checkout, or of an older one given as --old-src
        from rose_select.train import stage as training
    except ImportError:
        from rose_select import training

    cls, run = (training.WarmupConfig, training.run_warmup) if stage == "warmup" else (
        training.TrainConfig, training.run_train)
    cfg = cls(model="smollm2-135m", data=resolve_input("builtin:pool/sharegpt_demo.jsonl"), limit=300,
              lora=LoraSettings(r=8, alpha=32, dropout=0.1), tokenize=TokenizeConfig(max_length=128),
              epochs=2, batch_size=4, grad_accum=1, seed=42, device="cpu", output=out, **STAGES[stage])
    t0, c0 = time.perf_counter(), time.process_time()
    run(cfg)
    print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}))


def measure(src: Path, stage: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), ROSE_NO_PROGRESS="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, __file__, "--child", stage, "--out", str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} with {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-src", help="src/ directory of the engine to compare against (required)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.out)
        return 0
    if not args.old_src:
        p.error("--old-src is required")
    engines = {"old": Path(args.old_src).resolve(), "new": NEW_SRC}
    times = {(e, s): [] for e in engines for s in STAGES}
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for r in range(args.rounds):
            for stage in STAGES:
                for engine, src in engines.items():
                    out = Path(tmp) / f"{engine}-{stage}-{r}"
                    times[engine, stage].append(measure(src, stage, out))
                    shutil.rmtree(out, ignore_errors=True)
                    t = times[engine, stage][-1]
                    print(f"round {r + 1} {stage:6s} {engine}: {t['seconds']:.1f} s wall, {t['cpu_seconds']:.1f} s CPU",
                          flush=True)
    load.append(os.getloadavg())
    print("\n| stage | old engine wall / CPU (s) | Trainer wall / CPU (s) | ratio wall / CPU |\n|---|---|---|---|")
    for stage in STAGES:
        old, new = ([min(t[k] for t in times[e, stage]) for k in ("seconds", "cpu_seconds")] for e in ("old", "new"))
        print(f"| {stage} | {old[0]:.1f} / {old[1]:.1f} | {new[0]:.1f} / {new[1]:.1f} | "
              f"{new[0] / old[0]:.2f} / {new[1] / old[1]:.2f} |")
    print(f"(best of {args.rounds} rounds; load average before {load[0][0]:.2f}, after {load[1][0]:.2f})")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "train_engine.json").write_text(json.dumps(
        {"times": {f"{e}/{s}": v for (e, s), v in times.items()}, "loadavg": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
