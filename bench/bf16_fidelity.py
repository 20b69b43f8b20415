"""bf16 that keeps the ranking? Where the precision goes, over several seeds of the demo.

    python bench/bf16_fidelity.py runs/demo runs/demo-seed1 runs/demo-seed2

Each argument is a finished ``rose run`` (``make demo``'s config at some seed): its config, planted
pool, validation file and warm-up checkpoints are reused, and its features are computed again, with
the run's own ``featurize_jobs`` and ``select_config``, once per precision:

- ``float32``: the reference (float32 weights, no autocast);
- ``bf16_weights``: the model loaded in bfloat16 (what a 7-13B model on one GPU usually needs);
- ``bf16_autocast``: float32 weights, forward and backward under bf16 autocast.

Every store is written in float32 (``store_dtype: float32``), so the storage format is not what
is measured; the run's own scores (float32 compute, its default float16 stores) give that row,
``float16_store``. For each precision and method (rose, rose_plus): Spearman of the pool scores against
float32's, and the overlap of the top 5% and top 10%. Where the loss is, comes from three views:

- *which side*: rose scores with only the pool features in bf16 (validation float32), and with
  only the validation features in bf16;
- *the per-example gradients*: cosine of each pool row (SFT loss, Adam-preconditioned) and of each
  validation chosen-answer row (SFT loss, no Adam) with its float32 row;
- *the chosen-minus-rejected difference*: cosine of each pairwise row with its float32 row, beside
  the chosen-answer rows of the same pass. Where the pairwise rows lose much more than the chosen
  rows, the two nearly parallel gradients cancel and the rounding is left;
- *Adam preconditioning* (first run only): the pool features without the Adam transform, float32
  vs bf16 autocast, scored against the float32 validation store.

Writes bench/results/bf16_fidelity.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from rose_select.runtime import configure_cpu, quiet_libraries

if __name__ == "__main__":
    quiet_libraries()  # before transformers loads: the console keeps to the bench's own lines
CPU = configure_cpu() if __name__ == "__main__" else None  # before torch loads

import numpy as np  # noqa: E402

from rose_select.config import load_yaml  # noqa: E402
from rose_select.data.builtin import resolve_input  # noqa: E402
from rose_select.features.stage import run_featurize  # noqa: E402
from rose_select.pipeline import RunConfig, _checkpoints, featurize_jobs, select_config  # noqa: E402
from rose_select.select.scoring import load_store_features, score_stores  # noqa: E402
from rose_select.select.stage import run_select  # noqa: E402
from validation import _spearman as spearman, _top_overlap as top_overlap  # noqa: E402  (bench/validation.py)

PRECISIONS = {"float32": {}, "bf16_weights": {"model_dtype": "bfloat16"},
              "bf16_autocast": {"featurize.autocast": "bfloat16"}}
METHODS = ("rose", "rose_plus")


def row_cosines(a: np.ndarray, b: np.ndarray) -> dict:
    """Cosine of each row of ``a`` with the same row of ``b`` (rows that are zero in both left out)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    keep = (na > 0) & (nb > 0)
    cos = (a[keep] * b[keep]).sum(1) / (na[keep] * nb[keep])
    return {"mean": float(cos.mean()), "min": float(cos.min()), "p05": float(np.quantile(cos, 0.05))}


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    return {"spearman": spearman(ref, got), "top5_overlap": top_overlap(ref, got, 0.05),
            "top10_overlap": top_overlap(ref, got, 0.10)}


def with_precision(cfg: RunConfig, out: Path, precision: dict) -> RunConfig:
    featurize = replace(cfg.featurize, store_dtype="float32",
                        **{k.split(".", 1)[1]: v for k, v in precision.items() if k.startswith("featurize.")})
    top = {k: v for k, v in precision.items() if "." not in k}
    return replace(cfg, **top, featurize=featurize, output_dir=str(out))


def featurize_and_score(run: Path, cfg: RunConfig, out: Path) -> dict:
    """Every store the run's methods need, at ``cfg``'s precision, and each method's pool scores."""
    pool, validation = str(run / "planted" / "pool.jsonl"), resolve_input(cfg.validation)
    if not Path(pool).exists():
        pool = resolve_input(cfg.pool)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "warmup").exists():
        (out / "warmup").symlink_to((run / "warmup").resolve())  # the checkpoint weights' learning rates
    ckpts = _checkpoints(cfg, out / "warmup")
    seconds = 0.0
    for _, job in featurize_jobs(cfg, out, out, pool, validation, ckpts):
        t0 = time.perf_counter()
        run_featurize(job)
        seconds += time.perf_counter() - t0
    scores = {}
    for method in METHODS:
        sel = select_config(cfg, out, out, method, pool, validation, ckpts)
        run_select(replace(sel, plots=False))
        scores[method] = np.load(Path(sel.output) / "scores.npy")
    stores = {name: [str(out / "features" / c.name / name) for c in ckpts] for name in ("pool", "val_pairwise", "val_sft")}
    return {"seconds": seconds, "scores": scores, "stores": stores}


def adam_view(run: Path, cfg: RunConfig, work: Path, got: dict) -> dict:
    """Adam's share: the pool features again without the Adam transform, in float32 and under bf16
    autocast, scored against the float32 validation store (rose). If bf16 keeps this ranking
    much better than the Adam one, the preconditioning (which divides by the root of the second
    moment, so near-zero, cancelling gradients are magnified) is where the precision goes."""
    pool, validation = str(run / "planted" / "pool.jsonl"), resolve_input(cfg.validation)
    scores = {}
    for name in ("float32", "bf16_autocast"):
        vcfg = with_precision(cfg, work / name, PRECISIONS[name])
        ckpts = _checkpoints(cfg, work / name / "warmup")
        stores = []
        for _, job in featurize_jobs(vcfg, work / name, work / name, pool, validation, ckpts):
            if job.data_kind == "pool":
                job = replace(job, adam=False, output=str(Path(job.output).with_name("pool_no_adam")))
                run_featurize(job)
                stores.append(job.output)
        scores[name] = score_stores(stores, got["float32"]["stores"]["val_pairwise"], np.ones(len(stores)),
                                    progress=False)[0].scores
    return fidelity(scores["float32"], scores["bf16_autocast"])


def one_seed(run: Path, work: Path, with_adam_view: bool = False) -> dict:
    cfg = load_yaml(RunConfig, run / "config.yaml")
    got = {}
    for name, precision in PRECISIONS.items():
        print(f"[bf16] {run} seed {cfg.seed}: {name} (load {os.getloadavg()[0]:.2f})", flush=True)
        got[name] = featurize_and_score(run, with_precision(cfg, work / name, precision), work / name)
        print(f"[bf16]   {got[name]['seconds']:.1f} s of featurization", flush=True)
    ref = got["float32"]
    row = {"run": str(run), "seed": cfg.seed, "pool_rows": int(len(ref["scores"]["rose"])),
           "seconds": {n: g["seconds"] for n, g in got.items()}, "store_dtype_of_run": cfg.featurize.store_dtype,
           "float16_store": {m: fidelity(ref["scores"][m], np.load(run / "select" / m / "scores.npy"))
                             for m in METHODS if (run / "select" / m / "scores.npy").exists()}}
    ones = np.ones(len(ref["stores"]["pool"]))
    for name, g in got.items():
        if name == "float32":
            continue
        feats = {k: np.concatenate([load_store_features(p).features for p in g["stores"][k]], axis=1) for k in g["stores"]}
        ref_feats = {k: np.concatenate([load_store_features(p).features for p in ref["stores"][k]], axis=1)
                     for k in ref["stores"]}
        pool_only = score_stores(g["stores"]["pool"], ref["stores"]["val_pairwise"], ones, progress=False)[0].scores
        val_only = score_stores(ref["stores"]["pool"], g["stores"]["val_pairwise"], ones, progress=False)[0].scores
        row[name] = {
            **{m: fidelity(ref["scores"][m], g["scores"][m]) for m in METHODS},
            "rose_bf16_pool_only": fidelity(ref["scores"]["rose"], pool_only),
            "rose_bf16_validation_only": fidelity(ref["scores"]["rose"], val_only),
            "cosine": {k: row_cosines(ref_feats[k], feats[k]) for k in feats},
            "time_vs_float32": g["seconds"] / ref["seconds"],
        }
    if with_adam_view:
        row["bf16_autocast_pool_without_adam"] = adam_view(run, cfg, work, got)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| seed | precision | time vs fp32 | rose: Spearman / top-5% / top-10% | rose_plus: Spearman / top-5% / top-10% "
             "| rose, bf16 pool only | rose, bf16 validation only | cosine pool (mean / min) | cosine val chosen (mean / min) "
             "| cosine val pairwise (mean / min) |", "|" + "---|" * 10]
    f3 = lambda d: f"{d['spearman']:.4f} / {d['top5_overlap']:.2f} / {d['top10_overlap']:.2f}"  # noqa: E731
    c2 = lambda d: f"{d['mean']:.4f} / {d['min']:.3f}"  # noqa: E731
    for r in rows:
        if len(r["float16_store"]) == len(METHODS):
            g = r["float16_store"]
            lines.append(f"| {r['seed']} | float32, float16 store (the run's) | | {f3(g['rose'])} | {f3(g['rose_plus'])} "
                         "| | | | | |")
        for name in PRECISIONS:
            if name == "float32":
                continue
            g = r[name]
            lines.append(f"| {r['seed']} | {name} | {g['time_vs_float32']:.2f}x | {f3(g['rose'])} | {f3(g['rose_plus'])} "
                         f"| {g['rose_bf16_pool_only']['spearman']:.4f} | {g['rose_bf16_validation_only']['spearman']:.4f} "
                         f"| {c2(g['cosine']['pool'])} | {c2(g['cosine']['val_sft'])} | {c2(g['cosine']['val_pairwise'])} |")
    return "\n".join(lines)


PACKAGE_TABLE = Path(__file__).parent.parent / "src" / "rose_select" / "assets" / "precision_fidelity.json"


def package_table(rows: list[dict], when: str) -> dict:
    """The worst seed and method per precision: what ``rose featurize`` records in a store's
    ``meta.json`` beside the precision it used (features/stage.py, ``measured_fidelity``)."""
    modes = {}
    for name in [*[n for n in PRECISIONS if n != "float32"], "float16_store"]:
        got = [r[name][m] for r in rows for m in METHODS if m in r.get(name, {})]
        if got:
            modes[name] = {k: round(min(g[k] for g in got), 4) for k in ("spearman", "top5_overlap", "top10_overlap")}
            modes[name]["of"] = f"{len(rows)} seeds x {list(METHODS)}, worst"
    return {"source": f"bench/bf16_fidelity.py, {when}: the demo (configs/demo.yaml) at seeds "
                      f"{[r['seed'] for r in rows]}, ROSE scores against the float32 path", "modes": modes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished `rose run` directories (one per seed)")
    ap.add_argument("--work", default="runs/bench-bf16", help="where the re-featurized stores go")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16_fidelity.json"))
    ap.add_argument("--no-adam-view", action="store_true", help="skip the pool features without Adam (first run)")
    ap.add_argument("--package", action="store_true", help=f"also write the summary {PACKAGE_TABLE.name} into the "
                    "package (what `rose featurize` records as a store's measured fidelity)")
    args = ap.parse_args(argv)
    os.environ.setdefault("ROSE_NO_PROGRESS", "1")
    rows = []
    for i, run in enumerate(map(Path, args.runs)):
        rows.append(one_seed(run, Path(args.work) / run.name, with_adam_view=i == 0 and not args.no_adam_view))
        print(table(rows[-1:]), flush=True)
    res = {"cpu": CPU, "load_end": os.getloadavg(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(rows))
    if args.package:
        PACKAGE_TABLE.write_text(json.dumps(package_table(rows, time.strftime("%Y-%m-%d")), indent=2) + "\n")
        print(f"wrote {PACKAGE_TABLE}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
