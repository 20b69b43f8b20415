"""A selection benchmark with known ground truth: planted preference pairs in a generic pool.

The pool is a generic instruction set (the shipped ShareGPT snapshot) into which held-out, real
preference pairs of each target task are planted, every prompt twice: once with its preferred and
once with its dispreferred answer, as ordinary pool records with opaque ids and one source name
(nothing but the text tells them apart). The prompts are never among the validation prompts: they
come from the larger-shot file of the same set, minus every validation prompt.

Given any method's scores of the pool, the ground truth answers two questions:

- does the method find the target task? *domain precision@k* (share of the top k that is planted
  data of the target) against its base rate, and the AUC of target rows against every other row;
- does it prefer the better answer? *paired preference accuracy*: the share of the target's
  planted prompts whose preferred row scores above its dispreferred row (a tie counts one half),
  with a 95% Wilson interval, and the share of preferred rows among the selected target rows.

The same figures for the rule "the longer answer wins" (score = answer length in characters) are
reported beside every method: preferred answers are often longer, and a method that only tracks
length must not look reward-oriented.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from rose_select import plots
from rose_select.config import to_dict
from rose_select.data import (
    find_heldout_file,
    heldout_pairs,
    load_pool,
    load_preferences,
    with_preference,
    write_pool_jsonl,
)
from rose_select.data.heldout import prompt_key
from rose_select.data.preferences import target_name
from rose_select.errors import ConfigError
from rose_select.features.stage import run_featurize
from rose_select.io import run_once, write_json
from rose_select.pipeline import (
    _checkpoints,
    featurize_jobs,
    resolve_input,
    select_config,
    training_configs,
)
from rose_select.plots import _corr, _ranks
from rose_select.quality_downstream import (
    LENGTH_RULE,
    aggregate_downstream,
    downstream_markdown,
    downstream_plot,
    downstream_rows,
    paired_downstream,
    set_name,
)
from rose_select.quality_geometry import LENGTH_REMOVED, checkpoint_geometry, geometry_markdown, length_removed_scores
from rose_select.quality_length import collect_items, length_figures, length_markdown, load_scores, target_report
from rose_select.quality_tables import glance_table, markdown_table
from rose_select.records import InstructionRecord, Message, PreferenceTriple
from rose_select.select.stage import VARIANTS, run_select
from rose_select.select.scoring import load_store_features
from rose_select.select.topk import read_selection, select_top, write_selection
from rose_select.stats import mean_interval, wilson_interval
from rose_select.train.stage import run_warmup

GENERIC = "generic"
POOL_SOURCE = "pool"


@dataclass(frozen=True)
class PlantedRow:
    """Ground truth of one pool row (never shown to a method)."""

    id: str
    domain: str  # a target name, or GENERIC
    pair: int  # index of the planted prompt (-1 for generic rows)
    preferred: bool | None  # None for generic rows
    length: int  # characters of the assistant text (the length rule's score)


def answer_chars(record: InstructionRecord) -> int:
    """Characters of every assistant turn of a record: the "longer answer wins" score."""
    return sum(len(m.content) for m in record.messages if m.role == "assistant")


def take_per_subtask(triples: Sequence[PreferenceTriple], k: int, rng: np.random.Generator) -> list[PreferenceTriple]:
    """A seeded sample of ``k`` triples of each subtask (all of a smaller subtask), one per prompt,
    in file order."""

    by_subtask: dict[str, list[int]] = {}
    seen = set()
    for i, t in enumerate(triples):
        key = prompt_key(t)
        if key not in seen:
            seen.add(key)
            by_subtask.setdefault(t.subtask, []).append(i)
    keep = []
    for rows in by_subtask.values():
        keep += sorted(rng.choice(rows, size=min(k, len(rows)), replace=False).tolist())
    return [triples[i] for i in sorted(keep)]


def plant_pool(generic: Sequence[InstructionRecord], planted: Mapping[str, Sequence[PreferenceTriple]],
               seed: int) -> tuple[list[InstructionRecord], list[PlantedRow]]:
    """The benchmark pool: ``generic`` records plus, for every domain of ``planted``, each triple as
    two records (prompt + chosen, prompt + rejected), shuffled with ``seed``, renamed ``r00000``...,
    all with source ``pool``. Returns the records and their ground truth, in the same order."""
    items: list[tuple[list[Message], PlantedRow]] = []
    for r in generic:
        items.append((list(r.messages), PlantedRow("", GENERIC, -1, None, answer_chars(r))))
    pair = 0
    for domain, triples in planted.items():
        for t in triples:
            for preferred, answer in ((True, t.chosen), (False, t.rejected)):
                msgs = [*t.prompt, Message("assistant", answer)]
                items.append((msgs, PlantedRow("", domain, pair, preferred, len(answer))))
            pair += 1
    order = np.random.default_rng(seed).permutation(len(items))
    width = max(5, len(str(len(items))))
    records, truth = [], []
    for new, old in enumerate(order.tolist()):
        msgs, row = items[old]
        rid = f"r{new:0{width}d}"
        raw = {"dataset": POOL_SOURCE, "id": rid, "messages": [{"role": m.role, "content": m.content} for m in msgs]}
        records.append(InstructionRecord(rid, POOL_SOURCE, msgs, raw))
        truth.append(PlantedRow(rid, row.domain, row.pair, row.preferred, row.length))
    return records, truth

# ---------------------------------------------------------------------------- metrics


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``positive`` rows vs the rest (Mann-Whitney; ties count 1/2)."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _ranks(scores) + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_wins(scores: np.ndarray, truth: Sequence[PlantedRow], domain: str) -> np.ndarray:
    """Per planted prompt of ``domain``: 1 if its preferred row scores above its dispreferred row,
    1/2 on a tie, 0 otherwise (in pair order)."""
    pref, disp = {}, {}
    for i, row in enumerate(truth):
        if row.domain == domain:
            (pref if row.preferred else disp)[row.pair] = scores[i]
    pairs = sorted(pref)
    a, b = np.array([pref[p] for p in pairs]), np.array([disp[p] for p in pairs])
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def selection_metrics(scores: np.ndarray, selected: Sequence[int], truth: Sequence[PlantedRow],
                      domain: str) -> dict:
    """Every benchmark figure of one method's ``scores`` and ``selected`` pool indices for ``domain``."""
    scores = np.asarray(scores, np.float64)
    in_domain = np.array([r.domain == domain for r in truth])
    sel = np.asarray(selected, np.int64)
    sel_domain = [truth[i] for i in sel.tolist() if truth[i].domain == domain]
    wins = paired_wins(scores, truth, domain)
    lo, hi = wilson_interval(float(wins.sum()), len(wins))
    return {
        "k": int(len(sel)),
        "domain_precision": float(in_domain[sel].mean()),
        "base_rate": float(in_domain.mean()),
        "precision_over_base": float(in_domain[sel].mean() / in_domain.mean()),
        "n_selected_domain": len(sel_domain),
        "preferred_share": (sum(bool(r.preferred) for r in sel_domain) / len(sel_domain)) if sel_domain else None,
        "n_pairs": int(len(wins)),
        "paired_accuracy": float(wins.mean()),
        "paired_ci": [lo, hi],
        "auc": auc(scores, in_domain),
    }


def length_scores(truth: Sequence[PlantedRow]) -> np.ndarray:
    """The "longer answer wins" rule as a score: the answer's length in characters."""
    return np.array([r.length for r in truth], dtype=np.float64)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""

    return _corr(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


# ---------------------------------------------------------------------------- the experiment


QUICK = {"generic_records": 30, "plant": 1}


def planted_counts(cfg) -> dict[str, int]:
    """Planted prompts per subtask for each target (``--quick``: one)."""
    if cfg.quick:
        return {t: QUICK["plant"] for t in cfg.targets}
    return {t: int(cfg.plant_per_subtask.get(set_name(t), 3)) for t in cfg.targets}


def target_sets(cfg) -> dict[str, list[tuple[str, str]]]:
    """Targets grouped by set name (``hh`` for both ``hh_1_shot`` and ``hh_5_shot``), in order of
    first appearance: each entry ``(target file, held-out file)`` (default: the largest-shot sibling)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for target, held in zip(cfg.targets, cfg.heldouts or [None] * len(cfg.targets)):
        path = resolve_input(target)
        source = resolve_input(held) if held else str(find_heldout_file(path))
        groups.setdefault(set_name(target), []).append((path, source))
    return groups


def build_pool(cfg, seed: int, out_dir):
    """Write ``pool.jsonl`` and ``truth.json`` of one seed (skipped when both exist); returns
    (pool path, ground truth). Planted prompts, once per set (domain = set name, shared by every
    target of the set, e.g. HH at 1 and 5 shots): the set's held-out file minus the validation
    prompts of every target of the set, and minus pairs whose two answers are the same."""
    from pathlib import Path

    out_dir = Path(out_dir)
    pool_file, truth_file = out_dir / "pool.jsonl", out_dir / "truth.json"
    if pool_file.exists() and truth_file.exists():
        return pool_file, read_truth(out_dir)
    rng = np.random.default_rng(seed)
    generic = load_pool(resolve_input(cfg.base.pool), format=cfg.base.pool_format, limit=cfg.base.pool_limit)
    n_generic = QUICK["generic_records"] if cfg.quick else cfg.generic_records
    generic = [generic[i] for i in sorted(rng.choice(len(generic), min(n_generic, len(generic)), replace=False))]
    counts = planted_counts(cfg)
    planted = {}
    for domain, members in target_sets(cfg).items():
        validation = [t for path, _ in members for t in load_preferences(path)]
        pairs = with_preference(heldout_pairs(load_preferences(members[0][1]), validation))
        planted[domain] = take_per_subtask(pairs, counts[next(t for t in cfg.targets if set_name(t) == domain)], rng)
    records, truth = plant_pool(generic, planted, seed)
    write_pool_jsonl(records, pool_file)
    write_json(truth_file, [r.__dict__ for r in truth])
    return pool_file, truth


def read_truth(seed_dir) -> list[PlantedRow]:
    """The ground truth a seed's ``build_pool`` wrote."""
    import json
    from pathlib import Path

    return [PlantedRow(**r) for r in json.loads((Path(seed_dir) / "truth.json").read_text())]


def _per_seed(cfg, out, targets: list[str], labels: list[str]) -> list[tuple]:
    """(truth, {label: scores}) of every seed; with several ``targets`` labels become
    ``label@target`` (they must share the planted set)."""
    per_seed = []
    for seed in range(cfg.seeds):
        seed_dir = out / f"seed-{seed}"
        truth = read_truth(seed_dir)
        scores = {}
        for target in targets:
            tag = f"@{target_name(target)}" if len(targets) > 1 else ""
            scores.update({k + tag: v for k, v in load_scores(seed_dir, target_name(target), labels).items()})
        per_seed.append((truth, {**scores, LENGTH_RULE: length_scores(truth)}))
    return per_seed


def length_reports(cfg, out) -> dict[str, dict]:
    """Per target: ``quality_length.target_report`` over every seed, recomputed from each method's
    saved ``scores.npy`` and the ground truth (the length rule from the truth's lengths); and per
    set with several targets (HH at 1 and 5 shots), ``"<set>: shots"``: each method at every
    later target against the first, on the same planted pairs."""
    labels = benchmark_labels(cfg.method_list())
    reports = {}
    for target in cfg.targets:
        reports[target_name(target)] = target_report(collect_items(_per_seed(cfg, out, [target], labels), set_name(target)),
                                                     extra_pairs=[(label, m) for label, (m, _) in LENGTH_REMOVED.items()])
    for domain, members in target_sets(cfg).items():
        targets = [t for t in cfg.targets if set_name(t) == domain]
        if len(targets) > 1:
            first, later = target_name(targets[0]), [target_name(t) for t in targets[1:]]
            pairs = [(f"{m}@{t}", f"{m}@{first}") for t in later for m in labels]
            reports[f"{domain}: shots"] = target_report(collect_items(_per_seed(cfg, out, targets, labels), domain),
                                                        references=(), extra_pairs=pairs)
    return reports


def _selected_indices(sel_dir, ids: list[str]) -> np.ndarray:

    where = {rid: i for i, rid in enumerate(ids)}
    return np.array([where[i] for i in read_selection(sel_dir)], dtype=np.int64)


def method_rows(methods: Sequence[str]) -> list[tuple[str, str, dict]]:
    """(row label, method, select options): every method as configured, the ROSE methods also with
    per-subtask standardisation (``+std``) and subtask-balanced selection (``+balanced``), and the
    paper's ``rose`` with centred pool features (``+center``)."""

    rows = []
    for m in methods:
        rows.append((m, m, {}))
        if m == "rose":
            rows.append(("rose+center", m, {"center": True}))
        if m == "rose" or m in VARIANTS:
            rows += [(f"{m}+std", m, {"standardize": True}), (f"{m}+balanced", m, {"balanced": True})]
    return rows


def _row(seed: int, target: str, label: str, scores: np.ndarray, sel, truth) -> dict:
    """One method's figures on one seed and target."""
    domain = set_name(target)
    return {"seed": seed, "target": target_name(target), "domain": domain, "method": label,
            **selection_metrics(scores, sel, truth, domain), **length_figures(scores, truth, domain),
            "length_spearman": spearman(scores, length_scores(truth))}


def benchmark_labels(methods: Sequence[str]) -> list[str]:
    """Every selection row of the benchmark: ``method_rows`` and the length-removed rows of the
    methods present (the length rule aside)."""
    return [label for label, _, _ in method_rows(methods)] + [
        label for label, (m, _) in LENGTH_REMOVED.items() if m in methods]


def length_removed_selection(run, seed_dir, ckpts, method: str, label: str, n_dirs: int, pool, truth,
                             k: int) -> np.ndarray:
    """``method``'s scores with ``n_dirs`` length directions of the pool features removed
    (``quality_geometry.length_removed_scores``; stored features only), written as the selection
    ``select/<label>`` of its top ``k`` (once); returns the scores."""
    import json

    out = run / "select" / label
    if (out / "selected.jsonl").exists():
        return np.load(out / "scores.npy", allow_pickle=False)
    summary = json.loads((run / "select" / method / "summary.json").read_text())
    feats = lambda p: load_store_features(p).features
    val = {"pairwise": [feats(run / "features" / c.name / "val_pairwise") for c in ckpts],
           "groups": load_store_features(run / "features" / ckpts[0].name / "val_pairwise").groups}
    if summary["chosen_weight"]:
        val["chosen"] = [feats(run / "features" / c.name / "val_sft") for c in ckpts]
    scores = length_removed_scores([feats(seed_dir / "features" / c.name / "pool") for c in ckpts], val, summary,
                                   length_scores(truth), n_dirs)
    records = load_pool(str(pool), format="messages")
    with warnings.catch_warnings():  # a length warning here is a finding, reported in the tables
        warnings.simplefilter("ignore", RuntimeWarning)
        write_selection(out, records, scores, select_top(scores, count=k), method=label, echo=False)
    return scores


def seed_rows(cfg, out_dir, seed: int) -> tuple[list[dict], dict, list[dict]]:
    """One seed: planted pool, warm-up, features, every method's selection and its figures; per
    target the ``direction_geometry`` of the last checkpoint (None without the stores); and the
    downstream rows of ``cfg.downstream_methods`` (quality_downstream.py)."""
    from dataclasses import replace
    from pathlib import Path

    started = time.perf_counter()
    out_dir = Path(out_dir) / f"seed-{seed}"
    pool, truth = build_pool(cfg, seed, out_dir)
    methods = cfg.method_list()
    base = replace(cfg.base, pool=str(pool), pool_format="messages", pool_limit=None, seed=cfg.base.seed + seed,
                   featurize=replace(cfg.base.featurize, seed=cfg.base.featurize.seed + seed),
                   select=replace(cfg.base.select, methods=methods))
    warm_cfg, _ = training_configs(base, out_dir, str(pool))
    run_warmup(warm_cfg)
    ckpts = _checkpoints(base, out_dir / "warmup")
    ids = [r.id for r in truth]
    rows, geometry = [], {}
    for target in cfg.targets:
        name, domain, validation = target_name(target), set_name(target), resolve_input(target)
        run = out_dir / name
        for _, fcfg in featurize_jobs(base, run, out_dir, str(pool), validation, ckpts):
            run_featurize(fcfg)
        for label, method, options in method_rows(methods):
            scfg = select_config(base, run, out_dir, method, str(pool), validation, ckpts)
            scfg = replace(scfg, plots=False, output=str(run / "select" / label), **options)
            run_once(scfg.output, lambda c=scfg: run_select(c), {"config": to_dict(scfg)})
            scores = np.load(Path(scfg.output) / "scores.npy", allow_pickle=False)
            sel = _selected_indices(scfg.output, ids)
            rows.append(_row(seed, target, label, scores, sel, truth))
        geometry[name] = checkpoint_geometry(out_dir, run, ckpts[-1].name, truth, domain)
        k = len(sel)
        for label, (method, n_dirs) in LENGTH_REMOVED.items():
            if method in methods:
                scores = length_removed_selection(run, out_dir, ckpts, method, label, n_dirs, pool, truth, k)
                rows.append(_row(seed, target, label, scores, _selected_indices(run / "select" / label, ids), truth))
        lengths = length_scores(truth)
        rows.append(_row(seed, target, LENGTH_RULE, lengths, select_top(lengths, count=k), truth))
    ks = {r["target"]: r["k"] for r in rows}
    t0 = time.perf_counter()
    downstream = downstream_rows(cfg, base, out_dir, seed, pool, truth, ks) if cfg.downstream_methods else []
    geometry["_seconds"] = {"selection": round(t0 - started, 1), "downstream": round(time.perf_counter() - t0, 1)}
    return rows, geometry, downstream


AGGREGATED = ("domain_precision", "precision_over_base", "preferred_share", "paired_accuracy", "auc",
              "length_spearman")


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (target, method): the mean and 95% interval over seeds of every figure, and the paired
    accuracy pooled over every planted prompt of every seed with its Wilson interval."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    out = []
    for (target, method), rs in groups.items():
        agg = {"target": target, "method": method, "seeds": len(rs), "k": rs[0]["k"],
               "base_rate": float(np.mean([r["base_rate"] for r in rs]))}
        for key in AGGREGATED:
            agg[key] = mean_interval([r[key] for r in rs])
        wins = sum(r["paired_accuracy"] * r["n_pairs"] for r in rs)
        n = sum(r["n_pairs"] for r in rs)
        agg["pairs"] = {"n": n, "accuracy": wins / n, "ci": list(wilson_interval(wins, n))}
        out.append(agg)
    return out


def quality(cfg, out) -> dict:
    """``rose experiment quality``: the planted-pool benchmark for every method and target."""

    known = benchmark_labels(cfg.method_list()) + [LENGTH_RULE]
    unknown = [m for m in cfg.downstream_methods if m not in known]
    if unknown:
        raise ConfigError(f"downstream_methods: {unknown} are not rows of this benchmark; known: {known}")
    rows, geometry, downstream = [], {}, []
    for seed in range(cfg.seeds):
        seed_result, geometry[seed], seed_downstream = seed_rows(cfg, out, seed)
        rows += seed_result
        downstream += seed_downstream
    seconds = {seed: g.pop("_seconds") for seed, g in geometry.items()}
    agg = aggregate(rows)
    length = length_reports(cfg, out)
    targets = list(dict.fromkeys(a["target"] for a in agg))
    for key, title in (("precision_over_base", "domain precision@k / base rate"),
                       ("paired_accuracy", "pairs ranked right (preferred above dispreferred)")):
        plots.share_bar_chart({t: {a["method"]: a[key]["mean"] or 0.0 for a in agg if a["target"] == t} for t in targets},
                              out / f"quality_{key}.png", title=title, ylabel=key)
    k = {a["target"]: a["k"] for a in agg}
    md = (f"Planted-pool benchmark, {cfg.seeds} seed(s); k = {sorted(set(k.values()))} selected rows; "
          "mean [95% interval over seeds] where there are several seeds; the pairs column pools every "
          "planted prompt of every seed (Wilson interval).\n\n" + markdown_table(agg)
          + geometry_markdown(geometry))
    md += "\n\nWall time per seed (s; work finished by an earlier invocation is reused): " + "; ".join(
        f"seed {s}: selection {t['selection']}, downstream {t['downstream']}" for s, t in seconds.items())
    md += ("\n\n## Where length cannot help\n\nPlanted pairs split by which answer is longer; pooled over seeds, "
           "95% intervals and paired differences from a bootstrap over seeds and pairs within a seed "
           "(quality_length.py); sign test: exact, over the pairs where the two methods differ (McNemar's "
           "exact test where neither ties).\n\n" + length_markdown(length))
    result = {"rows": rows, "aggregate": agg, "length": length, "geometry": geometry, "seconds_per_seed": seconds}
    if downstream:
        result.update(downstream_rows=downstream,
                      downstream=aggregate_downstream(downstream, paired_downstream(out, downstream)))
        downstream_plot(result["downstream"], out / "quality_downstream_accuracy.png")
    md = "At a glance (means over seeds):\n\n" + glance_table(agg, result.get("downstream"), length) + "\n\n" + md
    if downstream:
        md += ("\n\n## Downstream: the model trained on each selection\n\nHeld-out preference accuracy "
               "(`rewards/accuracies`) on the target's pairs that were neither validation nor planted prompts; "
               "every model of a seed and target on the same pairs.\n\n" + downstream_markdown(result["downstream"]))
    return {**result, "markdown": md}
