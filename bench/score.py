"""Benchmark: ROSE scoring + top-5% selection over a large on-disk pool feature store.

Writes a synthetic ``[rows, dim]`` float16 pool store (default 1,000,000 x 8192, about 16 GB) in a
separate process, then times ``rose_scores`` + ``select_top`` in this process and samples its
memory: peak VmHWM / ``ru_maxrss`` (which count mapped file pages) and the peak anonymous memory
(RssAnon, sampled by a thread), the part that is really ours. Target: < 4 GiB at 1M rows.

    python bench/score.py --rows 100000          # quick check
    python bench/score.py                        # the full 1M x 8192 run (needs ~17 GB free)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

GIB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="pool rows (default 1,000,000)")
    p.add_argument("--dim", type=int, default=8192, help="feature dimension (default 8192)")
    p.add_argument("--val-rows", type=int, default=1000, help="validation rows (default 1000)")
    p.add_argument("--groups", type=int, default=10, help="validation subtasks (default 10)")
    p.add_argument("--checkpoints", type=int, default=2, help="checkpoints (default 2)")
    p.add_argument("--distinct-checkpoints", action="store_true",
                   help="write one pool file per checkpoint (default: all checkpoints read the same file)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: 128 MiB buffer)")
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm", action="store_true",
                   help="keep the written pool in the page cache (default: drop it, so reads hit disk)")
    p.add_argument("--workdir", default="bench/results/score_work")
    p.add_argument("--out", default="bench/results/score.json")
    p.add_argument("--keep", action="store_true", help="keep the synthetic stores afterwards")
    p.add_argument("--generate-only", metavar="PATH", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data

def write_pool(path: Path, rows: int, dim: int, seed: int, warm: bool) -> None:
    """One feature store: features.npy [rows, dim] float16 (written in chunks) + rows.json + meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path / "features.npy", mode="w+", dtype=np.float16, shape=(rows, dim))
    step = max(1, (64 << 20) // (dim * 4))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        arr[start:end] = rng.standard_normal((end - start, dim), dtype=np.float32)
    arr.flush()
    del arr
    (path / "rows.json").write_text(json.dumps({"ids": [f"p{i}" for i in range(rows)], "groups": None}))
    (path / "meta.json").write_text(json.dumps({"complete": True, "synthetic": True}))
    if not warm:
        drop_cache(path / "features.npy")


def drop_cache(file: Path) -> None:
    """Ask the kernel to evict a file from the page cache (best effort)."""
    try:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------- memory

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemorySampler(threading.Thread):
    """Samples /proc/self/status every ``interval`` seconds and keeps the maxima."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, {}, threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            for k, v in proc_status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        for k, v in proc_status().items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        return self.peak


# ---------------------------------------------------------------------------- main

def check_disk(workdir: Path, need: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"error: the synthetic pool needs {need / GIB:.1f} GiB (+1 GiB headroom) in {workdir}, "
                 f"but only {free / GIB:.1f} GiB is free. Use --rows to run smaller, --workdir on a "
                 f"bigger disk, or drop --distinct-checkpoints.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.generate_only:
        write_pool(Path(args.generate_only), args.rows, args.dim, args.seed, args.warm)
        return 0
    from rose_select.select.scoring import checkpoint_weights, rose_scores
    from rose_select.select.topk import select_top

    workdir = Path(args.workdir)
    n_files = args.checkpoints if args.distinct_checkpoints else 1
    pool_bytes = args.rows * args.dim * 2
    check_disk(workdir, n_files * pool_bytes + GIB)

    t0 = time.perf_counter()
    paths = [workdir / f"pool_ckpt{i}" for i in range(n_files)]
    for i, path in enumerate(paths):  # a child process writes, so its pages never count here
        subprocess.run([sys.executable, __file__, "--generate-only", str(path), "--rows", str(args.rows),
                        "--dim", str(args.dim), "--seed", str(args.seed + i)]
                       + (["--warm"] if args.warm else []), check=True)
    write_s = time.perf_counter() - t0

    try:
        rng = np.random.default_rng(args.seed + 1000)
        groups = [f"subtask{j % args.groups}" for j in range(args.val_rows)]
        vals = [rng.standard_normal((args.val_rows, args.dim), dtype=np.float32).astype(np.float16)
                for _ in range(args.checkpoints)]
        trains = [np.load(paths[i % n_files] / "features.npy", mmap_mode="r")
                  for i in range(args.checkpoints)]
        weights = checkpoint_weights([2e-5 * (1 - i / (2 * args.checkpoints)) for i in range(args.checkpoints)])
        base = proc_status()
        sampler = MemorySampler()
        sampler.start()
        t1 = time.perf_counter()
        result = rose_scores(trains, vals, weights, groups, chunk_rows=args.chunk_rows)
        t2 = time.perf_counter()
        selected = select_top(result.scores, fraction=args.fraction)
        t3 = time.perf_counter()
        peak = sampler.stop()
    finally:
        if not args.keep:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)

    bytes_read = args.checkpoints * pool_bytes
    report = {
        "rows": args.rows, "dim": args.dim, "checkpoints": args.checkpoints,
        "distinct_checkpoint_files": args.distinct_checkpoints, "val_rows": args.val_rows,
        "groups": args.groups, "chunk_rows": args.chunk_rows, "cache": "warm" if args.warm else "cold",
        "n_selected": int(len(selected)),
        "write_s": round(write_s, 2), "score_s": round(t2 - t1, 2), "select_s": round(t3 - t2, 3),
        "rows_per_s": round(args.rows / (t2 - t1)), "read_gb_per_s": round(bytes_read / 1e9 / (t2 - t1), 2),
        "peak_vmhwm_gib": round(peak.get("VmHWM", 0) / GIB, 3),
        "peak_rss_gib": round(peak.get("VmRSS", 0) / GIB, 3),
        "peak_rss_anon_gib": round(peak.get("RssAnon", 0) / GIB, 3),
        "peak_rss_file_gib": round(peak.get("RssFile", 0) / GIB, 3),
        "baseline_rss_anon_gib": round(base.get("RssAnon", 0) / GIB, 3),
        "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
        "target_gib": 4.0, "cpu_count": os.cpu_count(),
    }
    report["under_target"] = report["peak_vmhwm_gib"] < 4.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(k) for k in report)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in report.items()))
    print(f"\n{args.rows} rows x {args.dim} x {args.checkpoints} ckpts: score {report['score_s']} s "
          f"({report['read_gb_per_s']} GB/s), select {report['select_s']} s, peak RSS "
          f"{report['peak_vmhwm_gib']} GiB (anon {report['peak_rss_anon_gib']} GiB) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
