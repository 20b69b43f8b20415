"""The select stage: every method of the paper behind one config and one function.

Gradient methods (rose, less, influence, shapley) read feature stores written by ``rose featurize``;
text methods (random, bm25, dsir) read only the data; ``rds`` embeds texts with the model.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rose_select import plots
from rose_select.config import to_dict
from rose_select.data import SubtaskSettings, load_pool, load_preferences
from rose_select.errors import ConfigError, DataError, StoreMismatchError
from rose_select.io import read_json, sha256_file, write_dir_atomically, write_json
from rose_select.modeling import ModelSettings
from rose_select.report_html import write_report_html
from rose_select.select.methods import METHODS, SCORERS, VARIANTS, warmup_lrs
from rose_select.select.provenance import check_same_pool
from rose_select.select.scoring import DIRECTIONS, ScoreResult
from rose_select.select.topk import (
    count_for_fraction,
    overlap_table,
    read_selection,
    reference_subtask_shares,
    select_balanced,
    select_top,
    shares_table,
    write_selection,
)
from rose_select.tokenization import TokenizeConfig

# Options of the per-subtask gradient scores, with their defaults (the paper's method), and the
# methods each applies to: a preset fixes its own direction and centring.
ROSE_OPTIONS = {"direction": "pairwise", "chosen_weight": 0.0, "center": False, "standardize": False, "balanced": False}


def applicable_options(method: str) -> tuple[str, ...]:
    """The ``ROSE_OPTIONS`` that ``method`` uses (a run's select section applies them only there)."""
    if method == "rose":
        return tuple(ROSE_OPTIONS)
    if method == "less":
        return ("center", "standardize", "balanced")
    if method in VARIANTS:
        return ("standardize", "balanced")
    return ()


def method_settings(settings: "SelectSettings", method: str) -> dict:
    """A run's select section for one method: every setting, with the options ``method`` does not
    use reset to their defaults (so one section serves every method of a run)."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(SelectSettings)}
    unused = {k: v for k, v in ROSE_OPTIONS.items() if k not in applicable_options(method)}
    return {**values, **unused}


@dataclass
class SelectSettings:
    """How a selection is scored and cut, whatever the method's inputs: the ``select`` section of a run."""

    fraction: float = field(default=0.05, metadata={"help": "fraction of the pool to select"})
    reduce: str = field(default="max", metadata={"help": "max | mean over subtasks"})
    direction: str = field(default="pairwise", metadata={"help": "rose: validation direction, pairwise (the paper: summed log-probs) | pairwise_ln (length-normalised; needs val_chosen/val_rejected stores)"})
    chosen_weight: float = field(default=0.0, metadata={"help": "rose: add this times the unit chosen-answer SFT (LESS) direction to the pairwise one (needs val_chosen_features)"})
    center: bool = field(default=False, metadata={"help": "rose/less: subtract the pool's mean feature (the warm-up momentum every Adam feature shares) before the cosine"})
    standardize: bool = field(default=False, metadata={"help": "rose/less/variants: z-score each subtask's scores over the pool before the max"})
    balanced: bool = field(default=False, metadata={"help": "rose/less/variants: subtask-balanced selection, round robin over subtasks instead of the global top-k"})
    rds_pooling: str = field(default="mean", metadata={"help": "rds: mean | last token"})
    damping: float = field(default=0.1, metadata={"help": "influence: damping as a fraction of the mean diagonal"})
    knn_k: int = field(default=10, metadata={"help": "shapley: K of KNN-Shapley"})

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.reduce not in ("max", "mean"):
            raise ConfigError(f"reduce must be max|mean, got {self.reduce!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.rds_pooling not in ("mean", "last"):
            raise ConfigError(f"rds_pooling must be mean|last, got {self.rds_pooling!r}")
        getattr(super(), "__post_init__", lambda: None)()


@dataclass
class SelectConfig(ModelSettings, SelectSettings, SubtaskSettings):
    """One selection: a method, the pool, the target's validation file and (gradient methods) the
    feature stores. The model settings serve rds, which embeds texts."""

    method: str = field(default="rose", metadata={"help": "|".join(METHODS)})
    pool: str = field(default="", metadata={"help": "instruction pool file"})
    pool_format: str = field(default="auto", metadata={"help": "pool format (auto|messages|alpaca|sharegpt|...)"})
    pool_limit: int | None = field(default=None, metadata={"help": "use only the first N pool records"})
    validation: str = field(default="", metadata={"help": "validation preference file (the target task)"})
    pool_features: list[str] = field(default_factory=list, metadata={"help": "pool feature stores, one per checkpoint"})
    val_features: list[str] = field(default_factory=list, metadata={"help": "validation feature stores, one per checkpoint (pairwise for rose, sft_chosen for less)"})
    warmup_dir: str | None = field(default=None, metadata={"help": "warm-up run dir; its checkpoints' mean learning rates give the checkpoint weights"})
    checkpoint_weights: list[float] | None = field(default=None, metadata={"help": "override the checkpoint weights"})
    val_chosen_features: list[str] = field(default_factory=list, metadata={"help": "sft_chosen validation stores, one per checkpoint (rose variants)"})
    val_rejected_features: list[str] = field(default_factory=list, metadata={"help": "sft_rejected validation stores, one per checkpoint (direction pairwise_ln)"})
    count: int | None = field(default=None, metadata={"help": "number to select (overrides fraction)"})
    quotas: dict | None = field(default=None, metadata={"help": "per-source quotas {source: fraction or count} (YAML)"})
    seed: int = field(default=0, metadata={"help": "seed (random, dsir)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter for rds (optional)"})
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    batch_size: int = field(default=8, metadata={"help": "batch size for rds embeddings"})
    output: str = field(default="select", metadata={"help": "output directory"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})

    RENAMED = {"max_length": "tokenize.max_length"}

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        fixed = {**ROSE_OPTIONS, **VARIANTS.get(self.method, {})}  # what the method itself uses
        unused = [k for k in ROSE_OPTIONS if getattr(self, k) not in (ROSE_OPTIONS[k], fixed[k])
                  and k not in applicable_options(self.method)]
        if unused:
            raise ConfigError(f"{'/'.join(unused)}: not options of method {self.method!r} "
                              f"(rose takes all of {list(ROSE_OPTIONS)}; less: center/standardize/balanced; "
                              f"the presets {', '.join(VARIANTS)}: standardize/balanced)")
        for key, value in VARIANTS.get(self.method, {}).items():  # a preset fixes its direction
            setattr(self, key, value)
        if self.balanced and self.quotas:
            raise ConfigError("balanced selection and per-source quotas cannot be combined")


def fingerprint(cfg: SelectConfig) -> dict:
    """Everything the selection depends on: the settings and the inputs' contents (``config.json``;
    ``rose run`` compares it before it skips a finished selection)."""

    stores = [sha256_file(Path(p) / "meta.json") if (Path(p) / "meta.json").exists() else None
              for p in [*cfg.pool_features, *cfg.val_features, *cfg.val_chosen_features, *cfg.val_rejected_features]]
    inputs = {"pool_sha256": sha256_file(cfg.pool),
              "validation_sha256": sha256_file(cfg.validation) if cfg.validation else None,
              "stores_meta_sha256": stores,
              "warmup_lrs": warmup_lrs(cfg.warmup_dir) if cfg.warmup_dir and not cfg.checkpoint_weights else None}
    return {"config": {k: v for k, v in to_dict(cfg).items() if k != "output"}, "inputs": inputs}


def _existing(out: Path, fp: dict) -> bool:
    """True if ``out`` already holds this very selection; refuse one made with other settings."""

    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a directory; choose another output")
    if (out / "config.json").exists():
        old = read_json(out / "config.json")
        if old == fp:
            return True
        diff = sorted(f"{part}.{k}" for part in ("config", "inputs") for k in set(old.get(part, {})) | set(fp[part])
                      if old.get(part, {}).get(k) != fp[part].get(k))
        raise StoreMismatchError(f"{out} holds a selection made with other settings or inputs (differing: "
                                 f"{', '.join(diff)}); use another output directory or delete {out}")
    if any(out.iterdir()):
        raise StoreMismatchError(f"{out} exists but holds no selection config.json (not a selection, or "
                                 f"made by an older rose-select); use another output directory or delete {out}")
    return False


def run_select(cfg: SelectConfig) -> Path:
    """Score the pool with ``cfg.method`` and write the selection directory: complete or absent
    (built under a temporary name, then renamed), with the resolved config and input fingerprints
    in ``config.json``. A rerun with the same settings and inputs returns it as it is; other
    settings are refused, never mixed into it."""
    if not cfg.pool:
        raise ConfigError("select needs a pool file (--pool)")
    pool = load_pool(cfg.pool, format=cfg.pool_format, limit=cfg.pool_limit)
    if cfg.method != "full" and not cfg.validation:
        raise ConfigError(f"method {cfg.method!r} needs a validation preference file (--validation)")
    if cfg.validation and not Path(cfg.validation).is_file():
        raise DataError("file not found", path=cfg.validation, field="validation")
    fp, out = fingerprint(cfg), Path(cfg.output)
    if _existing(out, fp):
        return out
    if cfg.method == "full":
        result, idx = ScoreResult(np.zeros(len(pool))), np.arange(len(pool))
    else:
        triples = load_preferences(cfg.validation, **cfg.subtask_kwargs())
        result = SCORERS[cfg.method](cfg, pool, triples)
        if cfg.balanced:
            idx = select_balanced(result.per_group, cfg.count or count_for_fraction(cfg.fraction, len(pool)))
        else:
            idx = select_top(result.scores, fraction=cfg.fraction, count=cfg.count, ids=[r.id for r in pool],
                             sources=[r.source for r in pool], quotas=cfg.quotas)

    def fill(tmp: Path):
        write_selection(tmp, pool, result.scores, idx, per_group=result.per_group, group_names=result.group_names,
                        method=cfg.method, extra=result.extra, plots=cfg.plots)
        write_json(tmp / "config.json", fp)

    write_dir_atomically(out, fill)
    return out

# ------------------------------------------------------------------------------------- CLI hooks


def add_cli_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare", nargs="+", metavar="SELECTION",
                        help="print the Jaccard overlap table of selection directories (and, when one "
                             "has per-subtask scores, every selection's share per best-matching subtask) and exit")
    parser.add_argument("--plot-dir", default=None,
                        help="with --compare: also write overlap.png and subtask_share.png here")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="with --compare: where to write report.html (default: PLOT_DIR/report.html, "
                             "else beside the first selection directory)")


def handle_cli(command: str, args) -> int | None:
    if not args.compare:
        return None

    dirs = {Path(p).name if Path(p).is_dir() else p: p for p in args.compare}
    check_same_pool(dirs)
    sels = {name: read_selection(p) for name, p in dirs.items()}
    matrix, table = overlap_table(sels)
    print(table)
    shares, reference = reference_subtask_shares(sels, dirs)
    if shares is not None:
        print(f"\nshare per best-matching subtask (subtasks assigned by {reference}):")
        print(shares_table(shares))
    if args.plot_dir:
        plots.overlap_heatmap(matrix, list(sels), Path(args.plot_dir) / "overlap.png")
        if shares is not None:
            plots.share_bar_chart(shares, Path(args.plot_dir) / "subtask_share.png",
                                  title=f"share per best-matching subtask (assigned by {reference})")
    report = Path(args.report) if args.report else Path(args.plot_dir or Path(args.compare[0]).resolve().parent) / "report.html"
    images = [(Path(args.plot_dir) / f, f[:-4].replace("_", " ")) for f in ("overlap.png", "subtask_share.png")] if args.plot_dir else []
    write_report_html(report, title="rose select --compare", intro=", ".join(map(str, dirs.values())), images=images,
                      selections={name: Path(p) for name, p in dirs.items()})
    print(f"\nreport: {report}")
    return 0
