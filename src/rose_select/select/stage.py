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

from rose_select.checkpoints import read_warmup_checkpoints, warmup_epochs
from rose_select.errors import ConfigError, DataError
from rose_select.modeling import ModelSettings
from rose_select.select.scoring import DIRECTIONS
from rose_select.select.topk import count_for_fraction, select_balanced
from rose_select.tokenization import TokenizeConfig

# Presets of ROSE variants (``rose`` itself is the paper's method, exactly): the validation
# direction and the weight of the chosen-answer (LESS) direction added to it; see
# ``scoring.validation_directions`` and the README section "Does it select better data?".
VARIANTS = {"rose_plus": {"direction": "pairwise", "chosen_weight": 2.0, "center": True},
            "rose_ln": {"direction": "pairwise_ln", "chosen_weight": 0.0, "center": False}}
METHODS = ("rose", "less", "random", "bm25", "rds", "dsir", "influence", "shapley", "full", *VARIANTS)
GRADIENT_METHODS = ("rose", "less", "influence", "shapley", *VARIANTS)


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
class SelectConfig(ModelSettings, SelectSettings):
    """One selection: a method, the pool, the target's validation file and (gradient methods) the
    feature stores. The model settings serve rds, which embeds texts."""

    method: str = field(default="rose", metadata={"help": "|".join(METHODS)})
    pool: str = field(default="", metadata={"help": "instruction pool file"})
    pool_format: str = field(default="auto", metadata={"help": "pool format (auto|messages|alpaca|sharegpt|...)"})
    pool_limit: int | None = field(default=None, metadata={"help": "use only the first N pool records"})
    validation: str = field(default="", metadata={"help": "validation preference file (the target task)"})
    num_subtasks: int | None = field(default=None, metadata={"help": "subtask count of a contiguous preference file"})
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


# ------------------------------------------------------------------------------------- helpers

def lr_weights(cfg: SelectConfig, n_checkpoints: int) -> np.ndarray:
    """Checkpoint weights: the override, else the warm-up's mean lr per epoch, else uniform."""
    from rose_select.select.scoring import checkpoint_weights

    if cfg.checkpoint_weights:
        if len(cfg.checkpoint_weights) != n_checkpoints:
            raise ConfigError(f"{len(cfg.checkpoint_weights)} checkpoint weights for {n_checkpoints} checkpoints")
        return checkpoint_weights(cfg.checkpoint_weights)
    if cfg.warmup_dir:
        lrs = warmup_lrs(cfg.warmup_dir)
        if len(lrs) != n_checkpoints:
            raise ConfigError(f"the warm-up {cfg.warmup_dir} has {len(lrs)} checkpoints but {n_checkpoints} "
                              "are scored; give checkpoint_weights for a subset of checkpoints")
        return checkpoint_weights(lrs)
    return np.full(n_checkpoints, 1.0 / n_checkpoints)


def warmup_lrs(warmup_dir: str) -> list[float]:
    """Mean lr of each warm-up epoch, read from the checkpoints themselves (each records its own);
    an unfinished warm-up is refused rather than weighted by the epochs it happens to have."""
    ckpts = read_warmup_checkpoints(warmup_dir)
    epochs = warmup_epochs(warmup_dir)
    if not ckpts or (epochs is not None and len(ckpts) != epochs):
        raise ConfigError(f"{warmup_dir}: the warm-up has {len(ckpts)} of {epochs or '?'} checkpoints; "
                          "run the warm-up again with the same settings to finish it")
    return [lr for _, _, lr in ckpts]


def _need_features(cfg: SelectConfig):
    if not cfg.pool_features or not cfg.val_features:
        raise ConfigError(f"method {cfg.method!r} needs pool_features and val_features (feature stores)")
    if len(cfg.pool_features) != len(cfg.val_features):
        raise ConfigError(f"{len(cfg.pool_features)} pool stores but {len(cfg.val_features)} validation stores")


def representations(model, tokenizer, encodings, *, pooling: str, batch_size: int, device: str) -> np.ndarray:
    """Final-layer hidden states, mean-pooled over real tokens or taken at the last token (RDS)."""
    import torch

    from rose_select.tokenization import collate

    out = []
    model.eval()
    for i in range(0, len(encodings), batch_size):
        batch = collate(encodings[i:i + batch_size], tokenizer.pad_token_id, padding_side="right")
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            h = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        if pooling == "mean":
            out.append(((h * mask).sum(1) / mask.sum(1)).cpu().numpy())
        else:
            last = batch["attention_mask"].sum(1) - 1
            out.append(h[torch.arange(h.shape[0]), last].cpu().numpy())
    return np.concatenate(out).astype(np.float64)


# ------------------------------------------------------------------------------------- methods

def stores_needed(method: str, direction: str = "pairwise", chosen_weight: float = 0.0) -> set[str]:
    """Validation stores a gradient method reads: ``pairwise``, ``sft_chosen``, ``sft_rejected``."""
    if method in VARIANTS:
        direction, chosen_weight = VARIANTS[method]["direction"], VARIANTS[method]["chosen_weight"]
    elif method == "less":
        return {"sft_chosen"}
    elif method not in ("rose", "influence", "shapley"):
        return set()
    need = {"pairwise"} if direction == "pairwise" else {"sft_chosen", "sft_rejected"}
    return need | ({"sft_chosen"} if chosen_weight else set())


def _is_variant(cfg) -> bool:
    return cfg.method != "less" and (cfg.direction != "pairwise" or cfg.chosen_weight > 0)


def _variant_result(cfg, w):
    """Scores with the validation vectors of a ROSE variant (``scoring.validation_directions``)."""
    from rose_select.errors import StoreMismatchError
    from rose_select.select.scoring import load_store_features, rose_scores, validation_directions

    n = len(cfg.pool_features)
    ln = cfg.direction == "pairwise_ln"
    lists = {"pairwise": [] if ln else cfg.val_features,
             "chosen": cfg.val_chosen_features if ln or cfg.chosen_weight else [],
             "rejected": cfg.val_rejected_features if ln else []}
    for key, paths in lists.items():
        if paths and len(paths) != n:
            raise ConfigError(f"{len(paths)} {key} validation stores for {n} pool stores (one per checkpoint)")
    stores = {k: [load_store_features(p) for p in paths] if paths else None for k, paths in lists.items()}
    first = next(s[0] for s in stores.values() if s)
    for key, ss in stores.items():
        for st in ss or []:
            if st.ids != first.ids or st.groups != first.groups:
                raise StoreMismatchError(f"the {key} validation store lists other triples than the others; "
                                         "featurize every store on the same validation file")
    vals = [validation_directions(cfg.direction, chosen_weight=cfg.chosen_weight,
                                  **{k: (ss[i].features if ss else None) for k, ss in stores.items()})
            for i in range(n)]
    train = [load_store_features(p) for p in cfg.pool_features]
    result = rose_scores([t.features for t in train], vals, w, first.groups, reduce=cfg.reduce,
                         train_ids=train[0].ids, val_ids=first.ids, center=cfg.center)
    return result, train[0].ids


def _scores_gradient(cfg, pool, triples):
    """rose / less (and rose variants): the same streamed cosine score; the stores decide which
    loss it is. ``standardize`` z-scores each subtask's column before the max."""
    from rose_select.select.scoring import reduce_groups, score_stores, standardize_groups

    if not _is_variant(cfg):
        _need_features(cfg)
    elif not cfg.pool_features:
        raise ConfigError(f"method {cfg.method!r} needs pool_features (feature stores)")
    w = lr_weights(cfg, len(cfg.pool_features))
    if _is_variant(cfg):
        result, ids = _variant_result(cfg, w)
    else:
        result, ids = score_stores(cfg.pool_features, cfg.val_features, w, reduce=cfg.reduce, center=cfg.center)
    if ids != [r.id for r in pool]:
        raise ConfigError(f"pool store rows do not match the pool file {cfg.pool} (featurize it again)")
    per_group, scores = result.per_group, result.scores
    if cfg.standardize:
        per_group = standardize_groups(per_group)
        scores = reduce_groups(per_group, cfg.reduce)
    extra = {"checkpoint_weights": w.tolist(), "direction": cfg.direction, "chosen_weight": cfg.chosen_weight,
             "center": cfg.center, "standardize": cfg.standardize, "balanced": cfg.balanced}
    return scores, per_group, result.group_names, extra


def _require_dpo_scale(paths) -> None:
    """Influence sums unnormalised inner products, so each validation triple's DPO weight counts:
    refuse pairwise stores written with ``ref: auto`` (``pair_scale: unweighted``, weight left out)."""
    from rose_select.io import read_json

    for p in paths:
        meta = Path(p) / "meta.json"
        scale = read_json(meta).get("settings", {}).get("pair_scale") if meta.exists() else None
        if scale == "unweighted":
            raise ConfigError(f"{p}: pairwise features made with ref: auto carry each triple's direction but "
                              "not DPO's per-triple weight (the reference forward was skipped; cosine scoring "
                              "does not need it). The influence baseline needs the true scale: featurize the "
                              "validation set again with ref: base")


def _scores_influence(cfg, pool, triples):
    from rose_select.select.baselines import influence_scores
    from rose_select.select.scoring import load_store_features

    _need_features(cfg)
    _require_dpo_scale(cfg.val_features)
    w = lr_weights(cfg, len(cfg.pool_features))
    total = np.zeros(len(pool))
    for wi, p, v in zip(w, cfg.pool_features, cfg.val_features):
        total += wi * influence_scores(load_store_features(p).features, load_store_features(v).features,
                                       damping=cfg.damping)
    return total, None, None, {"checkpoint_weights": w.tolist(), "damping": cfg.damping}


def _scores_shapley(cfg, pool, triples):
    from rose_select.select.baselines import knn_shapley
    from rose_select.select.scoring import load_store_features

    _need_features(cfg)
    w = lr_weights(cfg, len(cfg.pool_features))
    total = np.zeros(len(pool))
    for wi, p, v in zip(w, cfg.pool_features, cfg.val_features):
        total += wi * knn_shapley(load_store_features(p).features, load_store_features(v).features, k=cfg.knn_k)
    return total, None, None, {"checkpoint_weights": w.tolist(), "k": cfg.knn_k}


def _scores_rds(cfg, pool, triples):
    from rose_select.select.baselines import rds_scores
    from rose_select.modeling import load_adapter, load_model, load_tokenizer
    from rose_select.runtime import resolve_device
    from rose_select.tokenization import encode_messages, encode_record
    from rose_select.records import Message

    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, dtype=cfg.model_dtype, device=device), load_tokenizer(cfg.model)
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter, trainable=False)
    tcfg = cfg.tokenize
    pool_enc = [encode_record(r, tok, tcfg) for r in pool]
    val_enc = [encode_messages(list(t.prompt) + [Message("assistant", t.chosen)], tok, tcfg, record=t.id, pair=True)
               for t in triples]
    kw = dict(pooling=cfg.rds_pooling, batch_size=cfg.batch_size, device=device)
    pe, ve = representations(model, tok, pool_enc, **kw), representations(model, tok, val_enc, **kw)
    return rds_scores(pe, ve, [t.subtask for t in triples], reduce=cfg.reduce), None, None, {"pooling": cfg.rds_pooling}


def _scores_text(cfg, pool, triples):
    from rose_select.select import baselines as B

    if cfg.method == "random":
        return B.random_scores(len(pool), cfg.seed), None, None, {"seed": cfg.seed}
    pool_texts, val_texts = [B.record_text(r) for r in pool], [B.triple_text(t) for t in triples]
    if cfg.method == "bm25":
        return B.bm25_scores(pool_texts, val_texts), None, None, {}
    return B.dsir_scores(pool_texts, val_texts, seed=cfg.seed), None, None, {"seed": cfg.seed}


SCORERS = {"rose": _scores_gradient, "less": _scores_gradient, "influence": _scores_influence,
           "shapley": _scores_shapley, "rds": _scores_rds, "random": _scores_text,
           "bm25": _scores_text, "dsir": _scores_text, **{v: _scores_gradient for v in VARIANTS}}


def _fingerprint(cfg: SelectConfig) -> dict:
    """Everything the selection depends on: the settings and the inputs' contents."""
    from rose_select.config import to_dict
    from rose_select.io import sha256_file

    stores = [sha256_file(Path(p) / "meta.json") if (Path(p) / "meta.json").exists() else None
              for p in [*cfg.pool_features, *cfg.val_features]]
    inputs = {"pool_sha256": sha256_file(cfg.pool),
              "validation_sha256": sha256_file(cfg.validation) if cfg.validation else None,
              "stores_meta_sha256": stores,
              "warmup_lrs": warmup_lrs(cfg.warmup_dir) if cfg.warmup_dir and not cfg.checkpoint_weights else None}
    return {"config": {k: v for k, v in to_dict(cfg).items() if k != "output"}, "inputs": inputs}


def _existing(out: Path, fp: dict) -> bool:
    """True if ``out`` already holds this very selection; refuse one made with other settings."""
    from rose_select.errors import StoreMismatchError
    from rose_select.io import read_json

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
    from rose_select.data import load_pool, load_preferences
    from rose_select.io import write_dir_atomically, write_json
    from rose_select.select.topk import select_top, write_selection

    if not cfg.pool:
        raise ConfigError("select needs a pool file (--pool)")
    pool = load_pool(cfg.pool, format=cfg.pool_format, limit=cfg.pool_limit)
    if cfg.method != "full" and not cfg.validation:
        raise ConfigError(f"method {cfg.method!r} needs a validation preference file (--validation)")
    if cfg.validation and not Path(cfg.validation).is_file():
        raise DataError("file not found", path=cfg.validation, field="validation")
    fp, out = _fingerprint(cfg), Path(cfg.output)
    if _existing(out, fp):
        return out
    if cfg.method == "full":
        scores, per_group, names, extra = np.zeros(len(pool)), None, None, {}
        idx = np.arange(len(pool))
    else:
        kw = {"num_subtasks": cfg.num_subtasks} if cfg.num_subtasks else {}
        triples = load_preferences(cfg.validation, **kw)
        scores, per_group, names, extra = SCORERS[cfg.method](cfg, pool, triples)
        if cfg.balanced:
            idx = select_balanced(per_group, cfg.count or count_for_fraction(cfg.fraction, len(pool)))
        else:
            idx = select_top(scores, fraction=cfg.fraction, count=cfg.count, ids=[r.id for r in pool],
                             sources=[r.source for r in pool], quotas=cfg.quotas)

    def fill(tmp: Path):
        write_selection(tmp, pool, scores, idx, per_group=per_group, group_names=names,
                        method=cfg.method, extra=extra, plots=cfg.plots)
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


def handle_cli(command: str, args) -> int | None:
    if not args.compare:
        return None
    from rose_select import plots
    from rose_select.select.topk import overlap_table, read_selection, reference_subtask_shares, shares_table

    dirs = {Path(p).name if Path(p).is_dir() else p: p for p in args.compare}
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
    return 0
