"""The selection methods: each scores every pool row (``SCORERS[method](cfg, pool, triples) ->
ScoreResult``); the select stage cuts and writes the selection.

Gradient methods (rose and its variants, less, influence, shapley) read feature stores written by
``rose featurize``; text methods (random, bm25, dsir) read only the data; ``rds`` embeds texts
with the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rose_select.checkpoint import check_base_model, read_warmup_checkpoints, warmup_epochs
from rose_select.errors import ConfigError
from rose_select.io import read_json
from rose_select.modeling import load_adapter, load_model, load_tokenizer
from rose_select.records import Message
from rose_select.runtime import resolve_device
from rose_select.select import baselines as B
from rose_select.select.provenance import check_gradient_inputs
from rose_select.select.scoring import (ScoreResult, checkpoint_weights, load_store_features, reduce_groups,
                                        rose_scores, score_stores, standardize_groups, validation_directions)
from rose_select.tokenization import collate, encode_messages, encode_record

# Presets of ROSE variants (``rose`` itself is the paper's method, exactly): the validation
# direction and the weight of the chosen-answer (LESS) direction added to it; see
# ``scoring.validation_directions`` and the README section "Does it select better data?".
VARIANTS = {"rose_plus": {"direction": "pairwise", "chosen_weight": 2.0, "center": True},
            "rose_ln": {"direction": "pairwise_ln", "chosen_weight": 0.0, "center": False}}
METHODS = ("rose", "less", "random", "bm25", "rds", "dsir", "influence", "shapley", "full", *VARIANTS)
GRADIENT_METHODS = ("rose", "less", "influence", "shapley", *VARIANTS)


def lr_weights(cfg, n_checkpoints: int) -> np.ndarray:
    """Checkpoint weights: the override, else the warm-up's mean lr per epoch, else uniform."""

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


def _need_features(cfg):
    if not cfg.pool_features or not cfg.val_features:
        raise ConfigError(f"method {cfg.method!r} needs pool_features and val_features (feature stores)")
    if len(cfg.pool_features) != len(cfg.val_features):
        raise ConfigError(f"{len(cfg.pool_features)} pool stores but {len(cfg.val_features)} validation stores")


def representations(model, tokenizer, encodings, *, pooling: str, batch_size: int, device: str) -> np.ndarray:
    """Final-layer hidden states, mean-pooled over real tokens or taken at the last token (RDS)."""
    import torch

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


def validation_lists(cfg) -> dict[str, tuple[str, list[str]]]:
    """The validation stores a gradient method reads: ``{role: (loss they hold, paths)}``, one
    path per checkpoint (``provenance`` checks them; the scorers read them)."""
    if not _is_variant(cfg):
        return {"validation": ("sft_chosen" if cfg.method == "less" else "pairwise", cfg.val_features)}
    ln = cfg.direction == "pairwise_ln"
    lists = {"pairwise": ("pairwise", [] if ln else cfg.val_features),
             "chosen": ("sft_chosen", cfg.val_chosen_features if ln or cfg.chosen_weight else []),
             "rejected": ("sft_rejected", cfg.val_rejected_features if ln else [])}
    return {role: lp for role, lp in lists.items() if lp[1]}


def _checked_inputs(cfg, pool, triples) -> None:
    """One store per checkpoint in every list, and every provenance check (``provenance.py``)."""
    lists = validation_lists(cfg)
    for role, (_, paths) in lists.items():
        if len(paths) != len(cfg.pool_features):
            raise ConfigError(f"{len(paths)} {role} validation stores for {len(cfg.pool_features)} pool stores "
                              "(one per checkpoint)")
    check_gradient_inputs(cfg, pool, triples, lists)


def _variant_result(cfg, w):
    """Scores with the validation vectors of a ROSE variant (``scoring.validation_directions``)."""

    n = len(cfg.pool_features)
    lists = {role: paths for role, (_, paths) in validation_lists(cfg).items()}
    stores = {k: [load_store_features(p) for p in lists[k]] if k in lists else None
              for k in ("pairwise", "chosen", "rejected")}
    first = next(s[0] for s in stores.values() if s)
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

    if not _is_variant(cfg):
        _need_features(cfg)
    elif not cfg.pool_features:
        raise ConfigError(f"method {cfg.method!r} needs pool_features (feature stores)")
    _checked_inputs(cfg, pool, triples)
    w = lr_weights(cfg, len(cfg.pool_features))
    if _is_variant(cfg):
        result, ids = _variant_result(cfg, w)
    else:
        result, ids = score_stores(cfg.pool_features, cfg.val_features, w, reduce=cfg.reduce, center=cfg.center)
    per_group, scores = result.per_group, result.scores
    if cfg.standardize:
        per_group = standardize_groups(per_group)
        scores = reduce_groups(per_group, cfg.reduce)
    extra = {"checkpoint_weights": w.tolist(), "direction": cfg.direction, "chosen_weight": cfg.chosen_weight,
             "center": cfg.center, "standardize": cfg.standardize, "balanced": cfg.balanced}
    return ScoreResult(scores, per_group, result.group_names, extra=extra)


def _require_dpo_scale(paths) -> None:
    """Influence sums unnormalised inner products, so each validation triple's DPO weight counts:
    refuse pairwise stores written with ``ref: auto`` (``pair_scale: unweighted``, weight left out)."""

    for p in paths:
        meta = Path(p) / "meta.json"
        scale = read_json(meta).get("settings", {}).get("pair_scale") if meta.exists() else None
        if scale == "unweighted":
            raise ConfigError(f"{p}: pairwise features made with ref: auto carry each triple's direction but "
                              "not DPO's per-triple weight (the reference forward was skipped; cosine scoring "
                              "does not need it). The influence baseline needs the true scale: featurize the "
                              "validation set again with ref: base")


def _scores_influence(cfg, pool, triples):

    _need_features(cfg)
    _checked_inputs(cfg, pool, triples)
    _require_dpo_scale(cfg.val_features)
    w = lr_weights(cfg, len(cfg.pool_features))
    total = np.zeros(len(pool))
    for wi, p, v in zip(w, cfg.pool_features, cfg.val_features):
        total += wi * B.influence_scores(load_store_features(p).features, load_store_features(v).features,
                                       damping=cfg.damping)
    return ScoreResult(total, extra={"checkpoint_weights": w.tolist(), "damping": cfg.damping})


def _scores_shapley(cfg, pool, triples):

    _need_features(cfg)
    _checked_inputs(cfg, pool, triples)
    w = lr_weights(cfg, len(cfg.pool_features))
    total = np.zeros(len(pool))
    for wi, p, v in zip(w, cfg.pool_features, cfg.val_features):
        total += wi * B.knn_shapley(load_store_features(p).features, load_store_features(v).features, k=cfg.knn_k)
    return ScoreResult(total, extra={"checkpoint_weights": w.tolist(), "k": cfg.knn_k})


def _scores_rds(cfg, pool, triples):

    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, dtype=cfg.model_dtype, device=device), load_tokenizer(cfg.model)
    if cfg.adapter:
        check_base_model(cfg.adapter, cfg.model, user="rose select (rds)")
        model = load_adapter(model, cfg.adapter, trainable=False)
    tcfg = cfg.tokenize
    pool_enc = [encode_record(r, tok, tcfg) for r in pool]
    val_enc = [encode_messages(list(t.prompt) + [Message("assistant", t.chosen)], tok, tcfg, record=t.id, pair=True)
               for t in triples]
    kw = dict(pooling=cfg.rds_pooling, batch_size=cfg.batch_size, device=device)
    pe, ve = representations(model, tok, pool_enc, **kw), representations(model, tok, val_enc, **kw)
    return ScoreResult(B.rds_scores(pe, ve, [t.subtask for t in triples], reduce=cfg.reduce),
                       extra={"pooling": cfg.rds_pooling})


def _scores_text(cfg, pool, triples):

    if cfg.method == "random":
        return ScoreResult(B.random_scores(len(pool), cfg.seed), extra={"seed": cfg.seed})
    pool_texts, val_texts = [B.record_text(r) for r in pool], [B.triple_text(t) for t in triples]
    if cfg.method == "bm25":
        return ScoreResult(B.bm25_scores(pool_texts, val_texts))
    return ScoreResult(B.dsir_scores(pool_texts, val_texts, seed=cfg.seed), extra={"seed": cfg.seed})


SCORERS = {"rose": _scores_gradient, "less": _scores_gradient, "influence": _scores_influence,
           "shapley": _scores_shapley, "rds": _scores_rds, "random": _scores_text,
           "bm25": _scores_text, "dsir": _scores_text, **{v: _scores_gradient for v in VARIANTS}}


