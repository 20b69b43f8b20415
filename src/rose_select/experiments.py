"""Stage ``experiment``: the paper's tables and figures as sets of ``rose run`` s.

Every experiment starts from one ``base`` run config and varies one thing; runs that share a
model, pool and warm-up share its checkpoints, pool features and full-data model (``shared_dir``),
so an experiment costs one warm-up and one pool featurization per model. Each experiment writes
``<output_dir>/<experiment>/``: ``table.md``, ``results.json`` and PNG plots, next to the runs.

- ``table1``   every method on every target (held-out preference accuracy and reward margin).
- ``subtasks`` Tables 10-12: held-out accuracy per subtask, per method and target.
- ``figure3``  the SFT and the pairwise loss on the few-shot validation set of every trained model
               against its held-out preference accuracy, with Pearson/Spearman correlations.
- ``table2``   several base models (``models``).
- ``table3``   number of warm-up checkpoints: ROSE on the last 1, 2, ..., N checkpoints.
- ``figure4``  number of validation shots: the first k prompts per subtask of ``shots_source``,
               evaluated on one fixed held-out set (the prompts beyond the largest k).
- ``table9``   transfer: select with ``base.model``, train and evaluate each of ``models``.
- ``quality``  selection benchmark with known ground truth: target pairs planted in a generic pool
               (``quality.py``); with ``downstream_methods`` also a model trained on each listed
               selection (``quality_downstream.py``); ``--seeds N`` for intervals.

The table1, subtasks and figure3 experiments use the same runs: whichever runs first pays for them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rose_select import plots
from rose_select.config import save_yaml, to_dict
from rose_select.data import heldout_pairs, load_preferences
from rose_select.data.builtin import BUILTIN
from rose_select.data.heldout import prompt_key
from rose_select.data.preferences import target_name
from rose_select.errors import ConfigError
from rose_select.evaluation import run_evaluate
from rose_select.io import write_json, write_jsonl, write_text
from rose_select.pipeline import (
    RunConfig,
    eval_config,
    heldout_triples,
    resolve_input,
    run_pipeline,
    training_configs,
)
from rose_select.plots import _corr, _ranks
from rose_select.quality import quality as run_quality
from rose_select.quality import set_name
from rose_select.select.stage import METHODS
from rose_select.stats import fmt_interval, mean_interval
from rose_select.tables import markdown
from rose_select.train.stage import run_train

EXPERIMENTS = ("table1", "subtasks", "figure3", "table2", "table3", "figure4", "table9", "quality")
DEFAULT_TARGETS = [f"{BUILTIN}rose_data/validation/shp/shp_5_shot/shp_5_shot_preference.json",
                   f"{BUILTIN}rose_data/validation/se/se_2_shot/se_2_shot_preference.json",
                   f"{BUILTIN}rose_data/validation/hh/hh_1_shot/hh_1_shot_preference.json"]
DEFAULT_METHODS = {"table1": None, "subtasks": None, "figure3": None, "table2": ["rose", "less", "random"],
                   "table3": ["rose"], "figure4": ["rose", "less", "random"], "table9": ["rose", "random"],
                   "quality": ["rose", "rose_plus", "rose_ln", "less", "random", "bm25", "rds", "dsir", "influence", "shapley"]}
METRICS = ("rewards/accuracies", "rewards/margins", "logps/accuracy")


@dataclass
class ExperimentConfig:
    experiment: str = field(default="table1", metadata={"help": "|".join(EXPERIMENTS)})
    base: RunConfig = field(default_factory=RunConfig)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS), metadata={"help": "target preference files (table1, subtasks, figure3)"})
    heldouts: list[str] = field(default_factory=list, metadata={"help": "held-out preference file per target (default: each target's largest-shot sibling)"})
    methods: list[str] | None = field(default=None, metadata={"help": "methods to compare (default: per experiment; table1 uses all)"})
    models: list[str] = field(default_factory=list, metadata={"help": "table2: base models; table9: models trained on the selections"})
    shots: list[int] = field(default_factory=lambda: [1, 2, 5, 10], metadata={"help": "figure4: shots per subtask"})
    shots_source: str = field(default=f"{BUILTIN}rose_data/validation/shp/shp_20_shot/shp_20_shot_preference.json", metadata={"help": "figure4: preference file the k-shot sets are cut from"})
    output_dir: str = field(default="runs/experiments", metadata={"help": "experiment directory (runs and tables)"})
    seeds: int = field(default=1, metadata={"help": "table1, quality: seeds (warm-up subset, projection, training order; quality: also the planted prompts); mean and 95% interval"})
    quick: bool = field(default=False, metadata={"help": "quality: a small pool (30 generic records, 1 planted prompt per subtask)"})
    generic_records: int = field(default=200, metadata={"help": "quality: generic pool records sampled from base.pool"})
    plant_per_subtask: dict = field(default_factory=lambda: {"shp": 3, "se": 5, "hh": 10}, metadata={"help": "quality: planted prompts per subtask, by set name (YAML)"})
    downstream_methods: list[str] = field(default_factory=list, metadata={"help": "quality: rows of the benchmark (e.g. rose, rose_plus+balanced, random, length) to fine-tune on and evaluate on held-out pairs (default: none, selection only)"})
    downstream_pairs_per_subtask: dict = field(default_factory=dict, metadata={"help": "quality: evaluation pairs per subtask, by set name (YAML; absent: every pair left; 0: no downstream for that set)"})
    downstream_test_prompts: dict = field(default_factory=dict, metadata={"help": "quality: test prompts with golden answers, by set name (YAML; a dir of <set>_<subtask>.json): the trained models' golden-answer log-likelihood"})
    downstream_test_per_subtask: int | None = field(default=15, metadata={"help": "quality: golden-answer prompts per subtask (the first in file order; None: all)"})

    def __post_init__(self):

        if self.experiment not in EXPERIMENTS:
            raise ConfigError(f"experiment must be one of {list(EXPERIMENTS)}, got {self.experiment!r}")
        bad = [m for m in (self.methods or []) if m not in METHODS]
        if bad:
            raise ConfigError(f"methods: unknown {bad}; known: {list(METHODS)}")
        if self.experiment in ("table2", "table9") and not self.models:
            raise ConfigError(f"{self.experiment} needs models (base models to compare / to transfer to)")
        if self.heldouts and len(self.heldouts) != len(self.targets):
            raise ConfigError(f"{len(self.heldouts)} held-out files for {len(self.targets)} targets")
        if self.seeds < 1 or self.generic_records < 0:
            raise ConfigError(f"seeds must be >= 1 and generic_records >= 0, got {self.seeds}, {self.generic_records}")
        if self.experiment == "figure4" and (not self.shots or min(self.shots) < 1):
            raise ConfigError(f"figure4 needs shots >= 1, got {self.shots}")

    def downstream_pairs(self, target: str) -> int | None:
        """quality: evaluation pairs per subtask of ``target`` (None: all; ``--quick``: 2)."""
        if self.quick:
            return 2
        n = self.downstream_pairs_per_subtask.get(set_name(target))
        return None if n is None else int(n)

    def method_list(self) -> list[str]:

        return list(self.methods or DEFAULT_METHODS[self.experiment] or METHODS)

# ------------------------------------------------------------------------------------- pure helpers


def checkpoint_sets(n_epochs: int) -> list[list[int]]:
    """Table 3's sets: the last checkpoint, the last two, ..., all ``n_epochs``."""
    return [list(range(n_epochs - k + 1, n_epochs + 1)) for k in range(1, n_epochs + 1)]


def first_k_prompts(triples, k: int) -> list:
    """Triples of the first ``k`` distinct prompts of each subtask (every pair of such a prompt)."""

    kept_prompts: dict[str, list] = {}
    out = []
    for t in triples:
        prompts = kept_prompts.setdefault(t.subtask, [])
        key = prompt_key(t)
        if key not in prompts and len(prompts) < k:
            prompts.append(key)
        if key in prompts:
            out.append(t)
    return out


def write_triples_jsonl(triples, path: Path) -> Path:
    """Preference triples as TRL-style JSONL rows with their subtask (a format ``load_preferences`` reads)."""

    write_jsonl(path, ({"id": t.id, "subtask": t.subtask, "chosen": t.chosen, "rejected": t.rejected,
                        "prompt": [{"role": m.role, "content": m.content} for m in t.prompt]} for t in triples))
    return path


def correlations(x, y) -> dict:

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3:
        return {"pearson": None, "spearman": None, "n": int(len(x))}
    nan_none = lambda v: None if not np.isfinite(v) else float(v)
    return {"pearson": nan_none(_corr(x, y)), "spearman": nan_none(_corr(_ranks(x), _ranks(y))), "n": int(len(x))}

# ------------------------------------------------------------------------------------- runs


def _run(cfg: ExperimentConfig, name: str, **changes) -> Path:
    """One ``rose run`` under the experiment directory, sharing target-independent stages."""

    select = replace(cfg.base.select, **changes.pop("select", {}))
    featurize = replace(cfg.base.featurize, **changes.pop("featurize", {}))
    evaluate = replace(cfg.base.evaluate, **changes.pop("evaluate", {}))
    out = Path(cfg.output_dir)
    run_cfg = replace(cfg.base, output_dir=str(out / "runs" / name), shared_dir=str(out / "shared"),
                      select=select, featurize=featurize, evaluate=evaluate, **changes)
    if finished_with(Path(run_cfg.output_dir), run_cfg):
        print(f"[rose experiment] run {name}: finished before with this config, reused", flush=True)
        return Path(run_cfg.output_dir)
    print(f"[rose experiment] run {name}", flush=True)
    return run_pipeline(run_cfg)


def finished_with(run: Path, run_cfg: RunConfig) -> bool:
    """A run that completed (``results.json``) with exactly this config is reused as it is, so
    the experiments that share runs (table1, subtasks, figure3) only aggregate; ``rose run`` on
    the run directory re-checks every stage."""
    import yaml

    if not (run / "results.json").exists() or not (run / "config.yaml").exists():
        return False
    return yaml.safe_load((run / "config.yaml").read_text()) == json.loads(json.dumps(to_dict(run_cfg)))


def _metrics(run: Path, method: str) -> dict:
    return json.loads((run / "eval" / method / "metrics.json").read_text())


def _method_rows(run: Path, methods: list[str], **labels) -> list[dict]:
    rows = []
    for m in ["base", *methods]:
        overall = _metrics(run, m)["overall"]
        rows.append({**labels, "method": m, "n_heldout": overall.get("n"), **{k: overall.get(k) for k in METRICS}})
    return rows


def _target_runs(cfg: ExperimentConfig, seed: int = 0) -> dict[str, Path]:
    """One run per target; each target has its own held-out pairs (never the base config's).
    ``seed`` > 0 offsets the run's seed (warm-up subset, LoRA init, training order) and the
    projection's, under ``runs/seed-<seed>/``; seed 0 is the single-seed run."""
    heldouts = cfg.heldouts or [None] * len(cfg.targets)
    prefix, changes = "", {}
    if seed:
        prefix = f"seed-{seed}/"
        changes = {"seed": cfg.base.seed + seed, "featurize": {"seed": cfg.base.featurize.seed + seed}}
    return {target_name(t): _run(cfg, prefix + target_name(t), validation=t, select={"methods": cfg.method_list()},
                                 evaluate={"heldout": h}, **changes) for t, h in zip(cfg.targets, heldouts)}

# ------------------------------------------------------------------------------------- experiments


def table1(cfg: ExperimentConfig, out: Path) -> dict:
    """Every method on every target; with ``seeds`` > 1 the mean and 95% t-interval over seeds."""
    per_seed = [_target_runs(cfg, seed) for seed in range(cfg.seeds)]
    rows = [r for seed, runs in enumerate(per_seed) for name, run in runs.items()
            for r in _method_rows(run, cfg.method_list(), target=name, seed=seed)]
    targets = list(per_seed[0])
    stats = seed_statistics(rows)
    wide = {}
    for (method, target), st in stats.items():
        wide.setdefault(method, {"method": method})[target] = fmt_interval(st["accuracy"], 3)
    plots.share_bar_chart({t: {m: stats[(m, t)]["accuracy"]["mean"] or 0.0 for m in wide} for t in targets},
                          out / "table1.png", title="held-out preference accuracy (implicit reward vs the base model)",
                          ylabel="rewards/accuracies")
    n = {t: next(r["n_heldout"] for r in rows if r["target"] == t) for t in targets}
    md = (f"Held-out preference accuracy (`rewards/accuracies`) per method and target, {cfg.seeds} seed(s)"
          + (" (mean [95% t-interval over seeds])" if cfg.seeds > 1 else "") + "; held-out pairs: "
          + ", ".join(f"{t} {n[t]}" for t in targets) + ".\n\n"
          + markdown(list(wide.values()), ["method", *targets]) + "\n\nAll metrics:\n\n" + markdown(rows))
    return {"rows": rows, "seed_statistics": [{"method": m, "target": t, **st} for (m, t), st in stats.items()],
            "markdown": md, "runs": {f"seed-{s}/{k}": str(v) for s, runs in enumerate(per_seed) for k, v in runs.items()}}


def seed_statistics(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, target) -> accuracy and margin as mean and 95% t-interval over the seeds' rows."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    return {key: {"seeds": len(rs), "accuracy": mean_interval([r["rewards/accuracies"] for r in rs]),
                  "margin": mean_interval([r["rewards/margins"] for r in rs])} for key, rs in groups.items()}


def subtasks(cfg: ExperimentConfig, out: Path) -> dict:
    runs = _target_runs(cfg)
    rows, parts = [], []
    for name, run in runs.items():
        per = {m: _metrics(run, m)["per_subtask"] for m in ["base", *cfg.method_list()]}
        names = list(per["base"])
        table = [{"subtask": s, **{m: per[m][s].get("rewards/accuracies") for m in per}} for s in names]
        rows += [{"target": name, **r} for r in table]
        parts.append(f"### {name}\n\nHeld-out preference accuracy per subtask:\n\n{markdown(table)}")
    return {"rows": rows, "markdown": "\n\n".join(parts), "runs": {k: str(v) for k, v in runs.items()}}


def figure3(cfg: ExperimentConfig, out: Path) -> dict:
    """Validation losses on the few-shot set (what a user can compute before training on test
    data) against held-out accuracy: the paper finds the SFT loss does not track the target metric
    and the pairwise loss does. One point per trained model (method) and target."""

    runs = _target_runs(cfg)
    points = []
    for name, run in runs.items():
        target = resolve_input(next(t for t in cfg.targets if target_name(t) == name))
        for m in cfg.method_list():
            val_dir = out / "validation_loss" / name / m
            if not (val_dir / "metrics.json").exists():
                run_evaluate(eval_config(cfg.base, output=val_dir, test_prompts=False, adapter=_adapter_of(run, m),
                                         reference_cache=out / "validation_loss" / name / "reference_logps.npz",
                                         preferences=[target]))
            val = json.loads((val_dir / "metrics.json").read_text())["overall"]
            held = _metrics(run, m)["overall"]
            points.append({"target": name, "method": m, "val/loss_sft": val["loss/sft"],
                           "val/loss_pairwise": val["loss/pairwise"], "heldout/rewards_accuracies": held["rewards/accuracies"],
                           "heldout/rewards_margins": held["rewards/margins"]})
    stats = {}
    for loss in ("val/loss_sft", "val/loss_pairwise"):
        for name in [*runs, "all"]:
            pts = [p for p in points if name in ("all", p["target"])]
            stats[f"{loss} vs accuracy [{name}]"] = correlations([p[loss] for p in pts],
                                                                 [p["heldout/rewards_accuracies"] for p in pts])
            stats[f"{loss} vs margin [{name}]"] = correlations([p[loss] for p in pts],
                                                               [p["heldout/rewards_margins"] for p in pts])
        plots.scatter_with_fit([p[loss] for p in points], [p["heldout/rewards_accuracies"] for p in points],
                               [f"{p['method']}/{p['target']}" for p in points], out / f"figure3_{loss.split('_')[-1]}.png",
                               xlabel=f"validation {loss.split('/')[-1]} (few-shot set)",
                               ylabel="held-out preference accuracy", title=f"Figure 3: {loss} vs accuracy")
    stat_rows = [{"comparison": k, **v} for k, v in stats.items()]
    md = ("One point per (target, method): the model fine-tuned on that method's selection.\n\n"
          + markdown(points) + "\n\nCorrelations (a good validation loss correlates *negatively* with accuracy):\n\n"
          + markdown(stat_rows))
    return {"rows": points, "correlations": stats, "markdown": md, "runs": {k: str(v) for k, v in runs.items()}}


def _adapter_of(run: Path, method: str) -> str:
    """The adapter a finished run evaluated for ``method`` (as its metrics record it)."""
    adapter = _metrics(run, method)["config"]["adapter"]
    if not adapter:
        raise ConfigError(f"{run}: no trained model for method {method!r}")
    return adapter


def table2(cfg: ExperimentConfig, out: Path) -> dict:
    target = cfg.base.validation
    runs = {m: _run(cfg, f"{_slug(m)}-{target_name(target)}", model=m, select={"methods": cfg.method_list()})
            for m in cfg.models}
    rows = [r for model, run in runs.items() for r in _method_rows(run, cfg.method_list(), model=model)]
    return {"rows": rows, "markdown": f"Target `{target_name(target)}`.\n\n" + markdown(rows),
            "runs": {k: str(v) for k, v in runs.items()}}


def table3(cfg: ExperimentConfig, out: Path) -> dict:

    sets = checkpoint_sets(cfg.base.warmup.epochs)
    rows, runs = [], {}
    for ck in sets:
        name = f"ckpts-{'-'.join(map(str, ck))}-{target_name(cfg.base.validation)}"
        runs[name] = run = _run(cfg, name, featurize={"checkpoints": ck}, select={"methods": cfg.method_list()})
        for r in _method_rows(run, cfg.method_list()):
            if r["method"] != "base":
                rows.append({"checkpoints": ",".join(map(str, ck)), "n_checkpoints": len(ck), **r})
    for m in cfg.method_list():
        mine = [r for r in rows if r["method"] == m]
        plots.line_plot([r["n_checkpoints"] for r in mine], {m: [r["rewards/accuracies"] for r in mine]},
                        "warm-up checkpoints used (the last k)", "held-out preference accuracy",
                        f"Table 3: number of checkpoints ({m})", out / f"table3_{m}.png")
    return {"rows": rows, "markdown": markdown(rows), "runs": {k: str(v) for k, v in runs.items()}}


def figure4(cfg: ExperimentConfig, out: Path) -> dict:

    source = load_preferences(resolve_input(cfg.shots_source))
    k_max = max(cfg.shots)
    held = heldout_pairs(source, first_k_prompts(source, k_max))
    if not held:
        raise ConfigError(f"{cfg.shots_source}: no prompts left beyond the first {k_max} per subtask to hold out")
    data = out / "data"
    held_file = write_triples_jsonl(held, data / "heldout.jsonl")
    rows, runs = [], {}
    stem = target_name(cfg.shots_source).split("_")[0]
    for k in sorted(set(cfg.shots)):
        val = write_triples_jsonl(first_k_prompts(source, k), data / f"{stem}_{k}_shot.jsonl")
        runs[f"{k}-shot"] = run = _run(cfg, f"{stem}-{k}-shot", validation=str(val),
                                       select={"methods": cfg.method_list()}, evaluate={"heldout": str(held_file)})
        rows += [{"shots": k, **r} for r in _method_rows(run, cfg.method_list()) if r["method"] != "base"]
    ks = sorted(set(cfg.shots))
    plots.line_plot(ks, {m: [next(r["rewards/accuracies"] for r in rows if r["shots"] == k and r["method"] == m)
                             for k in ks] for m in cfg.method_list()},
                    "validation shots per subtask", "held-out preference accuracy",
                    f"Figure 4: number of shots ({stem}; {len(held)} fixed held-out pairs)", out / "figure4.png",
                    logx=True)
    return {"rows": rows, "markdown": f"{len(held)} held-out pairs (the same for every k).\n\n" + markdown(rows),
            "runs": {k: str(v) for k, v in runs.items()}}


def table9(cfg: ExperimentConfig, out: Path) -> dict:
    """Select with ``base.model``; train each of ``models`` on those selections (same recipe) and
    evaluate it against its own base model on the same held-out pairs."""

    source_run = _run(cfg, f"select-{_slug(cfg.base.model)}-{target_name(cfg.base.validation)}",
                      select={"methods": cfg.method_list()})
    rows = _method_rows(source_run, cfg.method_list(), select_model=cfg.base.model, train_model=cfg.base.model)
    _, triples = heldout_triples(cfg.base, resolve_input(cfg.base.validation))
    pool = resolve_input(cfg.base.pool)
    for model in cfg.models:
        if model == cfg.base.model:
            continue
        base_cfg = replace(cfg.base, model=model)
        _, train_cfg = training_configs(base_cfg, source_run, pool)
        root = out / "transfer" / _slug(model)
        for m in ["base", *cfg.method_list()]:
            adapter = None
            if m != "base":
                tcfg = replace(train_cfg, full=m == "full", output=str(root / "train" / m),
                               selection=None if m == "full" else str(source_run / "select" / m / "selected.jsonl"))
                adapter = str(run_train(tcfg) / "adapter")
            ecfg = eval_config(base_cfg, output=root / "eval" / m, test_prompts=False, adapter=adapter,
                               reference_cache=root / "reference_logps.npz")
            overall = json.loads((run_evaluate(ecfg, triples=triples) / "metrics.json").read_text())["overall"]
            rows.append({"select_model": cfg.base.model, "train_model": model, "method": m,
                         "n_heldout": overall.get("n"), **{k: overall.get(k) for k in METRICS}})
    return {"rows": rows, "markdown": f"Target `{target_name(cfg.base.validation)}`.\n\n" + markdown(rows),
            "runs": {"select": str(source_run)}}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)


def quality(cfg: ExperimentConfig, out: Path) -> dict:

    return run_quality(cfg, out)


RUNNERS = {"quality": quality, "table1": table1, "subtasks": subtasks, "figure3": figure3, "table2": table2, "table3": table3,
           "figure4": figure4, "table9": table9}


def add_cli_arguments(command: str, parser) -> None:
    parser.add_argument("name", nargs="?", choices=EXPERIMENTS, help="the experiment (same as --experiment)")


def handle_cli(command: str, args) -> int | None:
    if args.name:
        args.experiment = args.name
    return None


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run one experiment; returns its directory (table.md, results.json, plots)."""

    out = Path(cfg.output_dir) / cfg.experiment
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    result = RUNNERS[cfg.experiment](cfg, out)
    seconds = round(time.perf_counter() - t0, 1)
    write_json(out / "results.json", {"experiment": cfg.experiment, "seconds": seconds, "config": to_dict(cfg),
                                      **{k: v for k, v in result.items() if k != "markdown"}})
    write_text(out / "table.md", f"# {cfg.experiment}\n\n{result['markdown']}\n\n"
                                 f"Wall time of this command: {seconds} s (runs finished earlier are reused).\n")
    print(result["markdown"])
    return out
