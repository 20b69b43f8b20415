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
from rose_select.data.preferences import target_name
from rose_select.errors import ConfigError
from rose_select.evaluation import run_evaluate
from rose_select.io import run_once, sha256_file
from rose_select.pipeline import eval_config, resolve_input, training_configs
from rose_select.records import InstructionRecord, PreferenceTriple
from rose_select.select.topk import select_top, write_selection
from rose_select.stats import fmt_interval, mean_interval, wilson_interval
from rose_select.train.stage import run_train

LENGTH_RULE = "length"


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
                                 planted_prompt_keys(records, truth, name), n_per)
        if not pairs:
            raise ConfigError(f"{name}: no evaluation pairs left in {source} after removing the validation "
                              "and planted prompts")
        root = seed_dir / name / "downstream"
        for label in cfg.downstream_methods:
            sel = (length_selection(root / "length_selection", records, lengths, targets_done[name])
                   if label == LENGTH_RULE else seed_dir / name / "select" / label)
            tcfg = replace(train_cfg, full=False, selection=str(sel / "selected.jsonl"),
                           output=str(root / label / "train"))
            run_once(tcfg.output, lambda c=tcfg: run_train(c), _stamp(tcfg, [tcfg.selection]))
            ecfg = eval_config(base, output=root / label / "eval", test_prompts=False,
                               reference_cache=root / "reference_logps.npz",
                               adapter=str(Path(tcfg.output) / "adapter"))
            run_once(ecfg.output, lambda c=ecfg: run_evaluate(c, triples=pairs),
                     _stamp(ecfg, [Path(tcfg.output) / "adapter" / "adapter_model.safetensors"]))
            overall = json.loads((Path(ecfg.output) / "metrics.json").read_text())["overall"]
            rows.append({"seed": seed, "target": name, "method": label, "k": targets_done[name],
                         "n_pairs": int(overall["n"]), "accuracy": float(overall["rewards/accuracies"]),
                         "margin": float(overall["rewards/margins"])})
    return rows


def aggregate_downstream(rows: list[dict]) -> list[dict]:
    """Per (target, method): accuracy and margin as mean [95% t-interval] over seeds (the
    training's randomness), and the Wilson interval of the mean accuracy at one seed's number of
    pairs (the evaluation set's sampling noise; the seeds share most pairs, so pooling them would
    overstate n)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    out = []
    for (target, method), rs in groups.items():
        acc, n = mean_interval([r["accuracy"] for r in rs]), min(r["n_pairs"] for r in rs)
        out.append({"target": target, "method": method, "seeds": len(rs), "k": rs[0]["k"], "pairs_per_seed": n,
                    "accuracy": acc, "margin": mean_interval([r["margin"] for r in rs]),
                    "eval_set_ci": list(wilson_interval(acc["mean"] * n, n))})
    return out


def downstream_markdown(agg: list[dict]) -> str:
    """The downstream table: one row per target and method."""
    lines = ["| target | method | k | held-out pairs | accuracy, mean [95% CI over seeds] | "
             "evaluation-set 95% CI at that n | reward margin, mean [95% CI] |", "|---|---|---|---|---|---|---|"]
    for a in agg:
        lo, hi = a["eval_set_ci"]
        lines.append(f"| {a['target']} | {a['method']} | {a['k']} | {a['pairs_per_seed']} | {fmt_interval(a['accuracy'], 3)} | "
                     f"[{lo:.3f}, {hi:.3f}] | {fmt_interval(a['margin'], 3)} |")
    return "\n".join(lines)


def downstream_plot(agg: list[dict], path: Path) -> None:

    targets = list(dict.fromkeys(a["target"] for a in agg))
    plots.share_bar_chart({t: {a["method"]: a["accuracy"]["mean"] or 0.0 for a in agg if a["target"] == t}
                           for t in targets}, path, title="held-out preference accuracy of the model trained "
                          "on each selection", ylabel="rewards/accuracies")
