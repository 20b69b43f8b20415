"""``rose run``: warm-up -> featurize -> select -> train -> evaluate, resumable stage by stage.

Each stage's resolved config plus the content of every input it reads (the model, the pool and
validation files, the warm-up checkpoint, the feature stores, the selection, the adapter) is
hashed; ``stages.json`` records the hash a stage started with and whether it finished. A rerun
skips finished stages whose hash is unchanged, resumes unfinished ones (stages resume internally:
warm-up from its last checkpoint, featurization from its done-mask) and redoes, from scratch,
stages whose settings or inputs changed, so a resumed stage never pairs with an input it did not
read.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from rose_select import plots
from rose_select.config import compose, save_yaml, section_fields, to_dict
from rose_select.costs import (
    add_plan_columns,
    cost_markdown,
    cost_table,
    current_threads,
    resolved_device,
    run_counts,
    tree_bytes,
)
from rose_select.data import (
    SubtaskSettings,
    find_heldout_file,
    first_per_subtask,
    heldout_pairs,
    load_pool,
    load_preferences,
)
from rose_select.data.builtin import BUILTIN, resolve_input
from rose_select.data.preferences import target_name
from rose_select.errors import ConfigError, DataError
from rose_select.evaluation import EvalConfig, EvalSettings, run_evaluate
from rose_select.features.stage import FeatureSettings, FeaturizeConfig, run_featurize
from rose_select.io import (content_fingerprint, hold_directory, read_json, sha256_file, sha256_json, write_json,
                            write_text)
from rose_select.losses import DpoSettings
from rose_select.modeling import LoraSettings, ModelSettings, model_identity
from rose_select.outline import Work, outline, seconds_per_row_step
from rose_select.plan import run_figures
from rose_select.report_html import write_report_html
from rose_select.select.methods import (
    GRADIENT_METHODS,
    METHODS,
    VARIANTS,
    stores_needed,
)
from rose_select.select.stage import (
    SelectConfig,
    SelectSettings,
    fingerprint as select_fingerprint,
    method_settings,
    run_select,
)
from rose_select.select.topk import (
    count_for_fraction,
    overlap_table,
    read_selection,
    reference_subtask_shares,
    shares_table,
)
from rose_select.tables import markdown
from rose_select.tokenization import TokenizeConfig
from rose_select.checkpoint import read_warmup_checkpoints
from rose_select.train.stage import (
    choose_subset,
    Schedule,
    TrainConfig,
    WarmupConfig,
    run_train,
    run_warmup,
)


@dataclass
class WarmupSection(Schedule):
    fraction: float = field(default=0.05, metadata={"help": "random fraction of the pool for the warm-up"})


_ONE_BETA = "beta (the run's top level: one DPO beta for featurize and evaluate)"


@dataclass
class FeaturizeSection(FeatureSettings):
    checkpoints: list[int] | None = field(default=None, metadata={"help": "warm-up epochs to use (default: all)"})

    RENAMED = {**FeatureSettings.RENAMED, "beta": _ONE_BETA}


@dataclass
class SelectSection(SelectSettings):
    # rose_plus first: the planted-pool benchmark's best reward-oriented selection (README, "Does it
    # select better data?"); the paper's rose beside it, exactly
    methods: list[str] = field(default_factory=lambda: ["rose_plus", "rose", "less", "random"],
                               metadata={"help": "methods to compare"})

    def __post_init__(self):
        super().__post_init__()
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"select.methods: unknown {bad}; known: {list(METHODS)}")
        if not self.methods:
            raise ConfigError("select.methods must name at least one method")


@dataclass
class EvaluateSection(EvalSettings):
    heldout: str | None = field(default=None, metadata={"help": "preference file to hold pairs out of (default: the largest-shot sibling of validation)"})
    limit_per_subtask: int | None = field(default=None, metadata={"help": "held-out triples per subtask (None: all)"})
    test_prompts: str | None = field(default=None, metadata={"help": "test prompt dir/file with golden answers (optional)"})

    RENAMED = {"beta": _ONE_BETA}


@dataclass
class PlantSection:
    """A planted pool (planted.py): generic rows of ``pool`` plus held-out target pairs, each twice."""

    generic_records: int = field(default=100, metadata={"help": "generic rows drawn (seeded) from the pool"})
    per_subtask: int = field(default=4, metadata={"help": "held-out target prompts planted per subtask, each with its preferred and its dispreferred answer"})

    def __post_init__(self):
        if self.generic_records < 1 or self.per_subtask < 1:
            raise ConfigError(f"plant: generic_records and per_subtask must be >= 1, got "
                              f"{self.generic_records} and {self.per_subtask}")


@dataclass
class RunConfig(ModelSettings, SubtaskSettings, DpoSettings):
    """A whole run. Its sections are the stages' own settings classes, handed to them whole."""

    output_dir: str = field(default="runs/demo", metadata={"help": "run directory"})
    pool: str = field(default=f"{BUILTIN}pool/sharegpt_demo.jsonl", metadata={"help": "instruction pool (path or builtin:...)"})
    pool_format: str = field(default="auto", metadata={"help": "pool format"})
    pool_limit: int | None = field(default=None, metadata={"help": "use the first N pool records"})
    validation: str = field(default=f"{BUILTIN}rose_data/validation/shp/shp_5_shot/shp_5_shot_preference.json", metadata={"help": "target-task preference file"})
    seed: int = field(default=42, metadata={"help": "seed of warm-up subset, training and random selection"})
    project_pool_size: int | None = field(default=None, metadata={"help": "cost table: also project each stage's time, device-hours and bytes to a pool of this many examples"})
    shared_dir: str | None = field(default=None, metadata={"help": "keep target-independent artifacts (warm-up, pool features, full-data training) under SHARED_DIR/<fingerprint>/ so runs on other targets reuse them"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    featurize: FeaturizeSection = field(default_factory=FeaturizeSection)
    select: SelectSection = field(default_factory=SelectSection)
    train: Schedule = field(default_factory=Schedule)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    plant: PlantSection | None = field(default=None, metadata={"help": "plant held-out target pairs into the pool, to measure each selection against known truth"})

    def __post_init__(self):
        super().__post_init__()
        if self.project_pool_size is not None and self.project_pool_size < 1:
            raise ConfigError(f"project_pool_size must be >= 1, got {self.project_pool_size}")

# ------------------------------------------------------------------------------------- stage bookkeeping


class StageLedger:
    """stages.json: the fingerprint each stage started with and whether it finished."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.state = read_json(self.path) if self.path.exists() else {}

    def run(self, key: str, fingerprint: str, outputs: list[Path], fn):
        entry = self.state.get(key)
        if entry and entry["fingerprint"] == fingerprint and entry["done"] and all(p.exists() for p in outputs):
            print(f"[rose run] {key}: done before, skipped")
            return entry.get("result")
        if entry and entry["fingerprint"] != fingerprint:
            print(f"[rose run] {key}: settings or inputs changed, redoing")
            for p in outputs:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self._set(key, {"fingerprint": fingerprint, "done": False})
        t0 = time.perf_counter()
        result = fn()
        self._set(key, {"fingerprint": fingerprint, "done": True, "seconds": round(time.perf_counter() - t0, 1),
                        "result": result, "bytes": tree_bytes(outputs), "threads": current_threads()})
        return result

    def _set(self, key, value):
        self.state[key] = value
        write_json(self.path, self.state)


def _fp(*parts) -> str:
    return sha256_json([to_dict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts])[:16]

# ------------------------------------------------------------------------------------- stages


def _model(cfg: RunConfig) -> dict:
    """The run's model settings, for a stage config."""
    return section_fields(cfg, ModelSettings)


def training_configs(cfg: RunConfig, shared: Path, pool: str) -> tuple[WarmupConfig, TrainConfig]:
    """The warm-up and the (full-pool) final-training configs of a run."""
    data = dict(data=pool, data_format=cfg.pool_format, limit=cfg.pool_limit, seed=cfg.seed,
                lora=cfg.lora, tokenize=cfg.tokenize)
    warm = compose(WarmupConfig, _model(cfg), cfg.warmup, **data, output=str(shared / "warmup"))
    train = compose(TrainConfig, _model(cfg), cfg.train, **data, full=True, output=str(shared / "train"))
    return warm, train


def featurize_jobs(cfg: RunConfig, run: Path, shared: Path, pool: str, validation: str,
                   ckpts: list[Path]) -> list[tuple[str, FeaturizeConfig]]:
    """(key, FeaturizeConfig) for every store the chosen methods need (pool stores under ``shared``)."""
    methods = set(cfg.select.methods)
    settings = section_fields(cfg.featurize, FeatureSettings)
    if settings["ref"] == "auto" and "influence" in methods:  # influence needs DPO's scale
        settings["ref"] = "base"
    needed = set().union(*[stores_needed(m, **{k: v for k, v in method_settings(cfg.select, m).items()
                                                 if k in ("direction", "chosen_weight")}) for m in methods])
    common = dict(**_model(cfg), **settings, **section_fields(cfg, DpoSettings), lora=cfg.lora, tokenize=cfg.tokenize)
    layout = section_fields(cfg, SubtaskSettings)  # the validation file's subtasks, as select reads it
    jobs = []
    for ck in ckpts:
        base = run / "features" / ck.name
        kinds = []
        if methods & set(GRADIENT_METHODS):
            kinds.append(("pool", dict(data=pool, data_kind="pool", data_format=cfg.pool_format,
                                       limit=cfg.pool_limit, loss="sft", adam=True),
                          shared / "features" / ck.name / "pool"))
        joint = "pairwise" in needed and "sft_chosen" in needed
        if "pairwise" in needed:  # with the chosen-answer store: one pass writes both (features/joint.py)
            kinds.append(("val_pairwise" + ("+val_sft" if joint else ""),
                          dict(data=validation, data_kind="preference", loss="pairwise", adam=False, **layout,
                               chosen_output=str(base / "val_sft") if joint else None),
                          base / "val_pairwise"))
        for loss, store in (("sft_chosen", "val_sft"), ("sft_rejected", "val_sft_rejected")):
            if loss in needed and not (joint and loss == "sft_chosen"):
                kinds.append((store, dict(data=validation, data_kind="preference", loss=loss, adam=False, **layout),
                              base / store))
        jobs += [(f"featurize/{ck.name}/{kind}", FeaturizeConfig(**common, **io, checkpoint=str(ck), output=str(out)))
                 for kind, io, out in kinds]
    return jobs


def _checkpoints(cfg: RunConfig, warm_dir: Path) -> list[Path]:
    ckpts = sorted(warm_dir.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    if cfg.featurize.checkpoints:
        wanted = set(cfg.featurize.checkpoints)
        ckpts = [c for c in ckpts if int(c.name.split("-")[1]) in wanted]
        if len(ckpts) != len(wanted):
            raise ConfigError(f"featurize.checkpoints {sorted(wanted)}: warm-up has {[c.name for c in ckpts]}")
    if not ckpts:
        raise ConfigError(f"{warm_dir}: no warm-up checkpoints")
    return ckpts


def select_config(cfg: RunConfig, run: Path, shared: Path, method: str, pool: str, validation: str,
                  ckpts: list[Path]) -> SelectConfig:
    """The select stage's config for one method of a run."""
    feats = run / "features"
    val_kind = "val_sft" if method == "less" else "val_pairwise"
    grad = method in GRADIENT_METHODS
    rose_family = method == "rose" or method in VARIANTS
    weights = None
    if grad and cfg.featurize.checkpoints:  # a subset of checkpoints: weights from their own epochs
        lrs = {str(path): lr for _, path, lr in read_warmup_checkpoints(shared / "warmup")}
        weights = [lrs[str(c)] for c in ckpts]
    return compose(
        SelectConfig, _model(cfg), method_settings(cfg.select, method),
        section_fields(cfg, SubtaskSettings),
        method=method, pool=pool, pool_format=cfg.pool_format, pool_limit=cfg.pool_limit, validation=validation,
        pool_features=[str(shared / "features" / c.name / "pool") for c in ckpts] if grad else [],
        val_features=[str(feats / c.name / val_kind) for c in ckpts] if grad else [],
        val_chosen_features=[str(feats / c.name / "val_sft") for c in ckpts] if rose_family else [],
        val_rejected_features=[str(feats / c.name / "val_sft_rejected") for c in ckpts] if rose_family else [],
        warmup_dir=str(shared / "warmup") if grad else None, checkpoint_weights=weights, seed=cfg.seed,
        adapter=str(ckpts[-1]) if method == "rds" else None, tokenize=cfg.tokenize,
        batch_size=cfg.featurize.batch_size, output=str(run / "select" / method))


def eval_config(cfg: RunConfig, *, output, reference_cache, test_prompts: bool = True, **overrides) -> EvalConfig:
    """A run's evaluation settings (its evaluate section, model, tokenisation, device).
    ``test_prompts=False`` leaves out the golden-answer prompts and the judge (preference pairs only)."""
    settings = section_fields(cfg.evaluate, EvalSettings)
    if not test_prompts:
        settings.update(judge=None, judge_url=None)
    return compose(EvalConfig, _model(cfg), settings, section_fields(cfg, DpoSettings),
                   section_fields(cfg, SubtaskSettings), tokenize=cfg.tokenize, reference_cache=str(reference_cache),
                   test_prompts=cfg.evaluate.test_prompts if test_prompts else None, output=str(output),
                   **overrides)


def heldout_triples(cfg: RunConfig, validation: str):
    """Held-out pairs: the larger-shot file minus every prompt used for selection (deterministic)."""

    kw = cfg.subtask_kwargs()
    source = resolve_input(cfg.evaluate.heldout) if cfg.evaluate.heldout else str(find_heldout_file(validation))
    triples = first_per_subtask(heldout_pairs(load_preferences(source, **kw), load_preferences(validation, **kw)),
                                cfg.evaluate.limit_per_subtask)
    if not triples:
        raise ConfigError(f"no held-out pairs: every prompt of {source} is used for selection")
    return source, triples


@dataclass
class _Run:
    """What every phase of a run shares: its config, inputs, fingerprints and ledgers."""

    cfg: RunConfig
    dir: Path
    pool: str
    validation: str
    data_fp: dict
    ledger: StageLedger
    warm: WarmupConfig = None
    train: TrainConfig = None
    fp_warm: str = ""
    shared: Path = None  # target-independent stages: the run dir, or shared by runs with the same warm-up
    shared_ledger: StageLedger = None
    lock: IO = None  # the run directory's lock (io.hold_directory), held while the run lives


def _start(cfg: RunConfig) -> _Run:
    """Check the inputs before anything is written (no leftover config.yaml), then record the config."""
    run_dir = Path(cfg.output_dir)
    pool, validation = resolve_input(cfg.pool), resolve_input(cfg.validation)
    for name, path in (("pool", pool), ("validation", validation)):
        if not Path(path).is_file():
            raise DataError("file not found", path=path, field=name)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_directory(run_dir, "rose run")  # until this process ends
    save_yaml(cfg, run_dir / "config.yaml")
    if cfg.plant:  # from here on the run's pool is the planted one
        pool, cfg = _planted_pool(cfg, validation, run_dir)
    data_fp = {"pool": sha256_file(pool), "validation": sha256_file(validation), "model": model_identity(cfg.model)}
    run = _Run(cfg, run_dir, pool, validation, data_fp, StageLedger(run_dir), lock=lock)
    run.warm, run.train = training_configs(cfg, run_dir, pool)
    run.fp_warm = _fp(replace(run.warm, output=""), data_fp["pool"], data_fp["model"])
    run.shared = Path(cfg.shared_dir) / f"warmup-{run.fp_warm}" if cfg.shared_dir else run_dir
    run.shared_ledger = StageLedger(run.shared) if cfg.shared_dir else run.ledger
    run.warm = replace(run.warm, output=str(run.shared / "warmup"))
    return run


def _planted_pool(cfg: RunConfig, validation: str, run_dir: Path) -> tuple[str, RunConfig]:
    """Build the planted pool (``run_dir/planted/``); the run's config with it as the pool."""
    from rose_select import planted  # imported when used: planted -> quality -> pipeline

    path, _ = planted.build(cfg, validation, run_dir / "planted")
    return str(path), replace(cfg, pool=str(path), pool_format="messages", pool_limit=None)


def _heldout(run: _Run):
    """(source, pairs) the final models are measured on; on a planted pool also minus its prompts."""
    if not run.cfg.plant:
        return heldout_triples(run.cfg, run.validation)
    from rose_select import planted

    return planted.evaluation_triples(run.cfg, run.validation, Path(run.pool), planted.read_truth(run.dir / "planted"))


def _warmup_and_features(run: _Run, after_warmup=lambda: None) -> list[Path]:
    """Warm-up, then every feature store the methods need; returns the checkpoints scored."""
    run.shared_ledger.run("warmup", run.fp_warm, [run.shared / "warmup"], lambda: str(run_warmup(run.warm)))
    after_warmup()
    ckpts = _checkpoints(run.cfg, run.shared / "warmup")
    for key, fcfg in featurize_jobs(run.cfg, run.dir, run.shared, run.pool, run.validation, ckpts):
        pool_job = key.endswith("/pool")
        where = run.shared_ledger if pool_job else run.ledger
        outs = [Path(p) for p in (fcfg.output, fcfg.chosen_output) if p]
        inputs = [content_fingerprint(fcfg.checkpoint), None if pool_job else run.data_fp["validation"]]
        where.run(key, _fp(fcfg, run.fp_warm, *inputs), outs, lambda c=fcfg: str(run_featurize(c)))
    return ckpts


def _select_all(run: _Run, ckpts: list[Path]) -> None:
    fp_feat = _fp(run.cfg.featurize, run.fp_warm)
    for method in run.cfg.select.methods:
        scfg = select_config(run.cfg, run.dir, run.shared, method, run.pool, run.validation, ckpts)
        fp = _fp(select_fingerprint(scfg), fp_feat)  # the stores' and files' contents included
        run.ledger.run(f"select/{method}", fp, [Path(scfg.output)], lambda c=scfg: str(run_select(c)))


def _train_method(run: _Run, method: str) -> tuple[TrainConfig, str]:
    """The final model of one method (the full pool's is shared by every target); its fingerprint."""
    if method == "full":
        tcfg = replace(run.train, full=True, output=str(run.shared / "train" / "full"))
        fp_train = _fp(replace(tcfg, output=""), run.data_fp["pool"], run.data_fp["model"])
        run.shared_ledger.run("train/full", fp_train, [Path(tcfg.output)], lambda c=tcfg: str(run_train(c)))
    else:
        sel = run.dir / "select" / method / "selected.jsonl"
        tcfg = replace(run.train, full=False, selection=str(sel), output=str(run.dir / "train" / method))
        fp_train = _fp(tcfg, run.ledger.state[f"select/{method}"]["fingerprint"], sha256_file(sel))
        run.ledger.run(f"train/{method}", fp_train, [Path(tcfg.output)], lambda c=tcfg: str(run_train(c)))
    return tcfg, fp_train


def _train_and_evaluate(run: _Run, triples) -> None:
    """The base model, then each method's final model, on the same held-out pairs."""
    reference_cache = run.dir / "eval" / "reference_logps.npz"
    fp_eval = _fp(run.cfg.evaluate, run.data_fp, [(t.id, t.subtask, [(m.role, m.content) for m in t.prompt],
                                                   t.chosen, t.rejected) for t in triples])  # the pairs, by content
    base = eval_config(run.cfg, output=run.dir / "eval" / "base", reference_cache=reference_cache)
    run.ledger.run("evaluate/base", _fp(base, fp_eval), [Path(base.output)],
                   lambda: str(run_evaluate(base, triples=triples)))
    for method in run.cfg.select.methods:
        tcfg, fp_train = _train_method(run, method)
        ecfg = eval_config(run.cfg, output=run.dir / "eval" / method, reference_cache=reference_cache,
                           adapter=str(Path(tcfg.output) / "adapter"))
        fp_adapter = content_fingerprint(ecfg.adapter)
        run.ledger.run(f"evaluate/{method}", _fp(ecfg, fp_eval, fp_train, fp_adapter), [Path(ecfg.output)],
                       lambda c=ecfg: str(run_evaluate(c, triples=triples)))


def run_work(run: _Run, n_heldout: int) -> Work:
    """The rows each stage of the run will process (for the printed outline)."""
    cfg = run.cfg
    n_pool = len(load_pool(run.pool, format=cfg.pool_format, limit=cfg.pool_limit))
    kw = cfg.subtask_kwargs()
    grad = bool(set(cfg.select.methods) & set(GRADIENT_METHODS))
    ckpts = len(cfg.featurize.checkpoints) if cfg.featurize.checkpoints else cfg.warmup.epochs
    return Work(pool=n_pool, warmup=len(choose_subset(n_pool, cfg.warmup.fraction, cfg.seed)),
                warmup_epochs=cfg.warmup.epochs, checkpoints=ckpts if grad else 0,
                validation=len(load_preferences(run.validation, **kw)), methods=tuple(cfg.select.methods),
                selected=count_for_fraction(cfg.select.fraction, n_pool), train_epochs=cfg.train.epochs,
                heldout=n_heldout)


def _print_outline(run: _Run, work: Work) -> None:
    """The outline, with a time estimate once the warm-up has been timed."""
    warm = run.shared_ledger.state.get("warmup", {})
    rate = seconds_per_row_step(warm["seconds"], work) if warm.get("done") and warm.get("seconds") else None
    done = tuple(k for k in ("warmup",) if warm.get("done"))
    planted = " (planted: generic rows + held-out target pairs)" if run.cfg.plant else ""
    print(outline(work, run.dir, f"{run.pool}{planted}", rate, done), flush=True)


def run_pipeline(cfg: RunConfig) -> Path:
    """The whole pipeline; returns the run directory (with report.md)."""
    run = _start(cfg)
    heldout_source, triples = _heldout(run)
    work = run_work(run, len(triples))
    _print_outline(run, work)
    ckpts = _warmup_and_features(run, lambda: _print_outline(run, work))
    _select_all(run, ckpts)
    _train_and_evaluate(run, triples)
    costs = cost_table({**run.shared_ledger.state, **run.ledger.state},
                       run_counts(run.dir, run.shared, cfg.select.methods, len(triples)),
                       resolved_device(cfg.device), cfg.project_pool_size)
    if resolved_device(cfg.device) == "cuda" or cfg.project_pool_size:  # the plan: ~15 s of a 2-core CPU
        costs = add_plan_columns(costs, lambda: run_figures(run.cfg, run.pool, cfg.device))
    table = write_report(cfg, run.dir, heldout_source, len(triples), run.ledger, costs)
    print(table)
    return run.dir

# ------------------------------------------------------------------------------------- report


REPORT_METRICS = ("rewards/accuracies", "rewards/margins", "logps/accuracy", "loss/pairwise", "loss/sft")


def summary_rows(run: Path, methods: list[str]) -> list[dict]:
    rows = []
    for name in ["base", *methods]:
        m = read_json(run / "eval" / name / "metrics.json")["overall"]
        n_sel = "-" if name == "base" else read_json(run / "select" / name / "summary.json")["n_selected"]
        rows.append({"method": name, "n_train": n_sel, **{k: m.get(k) for k in REPORT_METRICS}})
    return rows


def planted_section(cfg: RunConfig, run: Path, methods: list[str]) -> tuple[dict | None, str]:
    """On a planted pool: each method's figures against the ground truth, and their markdown."""
    if not cfg.plant:
        return None, ""
    from rose_select import planted

    truth = planted.read_truth(run / "planted")
    figs = planted.figures(run, methods, truth, target_name(cfg.validation))
    n_target = sum(r.domain != "generic" for r in truth)
    return figs, (f"## The selections against the planted truth\n\n{len(truth)} pool rows, {n_target} of them "
                  f"planted target rows ({n_target // 2} held-out prompts, each with its preferred and its "
                  f"dispreferred answer). 95% Wilson intervals.\n\n{markdown(planted.figures_rows(figs))}\n\n")


def write_report(cfg: RunConfig, run: Path, heldout_source: str, n_heldout: int, ledger: StageLedger,
                 costs: dict | None = None) -> str:

    methods = cfg.select.methods
    rows = summary_rows(run, methods)
    table = markdown(rows)
    sels = {m: read_selection(run / "select" / m) for m in methods if m != "full"}
    matrix, overlap_md = overlap_table(sels) if len(sels) > 1 else (None, "(one method)")
    plots.bar_chart({r["method"]: r["rewards/accuracies"] for r in rows}, run / "accuracy.png",
                    ylabel="held-out preference accuracy", title="held-out preference accuracy per method",
                    reference=0.5)
    if matrix is not None:
        plots.overlap_heatmap(matrix, list(sels), run / "overlap.png")
    shares_md = "(no gradient method in this run)"
    shares, reference = reference_subtask_shares(sels, {m: run / "select" / m for m in sels})
    if shares is not None:
        shares_md = f"Subtasks assigned by `{reference}`'s best-matching subtask.\n\n" + shares_table(shares)
        plots.share_bar_chart(shares, run / "subtask_share.png",
                              title=f"share per best-matching subtask (assigned by {reference})")
    timing = {k: v.get("seconds") for k, v in ledger.state.items()}
    figs, planted_md = planted_section(cfg, run, list(sels))
    write_json(run / "results.json", {"rows": rows, "heldout_source": heldout_source, "n_heldout": n_heldout,
                                      "planted": figs, "stage_seconds": timing, "costs": costs})
    report = (f"# rose run: {run}\n\nmodel `{cfg.model}`, pool `{cfg.pool}`, target `{cfg.validation}`; "
              f"{n_heldout} held-out pairs from `{Path(heldout_source).name}` (prompts used for selection removed).\n\n"
              + planted_md +
              f"## Held-out preference metrics (implicit reward vs the base model)\n\n{table}\n\n"
              f"## Selection overlap (Jaccard)\n\n{overlap_md}\n\n"
              f"## Selected share per subtask\n\n{shares_md}\n\n"
              f"## Stage times (s)\n\n" + "\n".join(f"- {k}: {v}" for k, v in timing.items()) + "\n"
              + (f"\n## Cost per stage\n\n{cost_markdown(costs, markdown)}\n" if costs else ""))
    write_text(run / "report.md", report)
    _report_html(cfg, run, rows, figs, timing, list(sels))
    return planted_md + table


def _report_html(cfg: RunConfig, run: Path, rows: list[dict], figs: dict | None, timing: dict, methods: list[str]) -> None:
    """``report.html``: the report's tables and plots, and every method's selected examples."""
    truth = None
    tables = [("Held-out preference metrics", "Implicit reward against the base model, on held-out pairs "
               "no method saw (rewards/accuracies: share of pairs whose better answer gets the larger reward).", rows)]
    if figs is not None:
        from rose_select import planted

        truth = {t.id: t for t in planted.read_truth(run / "planted")}
        tables.insert(0, ("The selections against the planted truth", "Target precision against the base rate, "
                          "the preferred share of the target rows picked, and the planted prompts whose preferred "
                          "row outscored its dispreferred row; 95% Wilson intervals.", planted.figures_rows(figs)))
    tables.append(("Stage times (s)", "", [{"stage": k, "seconds": v} for k, v in timing.items()]))
    images = [(run / f, c) for f, c in (("accuracy.png", "held-out preference accuracy"), ("overlap.png", "overlap"),
                                        ("subtask_share.png", "share per best-matching subtask"))]
    write_report_html(run / "report.html", title=f"rose run: {run}",
                      intro=f"model {cfg.model}, pool {cfg.pool}, target {cfg.validation}",
                      tables=tables, images=images, selections={m: run / "select" / m for m in methods}, truth=truth)
