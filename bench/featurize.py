"""Throughput of per-example LoRA gradient features vs plain LoRA training and the LESS loop.

    python bench/featurize.py            # SmolLM2-135M, r=128/alpha=512 on q/k/v/o, d=8192, 256 tokens
    python bench/featurize.py --quick    # small CPU smoke setting
    python bench/featurize.py --contended   # throughput under a competing CPU-bound process

(a) LoRA training: forward + backward + AdamW step, examples/s.
(b) LESS-style loop: batch 1, loss.backward(), full flattened gradient, dense Rademacher projection.
(c) ours: one forward + one backward per batch with per-example hooks, for each projection kind.
Writes bench/results/featurize.json.

``--contended``: for each CPU setting (the OpenMP default wait policy with every core, passive
waiting with every core, passive with one thread, and ``rose_select.runtime``'s automatic choice)
runs (a) and (c, sjlt) in a fresh process, idle and then with a competing CPU-bound process
(``--competitor-threads`` threads of matrix products), side by side, and reports each setting's
contended throughput relative to its own idle one and to the best idle one, with the load average.
Writes bench/results/contended.json. Settings the OpenMP runtime reads at start-up (the wait
policy) need a fresh process, hence one per measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from rose_select.runtime import configure_cpu

CPU = configure_cpu() if __name__ == "__main__" and "--no-runtime" not in sys.argv else None  # before torch

import torch  # noqa: E402

from rose_select.features import gradients as G
from rose_select.modeling import LoraSettings, attach_lora, load_model, lora_parameters
from rose_select.features.projection import make_projector


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device) -> dict:
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    return out


def _batches(n, bs, seq, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    out = []
    for k in range(0, n, bs):
        b = ids[k:k + bs]
        out.append({"input_ids": b.to(device), "labels": labels[k:k + bs].to(device),
                    "attention_mask": torch.ones_like(b).to(device)})
    return out


def bench_train(model, batches, device, amp):
    params = list(lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(b):
        with G._autocast(device, amp):
            loss = G.sft_loss_fn(model, b).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        step(b)
        n += b["input_ids"].shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def bench_loop(model, batches, device, proj, n_max):
    singles = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    singles = singles[: n_max + 1]
    G.loop_features(model, singles[:1], G.sft_loss_fn, proj)
    _sync(device)
    t0 = time.perf_counter()
    G.loop_features(model, singles[1:], G.sft_loss_fn, proj)
    _sync(device)
    return (len(singles) - 1) / (time.perf_counter() - t0)


def bench_ours(model, batches, device, proj, amp, adam):
    G.per_example_features(model, batches[0], G.sft_loss_fn, proj, adam=adam, autocast_dtype=amp)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        G.per_example_features(model, b, G.sft_loss_fn, proj, adam=adam, autocast_dtype=amp)
        n += b["input_ids"].shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=None, help="default 4 * rank")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-examples", type=int, default=64)
    ap.add_argument("--loop-examples", type=int, default=4, help="examples timed for the slow LESS loop")
    ap.add_argument("--kinds", default="sjlt,rademacher", help="projection kinds for ours (none: exact, big)")
    ap.add_argument("--no-adam", action="store_true", help="ours without the Adam transform")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="r=8, d=256, 64 tokens, batch 4, 8 examples")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/featurize.json, "
                                                "contended.json with --contended)")
    ap.add_argument("--contended", action="store_true", help="idle vs beside a competing CPU-bound process, "
                    "per CPU setting (default setting: r=8, d=2048, 128 tokens, batch 8, 32 examples)")
    ap.add_argument("--competitor-threads", type=int, default=2)
    ap.add_argument("--settings", default="", help="--contended: comma-separated substrings of the "
                    "settings to measure (default: all)")
    ap.add_argument("--no-runtime", action="store_true", help="leave the OpenMP defaults (no rose_select.runtime)")
    ap.add_argument("--no-train", action="store_true", help="skip (a) training")
    ap.add_argument("--timeout", type=float, default=300, help="--contended: seconds per measurement")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.contended:
        return _contended(args, argv)
    args.out = args.out or str(Path(__file__).parent / "results" / "featurize.json")
    if args.quick:
        args.rank, args.dim, args.seq_len, args.batch_size, args.n_examples, args.loop_examples = 8, 256, 64, 4, 8, 2
    alpha = args.alpha or 4.0 * args.rank
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model = load_model(args.model, device=str(device))
    model = attach_lora(model, LoraSettings(r=args.rank, alpha=alpha, dropout=0.0)).to(device).eval()
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    numels = dict(G.param_numels(model))
    n_params = sum(numels.values())
    vocab = model.get_input_embeddings().weight.shape[0]
    batches = _batches(args.n_examples, args.batch_size, args.seq_len, vocab, device)
    adam = None if args.no_adam else G.AdamState(
        {n: (torch.zeros(p.shape), torch.full(p.shape, 1e-6)) for n, p in lora_parameters(model).items()}).to(device)

    results = {"setting": {"model": args.model, "rank": args.rank, "alpha": alpha, "dim": args.dim,
                           "batch_size": args.batch_size, "seq_len": args.seq_len, "n_examples": args.n_examples,
                           "lora_params": n_params, "device": str(device), "adam": adam is not None,
                           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": CPU},
               "rows": {}}
    rows = results["rows"]
    print(f"model {args.model}: {n_params:,} LoRA parameters (r={args.rank}), d={args.dim}, "
          f"{args.seq_len} tokens, batch {args.batch_size}, device {device}", flush=True)

    if not args.no_train:
        rows["train"] = {"ex_per_s": bench_train(model, batches, device, amp), **_peak_mb(device)}
        print(f"  (a) train           {rows['train']['ex_per_s']:8.2f} ex/s", flush=True)
    for kind in [k for k in args.kinds.split(",") if k]:
        proj = make_projector(kind, 0 if kind == "none" else args.dim, 0, numels, device=device)
        rows[f"ours_{kind}"] = {"ex_per_s": bench_ours(model, batches, device, proj, amp, adam), **_peak_mb(device)}
        print(f"  (c) ours {kind:10s} {rows[f'ours_{kind}']['ex_per_s']:8.2f} ex/s", flush=True)
    if args.loop_examples > 0:
        proj = make_projector("rademacher", args.dim, 0, numels, device=device)
        rows["less_loop"] = {"ex_per_s": bench_loop(model, batches, device, proj, args.loop_examples),
                             "examples_timed": args.loop_examples, **_peak_mb(device)}
        print(f"  (b) LESS loop       {rows['less_loop']['ex_per_s']:8.2f} ex/s", flush=True)

    print(f"\n{'method':18s} {'ex/s':>10s} {'vs train':>9s} {'vs LESS':>9s} {'maxrss MB':>10s}")
    for name, r in rows.items():
        r["vs_train"] = r["ex_per_s"] / rows["train"]["ex_per_s"] if "train" in rows else None
        r["vs_less_loop"] = r["ex_per_s"] / rows["less_loop"]["ex_per_s"] if "less_loop" in rows else None
        vs_less = "" if r["vs_less_loop"] is None else f"{r['vs_less_loop']:8.2f}x"
        vs_train = "" if r["vs_train"] is None else f"{r['vs_train']:8.2f}x"
        print(f"{name:18s} {r['ex_per_s']:10.2f} {vs_train:>9s} {vs_less:>9s} "
              f"{r['ru_maxrss_mb']:10.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _contended(args, argv) -> int:
    from contended import run_contended

    from rose_select.runtime import available_cores

    passed = [a for a in (argv if argv is not None else sys.argv[1:])
              if a not in ("--contended", "--no-runtime")]
    if not any(a.startswith("--rank") for a in passed):  # the setting unless given
        passed = ["--rank", "8", "--dim", "2048", "--seq-len", "128", "--batch-size", "8",
                  "--n-examples", "32", *passed]
    for flag in ("--competitor-threads", "--settings", "--out", "--timeout"):  # ours, not the child's
        if flag in passed:
            i = passed.index(flag)
            del passed[i:i + 2]
    out = Path(args.out or Path(__file__).parent / "results" / "contended.json")
    only = [s for s in args.settings.split(",") if s]
    run_contended(passed, args.competitor_threads, available_cores(), out, only, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
