"""Validation featurization before vs after issue 13, side by side on one checkpoint, and bf16 on CPU.

    python bench/validation.py --checkpoint runs/demo/warmup/ckpt-1            # the demo's setting
    python bench/validation.py --checkpoint CKPT --bf16 --pool-limit 64        # bf16 vs float32

Default: (before) two passes, ``val_pairwise`` with the DPO reference forward (``ref: base``) and
``val_sft`` over the chosen answers, vs (after) one pass with ``ref: auto`` writing both stores.
Rounds alternate the order so a load change on a shared machine hits both alike; the load average
is printed.

``--bf16``: pool (sft, Adam) and validation (pairwise, auto) featurization in float32 vs bf16:
seconds, and the fidelity of the ROSE scores (Spearman vs float32, overlap of the top 10%) and of
the features (cosine per row). ``--bf16-mode weights`` (default) loads the model in bfloat16;
``autocast`` keeps float32 weights and runs the forward under CPU autocast (bf16 matrix products,
float32 norms, softmax and residual stream); ``both`` measures the two. Writes
bench/results/validation.json or bf16.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rose_select.runtime import configure_cpu

CPU = configure_cpu() if __name__ == "__main__" else None  # before torch loads

import numpy as np  # noqa: E402

from rose_select.features.stage import FeaturizeConfig, run_featurize  # noqa: E402
from rose_select.features.store import open_features  # noqa: E402
from rose_select.data.builtin import resolve_input  # noqa: E402
from rose_select.tokenization import TokenizeConfig  # noqa: E402

SHP = "builtin:rose_data/validation/shp/shp_5_shot/shp_5_shot_preference.json"
POOL = "builtin:pool/sharegpt_demo.jsonl"


def _timed(cfg: FeaturizeConfig) -> float:
    t0 = time.perf_counter()
    run_featurize(cfg)
    return time.perf_counter() - t0


def _common(args) -> dict:
    return dict(model=args.model, checkpoint=args.checkpoint, projection="sjlt", dim=args.dim,
                batch_size=args.batch_size, tokenize=TokenizeConfig(max_length=args.max_length),
                store_dtype="float32", device="cpu")


def validation_passes(args, tmp: Path) -> dict:
    """Seconds of the separate passes (ref base) and of the joint pass (ref auto), per round."""
    val = resolve_input(args.validation)
    kw = dict(_common(args), data=val, data_kind="preference", limit=args.limit, adam=False)

    def before(k):
        return (_timed(FeaturizeConfig(**kw, loss="pairwise", ref="base", output=str(tmp / f"b{k}_pair")))
                + _timed(FeaturizeConfig(**kw, loss="sft_chosen", output=str(tmp / f"b{k}_sft"))))

    def after(k):
        return _timed(FeaturizeConfig(**kw, loss="pairwise", ref="auto", output=str(tmp / f"a{k}_pair"),
                                      chosen_output=str(tmp / f"a{k}_sft")))

    rounds = []
    for k in range(args.rounds):
        order = [("before", before), ("after", after)][:: 1 if k % 2 == 0 else -1]
        got = {"load1": os.getloadavg()[0]}
        for name, fn in order:
            got[name] = fn(k)
        print(f"  round {k}: load {got['load1']:.2f}  before {got['before']:.1f} s  after {got['after']:.1f} s  "
              f"after/before {got['after'] / got['before']:.2f}", flush=True)
        rounds.append(got)
    n = len(open_features(tmp / "a0_pair")[2]["ids"])
    b, a = sum(r["before"] for r in rounds), sum(r["after"] for r in rounds)
    return {"triples": n, "rounds": rounds, "after_vs_before": a / b,
            "s_per_triple": {"before": b / (n * args.rounds), "after": a / (n * args.rounds)}}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _top_overlap(x: np.ndarray, y: np.ndarray, fraction: float = 0.1) -> float:
    k = max(1, int(round(fraction * len(x))))
    return len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k


BF16_VARIANTS = {"weights": dict(model_dtype="bfloat16"), "autocast": dict(autocast="bfloat16")}


def _variants(args) -> dict:
    """The settings compared: float32, and the bf16 variant(s) of ``--bf16-mode`` with ``--bf16``."""
    if not args.bf16:
        return {"float32": {}}
    modes = list(BF16_VARIANTS) if args.bf16_mode == "both" else [args.bf16_mode]
    return {"float32": {}, **{m: BF16_VARIANTS[m] for m in modes}}


def bf16_fidelity(args, tmp: Path) -> dict:
    from rose_select.select.scoring import score_stores

    base = _common(args)
    pool_kw = dict(base, data=resolve_input(args.pool), data_kind="pool", limit=args.pool_limit, loss="sft")
    val_kw = dict(base, data=resolve_input(args.validation), data_kind="preference", limit=args.limit,
                  loss="pairwise", ref="auto")
    variants = _variants(args)
    out, feats = {}, {}
    for k in range(args.rounds):
        for name in (list(variants) if k % 2 == 0 else list(variants)[::-1]):
            d = tmp / f"{name}{k}"
            s = _timed(FeaturizeConfig(**pool_kw, **variants[name], output=str(d / "pool")))
            s += _timed(FeaturizeConfig(**val_kw, **variants[name], output=str(d / "val")))
            out.setdefault(name, []).append(s)
            feats[name] = d
            print(f"  round {k}: load {os.getloadavg()[0]:.2f}  {name:9s} {s:7.1f} s", flush=True)
    scores = {n: score_stores([d / "pool"], [d / "val"], np.ones(1), progress=False)[0].scores for n, d in feats.items()}
    pf = {n: np.array(open_features(d / "pool")[0], dtype=np.float64) for n, d in feats.items()}
    res = {"seconds": out}
    for name in variants:
        if name == "float32":
            continue
        cos = (pf["float32"] * pf[name]).sum(1) / (np.linalg.norm(pf["float32"], axis=1) * np.linalg.norm(pf[name], axis=1))
        res[name] = {"time_vs_float32": sum(out[name]) / sum(out["float32"]),
                     "spearman_scores": _spearman(scores["float32"], scores[name]),
                     "top10_overlap": _top_overlap(scores["float32"], scores[name]),
                     "pool_feature_cosine": {"mean": float(cos.mean()), "min": float(cos.min())}}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a warm-up checkpoint (adapter + optimizer state)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--validation", default=SHP)
    ap.add_argument("--pool", default=POOL)
    ap.add_argument("--limit", type=int, default=None, help="validation triples (default: all)")
    ap.add_argument("--pool-limit", type=int, default=64)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 vs float32 instead of before vs after")
    ap.add_argument("--bf16-mode", choices=["weights", "autocast", "both"], default="weights",
                    help="bf16 as model weights, as CPU autocast of float32 weights, or both")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("ROSE_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory(prefix="rose-bench-") as tmp:
        for name, kw in _variants(args).items():  # imports and first calls, untimed
            run_featurize(FeaturizeConfig(**_common(args), **kw, data=resolve_input(args.validation), limit=2,
                                          loss="pairwise", output=f"{tmp}/warm-{name}"))
        res = bf16_fidelity(args, Path(tmp)) if args.bf16 else validation_passes(args, Path(tmp))
    res = {"setting": {k: v for k, v in vars(args).items() if k != "out"}, "cpu": CPU, **res}
    print(json.dumps({k: v for k, v in res.items() if k not in ("setting", "rounds")}, indent=1))
    out = Path(args.out or Path(__file__).parent / "results" / ("bf16.json" if args.bf16 else "validation.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
