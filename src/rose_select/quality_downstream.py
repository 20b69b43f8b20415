"""The downstream half of the planted-pool benchmark: does a selection train a better model?

``rose experiment quality`` with ``downstream_methods`` fine-tunes, for every seed and target, one
LoRA model on each listed selection (a method row of the benchmark, or the length rule), with the
run's ``train`` section, and measures its held-out preference accuracy (DPO implicit reward
against the base model, ``rewards/accuracies``) on the target's *evaluation pairs*: the larger-shot
file minus the validation prompts, minus this seed's planted prompts (the model never saw them,
as answers or as prompts), minus pairs whose two answers are equal. Every model of one (seed,
target) is evaluated on the same pairs against one cached reference, so its differences are
paired; the figures are aggregated as a mean with a 95% t-interval over seeds, and pooled over
every seed's pairs with a Wilson interval.

The planted pool makes this sharper than the generic Table 1: a selection that picks the target's
dispreferred answers teaches the model the wrong preference, and one that misses the domain
teaches it little.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select import plots
from rose_select.config import to_dict
from rose_select.data import (
    find_heldout_file,
    first_per_subtask,
    heldout_pairs,
    load_pool,
    load_preferences,
    with_preference,
)
from rose_select.data.heldout import prompt_key
from rose_select.data.preferences import shot_file_info, target_name
from rose_select.errors import ConfigError
from rose_select.evaluation import (
    _cached_reference,
    golden_stats,
    implicit_reward,
    preference_metrics,
    test_prompts_by_subtask,
    triple_stats,
)
from rose_select.io import atomic_path, run_once, sha256_file, write_json
from rose_select.modeling import load_adapter, load_model, load_tokenizer
from rose_select.runtime import resolve_device
from rose_select.pipeline import eval_config, resolve_input, training_configs
from rose_select.records import InstructionRecord, PreferenceTriple
from rose_select.select.topk import select_top, write_selection
from rose_select.quality_length import N_BOOT, REFERENCES, bootstrap_stat, fmt_stat, replicate_means
from rose_select.stats import cluster_bootstrap_counts, fmt_interval, mean_interval, sign_test, wilson_interval
from rose_select.train.stage import run_train

LENGTH_RULE = "length"
MEASURES = {"pairs": "accuracy, paired", "golden": "golden log-lik./token, paired",
            "unpaired": "accuracy, t-interval over seeds"}


def set_name(target: str) -> str:
    """The set a target file belongs to (``shp`` of ``shp_5_shot_preference.json``): the domain
    name of its planted rows."""
    info = shot_file_info(target)
    return info[0] if info else target_name(target)


def planted_prompt_keys(records: Sequence[InstructionRecord], truth: Sequence, domain: str) -> set[tuple]:
    """Prompt keys (as ``prompt_key`` makes them) of the pool rows planted for ``domain``."""
    return {tuple((m.role, m.content) for m in r.messages[:-1])
            for r, t in zip(records, truth) if t.domain == domain}


def evaluation_pairs(larger: Sequence[PreferenceTriple], validation: Sequence[PreferenceTriple],
                     planted: set[tuple], per_subtask: int | None) -> list[PreferenceTriple]:
    """Held-out pairs no method saw: ``larger`` minus the validation prompts, the ``planted``
    prompts and pairs without a preference; the first ``per_subtask`` of each subtask in file
    order (all when None)."""
    pairs = with_preference(heldout_pairs(larger, validation))
    return first_per_subtask([t for t in pairs if prompt_key(t) not in planted], per_subtask)


def _stamp(cfg, inputs: Sequence) -> dict:
    """What a downstream step's ``done.json`` records: its config and its input files' hashes."""
    return {"config": to_dict(cfg), "inputs": [sha256_file(p) for p in inputs]}


def length_selection(out_dir: Path, records: Sequence[InstructionRecord], lengths: np.ndarray, k: int) -> Path:
    """The length rule as a selection directory (the ``k`` longest answers), written once."""
    if not (out_dir / "selected.jsonl").exists():
        with warnings.catch_warnings():  # it ranks by length by definition: no length warning
            warnings.simplefilter("ignore", RuntimeWarning)
            write_selection(out_dir, records, lengths, select_top(lengths, count=k), method=LENGTH_RULE, echo=False)
    return out_dir


def golden_items(cfg, target: str) -> list[tuple[list, str]]:
    """The golden-answer measure's test prompts of ``target`` (``downstream_test_prompts`` of its set;
    none when absent): the first ``downstream_test_per_subtask`` of each subtask, in file order."""
    path = cfg.downstream_test_prompts.get(set_name(target))
    if not path:
        return []
    by_subtask = test_prompts_by_subtask(resolve_input(path), cfg.downstream_test_per_subtask)
    return [item for items in by_subtask.values() for item in items]


def _golden_key(tag: str, tokenize, golden: Sequence[tuple]) -> str:
    """Fingerprint of a golden-answer pass: model, tokenisation and every prompt and answer."""
    import hashlib

    text = json.dumps([tag, to_dict(tokenize), [[[(m.role, m.content) for m in p], g] for p, g in golden]])
    return hashlib.sha256(text.encode()).hexdigest()


def _golden_per_token(stats: dict) -> np.ndarray:
    return stats["logp"] / np.maximum(stats["n"], 1)


def evaluate_items(ecfg, pairs: Sequence[PreferenceTriple], golden: Sequence[tuple], golden_base: Path) -> None:
    """The trained model (``ecfg.adapter``) on every evaluation pair and golden answer, kept per
    item so models can be compared on the same items: ``metrics.json`` (``overall``: the pairs'
    preference metrics as ``rose evaluate`` reports them, and the mean golden log-likelihood per
    token, also the base model's) and ``items.npz`` (``pair_right``, ``pair_margin`` per pair,
    ``golden_logp_per_token`` and ``golden_base_logp_per_token`` per test prompt). The reference
    passes are cached: the pairs' in ``ecfg.reference_cache``, the base model's golden answers in
    ``golden_base`` (shared by every seed)."""
    device = resolve_device(ecfg.device)
    tokenizer = load_tokenizer(ecfg.model)
    model = load_adapter(load_model(ecfg.model, dtype=ecfg.model_dtype, device=device), ecfg.adapter,
                         trainable=False).eval()
    tag = f"{ecfg.model}\0{ecfg.model_dtype}"
    s = triple_stats(model, tokenizer, pairs, ecfg.tokenize, ecfg.batch_size, device,
                     reference_cache=ecfg.reference_cache, reference_key=tag)
    overall = preference_metrics(*(s[k] for k in ("pol_w", "pol_l", "ref_w", "ref_l", "n_w", "n_l", "sft_w")),
                                 beta=ecfg.beta)
    r_w, r_l = implicit_reward(s["pol_w"], s["ref_w"], ecfg.beta), implicit_reward(s["pol_l"], s["ref_l"], ecfg.beta)
    arrays = {"pair_right": (r_w > r_l).astype(np.float64), "pair_margin": r_w - r_l}
    if golden:
        trained = golden_stats(model, tokenizer, golden, ecfg.tokenize, ecfg.batch_size, device)

        def base():
            with model.disable_adapter():
                return golden_stats(model, tokenizer, golden, ecfg.tokenize, ecfg.batch_size, device)

        key = _golden_key(tag, ecfg.tokenize, golden)
        arrays["golden_logp_per_token"] = _golden_per_token(trained)
        arrays["golden_base_logp_per_token"] = _golden_per_token(_cached_reference(str(golden_base), key, base))
        overall.update({"golden/n_prompts": len(golden),
                        "golden/logp_per_token": float(arrays["golden_logp_per_token"].mean()),
                        "golden/base_logp_per_token": float(arrays["golden_base_logp_per_token"].mean())})
    out = Path(ecfg.output)
    with atomic_path(out / "items.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    write_json(out / "metrics.json", {"config": to_dict(ecfg), "overall": overall})


def downstream_rows(cfg, base, seed_dir: Path, seed: int, pool: Path, truth: Sequence,
                    targets_done: dict[str, int]) -> list[dict]:
    """Fine-tune and evaluate every ``cfg.downstream_methods`` selection of one seed, per target
    with evaluation pairs (``targets_done``: target name -> k selected rows)."""
    records = load_pool(str(pool), format="messages")
    _, train_cfg = training_configs(base, seed_dir, str(pool))
    lengths = np.array([t.length for t in truth], dtype=np.float64)
    rows = []
    for target, held in zip(cfg.targets, cfg.heldouts or [None] * len(cfg.targets)):
        name, validation = target_name(target), resolve_input(target)
        n_per = cfg.downstream_pairs(target)
        if name not in targets_done or n_per == 0:
            continue
        source = resolve_input(held) if held else str(find_heldout_file(validation))
        pairs = evaluation_pairs(load_preferences(source), load_preferences(validation),
                                 planted_prompt_keys(records, truth, set_name(target)), n_per)
        if not pairs:
            raise ConfigError(f"{name}: no evaluation pairs left in {source} after removing the validation "
                              "and planted prompts")
        root, golden = seed_dir / name / "downstream", golden_items(cfg, target)
        for label in cfg.downstream_methods:
            sel = (length_selection(root / "length_selection", records, lengths, targets_done[name])
                   if label == LENGTH_RULE else seed_dir / name / "select" / label)
            tcfg = replace(train_cfg, full=False, selection=str(sel / "selected.jsonl"),
                           output=str(root / label / "train"))
            run_once(tcfg.output, lambda c=tcfg: run_train(c), _stamp(tcfg, [tcfg.selection]))
            ecfg = eval_config(base, output=root / label / "eval", test_prompts=False,
                               reference_cache=root / "reference_logps.npz",
                               adapter=str(Path(tcfg.output) / "adapter"))
            run_once(ecfg.output, lambda c=ecfg: evaluate_items(c, pairs, golden, seed_dir.parent / f"golden_base_{name}.npz"),
                     _stamp(ecfg, [Path(tcfg.output) / "adapter" / "adapter_model.safetensors"]))
            overall = json.loads((Path(ecfg.output) / "metrics.json").read_text())["overall"]
            rows.append({"seed": seed, "target": name, "method": label, "k": targets_done[name],
                         "n_pairs": int(overall["n"]), "accuracy": float(overall["rewards/accuracies"]),
                         "margin": float(overall["rewards/margins"]),
                         "golden": overall.get("golden/logp_per_token"), "n_golden": len(golden)})
    return rows


def aggregate_downstream(rows: list[dict], paired: dict | None = None) -> list[dict]:
    """Per (target, method): accuracy and margin as mean [95% t-interval] over seeds (the
    training's randomness), and the Wilson interval of the mean accuracy at one seed's number of
    pairs (the evaluation set's sampling noise; the seeds share most pairs, so pooling them would
    overstate n); with ``paired`` (``paired_downstream``) its paired differences."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    out = []
    for (target, method), rs in groups.items():
        acc, n = mean_interval([r["accuracy"] for r in rs]), min(r["n_pairs"] for r in rs)
        out.append({"target": target, "method": method, "seeds": len(rs), "k": rs[0]["k"], "pairs_per_seed": n,
                    "accuracy": acc, "margin": mean_interval([r["margin"] for r in rs]),
                    "eval_set_ci": list(wilson_interval(acc["mean"] * n, n)),
                    "golden": mean_interval([r.get("golden") for r in rs]), **(paired or {}).get((target, method), {})})
    return out


def load_items(seed_dir: Path, target: str, method: str) -> dict[str, np.ndarray]:
    """The per-item arrays of one trained model's evaluation (``evaluate_items``)."""
    with np.load(seed_dir / target / "downstream" / method / "eval" / "items.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _paired_measure(values: dict[str, list[np.ndarray]], method: str, ref: str, counts: np.ndarray) -> dict:
    """``method`` minus ``ref`` on the same items (seed after seed), with its bootstrap interval."""
    d = np.concatenate(values[method]) - np.concatenate(values[ref])
    return bootstrap_stat(float(d.mean()), replicate_means(counts, d, np.ones(len(d), bool)))


def paired_downstream(out: Path, rows: list[dict], references: Sequence[str] = REFERENCES,
                      n_boot: int = N_BOOT) -> dict[tuple[str, str], dict]:
    """Per (target, method): its trained model minus each reference's on the same evaluation pairs
    (accuracy; exact McNemar test of the pairs one gets right and the other wrong) and the same
    golden answers (log-likelihood per token; and minus the base model), bootstrap over seeds and
    items within a seed (the seeds' evaluation pairs differ: each removes its own planted prompts)."""
    out_stats: dict[tuple[str, str], dict] = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        seeds = sorted({r["seed"] for r in rows if r["target"] == target})
        methods = list(dict.fromkeys(r["method"] for r in rows if r["target"] == target))
        items = {m: [load_items(out / f"seed-{s}", target, m) for s in seeds] for m in methods}
        right = {m: [i["pair_right"] for i in its] for m, its in items.items()}
        counts = cluster_bootstrap_counts([len(a) for a in right[methods[0]]], n_boot)
        has_golden = all("golden_logp_per_token" in i for its in items.values() for i in its)
        if has_golden:
            golden = {m: [i["golden_logp_per_token"] for i in its] for m, its in items.items()}
            golden["base"] = [i["golden_base_logp_per_token"] for i in items[methods[0]]]
            gcounts = cluster_bootstrap_counts([len(a) for a in golden["base"]], n_boot)
        for m in methods:
            entry = {"vs": {}}
            if has_golden:
                entry["golden_vs_base"] = _paired_measure(golden, m, "base", gcounts)
            for ref in (r for r in references if r in methods and r != m):
                d = np.concatenate(right[m]) - np.concatenate(right[ref])
                better, worse = int((d > 0).sum()), int((d < 0).sum())
                entry["vs"][ref] = {"pairs": _paired_measure(right, m, ref, counts), "better": better, "worse": worse,
                                    "mcnemar_p": sign_test(better, worse),
                                    "golden": _paired_measure(golden, m, ref, gcounts) if has_golden else None}
            out_stats[(target, m)] = entry
    return out_stats


def resolvable(agg: list[dict]) -> dict[str, dict[str, float]]:
    """Per target and measure: the median half-width of the paired differences' 95% intervals, the
    smallest difference this many items and seeds can tell from zero."""
    half: dict[str, dict[str, list[float]]] = {}
    for a in agg:
        for ref, v in a.get("vs", {}).items():
            for measure in ("pairs", "golden"):
                if v.get(measure):
                    half.setdefault(a["target"], {}).setdefault(measure, []).append((v[measure]["hi"] - v[measure]["lo"]) / 2)
        lo, hi = a["accuracy"]["lo"], a["accuracy"]["hi"]
        if lo is not None:
            half.setdefault(a["target"], {}).setdefault("unpaired", []).append((hi - lo) / 2)
    return {t: {m: float(np.median(v)) for m, v in ms.items()} for t, ms in half.items()}


def downstream_markdown(agg: list[dict]) -> str:
    """The downstream tables: per target and method its figures, then its paired differences."""
    lines = ["| target | method | k | held-out pairs | accuracy, mean [95% CI over seeds] | "
             "evaluation-set 95% CI at that n | reward margin, mean [95% CI] | golden answers: log-lik./token, "
             "mean [95% CI over seeds] | Δ golden vs base model [CI] |", "|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        lo, hi = a["eval_set_ci"]
        lines.append(f"| {a['target']} | {a['method']} | {a['k']} | {a['pairs_per_seed']} | {fmt_interval(a['accuracy'], 3)} | "
                     f"[{lo:.3f}, {hi:.3f}] | {fmt_interval(a['margin'], 3)} | {fmt_interval(a['golden'], 4)} | "
                     f"{fmt_stat(a.get('golden_vs_base'), 4, signed=True)} |")
    refs = list(dict.fromkeys(r for a in agg for r in a.get("vs", {})))
    if refs:
        lines += ["", "Paired: the same evaluation pairs and golden answers, bootstrap over seeds and items; "
                  "McNemar: exact, over the pairs one model gets right and the other wrong.", "",
                  "| target | method | " + " | ".join(f"vs {r}: Δ accuracy [CI] (McNemar p) | vs {r}: Δ golden [CI]"
                                                     for r in refs) + " |", "|---|---|" + "---|---|" * len(refs)]
        for a in agg:
            cells = []
            for r in refs:
                v = a.get("vs", {}).get(r)
                cells += ([f"{fmt_stat(v['pairs'], 3, signed=True)} (p={v['mcnemar_p']:.2g}, {v['better']}+/{v['worse']}-)",
                           fmt_stat(v["golden"], 4, signed=True)] if v else ["", ""])
            lines.append(f"| {a['target']} | {a['method']} | " + " | ".join(cells) + " |")
    res = resolvable(agg)
    if res:
        lines += ["", "Smallest resolvable difference (median half-width of the 95% intervals): " + "; ".join(
            f"{t}: " + ", ".join(f"{MEASURES[m]} ±{w:.3f}" for m, w in ms.items()) for t, ms in res.items())]
    return "\n".join(lines)


def downstream_plot(agg: list[dict], path: Path) -> None:

    targets = list(dict.fromkeys(a["target"] for a in agg))
    plots.share_bar_chart({t: {a["method"]: a["accuracy"]["mean"] or 0.0 for a in agg if a["target"] == t}
                           for t in targets}, path, title="held-out preference accuracy of the model trained "
                          "on each selection", ylabel="rewards/accuracies")
