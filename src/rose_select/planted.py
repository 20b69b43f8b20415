"""``rose run`` on a planted pool: a selection whose answer is known (the demo's measurement).

With a ``plant`` section, the run's pool is not its ``pool`` file but a pool built from it the way
the planted-pool benchmark builds one (``quality.plant_pool``): a seeded sample of its records as
the generic rows, plus held-out prompts of the target (the larger-shot file minus every
validation prompt), each planted twice, once with its preferred and once with its dispreferred
answer, under opaque ids. The ground truth (``truth.json``) is never shown to a method; the
report uses it to say, per method, how much of the selection is the target (against the base
rate), how many of the target rows picked carry the preferred answer, and how often a planted
prompt's preferred row outscored its dispreferred row, each with its 95% Wilson interval. The
held-out pairs the final models are measured on exclude the validation *and* the planted prompts
(``quality_downstream.evaluation_pairs``), so no method saw them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from rose_select.data import find_heldout_file, heldout_pairs, load_pool, load_preferences, with_preference
from rose_select.data.builtin import resolve_input
from rose_select.data.pools import write_pool_jsonl
from rose_select.data.preferences import target_name
from rose_select.errors import ConfigError
from rose_select.io import write_json
from rose_select.quality import PlantedRow, plant_pool, selection_metrics, take_per_subtask
from rose_select.quality_downstream import evaluation_pairs, planted_prompt_keys
from rose_select.select.topk import read_selection
from rose_select.stats import wilson_interval


def heldout_source(cfg, validation: str) -> str:
    """The larger-shot file the planted and the evaluation prompts come from."""
    return resolve_input(cfg.evaluate.heldout) if cfg.evaluate.heldout else str(find_heldout_file(validation))


def _kw(cfg) -> dict:
    return cfg.subtask_kwargs()


def build(cfg, validation: str, out_dir: Path) -> tuple[Path, list[PlantedRow]]:
    """Write ``out_dir/pool.jsonl`` and ``truth.json`` (deterministic in the run's seed, so a rerun
    writes the same bytes and the stages' fingerprints hold); returns the pool path and the truth."""
    rng = np.random.default_rng(cfg.seed)
    generic = load_pool(resolve_input(cfg.pool), format=cfg.pool_format, limit=cfg.pool_limit)
    n = min(cfg.plant.generic_records, len(generic))
    generic = [generic[i] for i in sorted(rng.choice(len(generic), n, replace=False).tolist())]
    larger = load_preferences(heldout_source(cfg, validation), **_kw(cfg))
    candidates = with_preference(heldout_pairs(larger, load_preferences(validation, **_kw(cfg))))
    if not candidates:
        raise ConfigError(f"plant: no held-out prompt of {heldout_source(cfg, validation)} is left to plant")
    planted = take_per_subtask(candidates, cfg.plant.per_subtask, rng)
    records, truth = plant_pool(generic, {target_name(validation): planted}, cfg.seed)
    write_pool_jsonl(records, out_dir / "pool.jsonl")
    write_json(out_dir / "truth.json", [r.__dict__ for r in truth])
    return out_dir / "pool.jsonl", truth


def read_truth(out_dir: Path) -> list[PlantedRow]:
    return [PlantedRow(**r) for r in json.loads((Path(out_dir) / "truth.json").read_text())]


def evaluation_triples(cfg, validation: str, pool: Path, truth: Sequence[PlantedRow]):
    """(source, pairs): the held-out pairs of a planted run, minus the validation and planted prompts."""
    source = heldout_source(cfg, validation)
    planted = planted_prompt_keys(load_pool(pool, format="messages"), truth, target_name(validation))
    triples = evaluation_pairs(load_preferences(source, **_kw(cfg)), load_preferences(validation, **_kw(cfg)),
                               planted, cfg.evaluate.limit_per_subtask)
    if not triples:
        raise ConfigError(f"no held-out pairs left in {source} once the validation and planted prompts are removed")
    return source, triples


def _interval(successes: float, n: int) -> list[float] | None:
    return list(wilson_interval(successes, n)) if n else None


def method_figures(sel_dir: Path, truth: Sequence[PlantedRow], domain: str) -> dict:
    """One method's planted-pool figures, each proportion with its 95% Wilson interval."""
    where = {r.id: i for i, r in enumerate(truth)}
    selected = [where[i] for i in read_selection(sel_dir)]
    scores = np.load(Path(sel_dir) / "scores.npy", allow_pickle=False)
    m = selection_metrics(scores, selected, truth, domain)
    n_target = m["n_selected_domain"]
    m["precision_ci"] = _interval(m["domain_precision"] * m["k"], m["k"])
    m["preferred_ci"] = _interval((m["preferred_share"] or 0.0) * n_target, n_target)
    return m


def figures(run_dir: Path, methods: Sequence[str], truth: Sequence[PlantedRow], domain: str) -> dict[str, dict]:
    return {m: method_figures(run_dir / "select" / m, truth, domain) for m in methods}


def _fmt(p: float | None, ci: list | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def figures_rows(figs: dict[str, dict]) -> list[dict]:
    """The report's table rows: one per method."""
    rows = []
    for method, m in figs.items():
        rows.append({
            "method": method,
            "target rows picked": f"{m['n_selected_domain']} of {m['k']}",
            "target precision [95% CI]": _fmt(m["domain_precision"], m["precision_ci"]),
            "base rate": f"{m['base_rate']:.2f}",
            "preferred share of target picks [95% CI]": _fmt(m["preferred_share"], m["preferred_ci"]),
            "pairs ranked right [95% CI]": _fmt(m["paired_accuracy"], m["paired_ci"]) + f" (n={m['n_pairs']})",
        })
    return rows
