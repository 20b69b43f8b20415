"""Why a validation direction finds the target domain or not: the geometry of the planted-pool
benchmark's features (``rose experiment quality`` reports it per target, mean over seeds)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rose_select.select.scoring import load_store_features


def checkpoint_geometry(seed_dir, run, ckpt: str, truth, domain: str) -> dict | None:
    """``direction_geometry`` on one checkpoint's stores, when the pairwise and chosen stores exist."""

    val = run / "features" / ckpt
    if not (val / "val_pairwise" / "meta.json").exists() or not (val / "val_sft" / "meta.json").exists():
        return None
    feats = lambda p: np.asarray(load_store_features(p).features, np.float64)
    rejected = feats(val / "val_sft_rejected") if (val / "val_sft_rejected" / "meta.json").exists() else None
    return direction_geometry(feats(seed_dir / "features" / ckpt / "pool"), truth, domain,
                              pairwise=feats(val / "val_pairwise"), chosen=feats(val / "val_sft"), rejected=rejected)


def geometry_markdown(geometry: dict) -> str:
    """The geometry figures per target (mean over seeds), as a markdown table."""
    per_target: dict[str, list[dict]] = {}
    for by_target in geometry.values():
        for target, g in by_target.items():
            if g:
                per_target.setdefault(target, []).append(g)
    if not per_target:
        return ""
    keys = list(dict.fromkeys(k for gs in per_target.values() for g in gs for k in g))
    lines = ["| target | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for target, gs in per_target.items():
        lines.append(f"| {target} | " + " | ".join(
            f"{np.mean([g[k] for g in gs if k in g]):+.3f}" if any(k in g for g in gs) else "-" for k in keys) + " |")
    return ("\n\nGeometry of the last checkpoint's features (mean over seeds; see quality.direction_geometry):"
            "\n\n" + "\n".join(lines))

def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def direction_geometry(pool: np.ndarray, truth: Sequence, domain: str, *, pairwise: np.ndarray,
                       chosen: np.ndarray, rejected: np.ndarray | None = None) -> dict:
    """What each validation direction keeps of the target domain, measured on one checkpoint's
    features: ``pool`` ``[N, d]`` (Adam SFT), and per validation triple the ``pairwise`` (DPO),
    ``chosen`` and ``rejected`` (mean-token SFT) gradients.

    - ``pool_common``: mean cosine of a pool row with the pool's mean direction (a shared term);
    - ``cos_chosen_rejected``: mean cosine of a triple's chosen and rejected gradients;
    - per direction, the cosine of its mean unit vector with the centroid of the target's planted
      rows minus that with the centroid of the other rows (pool features centred first): how far
      the direction points at the target domain rather than elsewhere."""
    pool = np.asarray(pool, np.float64)
    unit_pool = _unit_rows(pool)
    common = float((unit_pool @ _unit_rows(unit_pool.mean(0, keepdims=True))[0]).mean())
    centred = _unit_rows(pool - pool.mean(0))
    in_domain = np.array([r.domain == domain for r in truth])
    target_c = _unit_rows(centred[in_domain].mean(0, keepdims=True))[0]
    other_c = _unit_rows(centred[~in_domain].mean(0, keepdims=True))[0]
    dirs = {"rose (pairwise, summed log-probs)": pairwise, "less (chosen answer)": chosen}
    out = {"pool_common": common}
    if rejected is not None:
        c, r = _unit_rows(np.asarray(chosen, np.float64)), _unit_rows(np.asarray(rejected, np.float64))
        out["cos_chosen_rejected"] = float(np.einsum("ij,ij->i", c, r).mean())
        dirs["length-normalised pairwise"] = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
        dirs["rejected answer"] = rejected
    for name, v in dirs.items():
        mean_dir = _unit_rows(_unit_rows(np.asarray(v, np.float64)).mean(0, keepdims=True))[0]
        out[f"domain signal: {name}"] = float(mean_dir @ target_c - mean_dir @ other_c)
    return out


# ---------------------------------------------------------------------------- length removed

# benchmark rows that score like a ROSE method with the pool's length directions projected out of
# the (unit, and for a centring method centred) pool features: label -> (method, directions)
LENGTH_REMOVED = {"rose_plus-len1": ("rose_plus", 1), "rose_plus-len4": ("rose_plus", 4), "rose-len1": ("rose", 1)}


def length_directions(x: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """``[k, d]``: the first ``k`` partial-least-squares directions of log answer length in the
    rows of ``x`` (centred first; NIPALS): the covariance direction of length with the features,
    then the same after the rows' scores on it are regressed out; orthonormal."""
    x = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
    y = np.log(np.maximum(np.asarray(lengths, np.float64), 1.0))
    y = y - y.mean()
    dirs = []
    for _ in range(k):
        u = x.T @ y
        u /= max(float(np.linalg.norm(u)), 1e-300)
        dirs.append(u)
        t = x @ u
        x = x - np.outer(t, x.T @ t / max(float(t @ t), 1e-300))
    return np.array(dirs).reshape(k, x.shape[1])


def remove_directions(x: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """``x`` with its component along every (orthonormal) row of ``dirs`` removed."""
    return x - (x @ dirs.T) @ dirs


def length_removed_scores(pool_stores: Sequence, val_stores: dict, summary: dict, lengths: np.ndarray,
                          k: int) -> np.ndarray:
    """A ROSE method's scores (its ``summary.json`` settings: direction, chosen weight, centring,
    checkpoint weights) with ``k`` length directions of each checkpoint's pool features removed.
    ``pool_stores``: per checkpoint the pool features; ``val_stores``: ``pairwise`` / ``chosen``
    per checkpoint lists of validation features, ``groups`` the validation subtasks."""
    from rose_select.select.scoring import normalize_rows, rose_scores, validation_directions

    settings = summary  # a selection's summary.json holds its method's settings at the top level
    pool = []
    for feats in pool_stores:
        x = np.asarray(feats, np.float64)
        x = normalize_rows(x - x.mean(0) if settings["center"] else x)[0]
        pool.append(remove_directions(x, length_directions(x, lengths, k)))
    vals = [validation_directions(settings["direction"], pairwise=val_stores["pairwise"][i],
                                  chosen=val_stores["chosen"][i] if val_stores.get("chosen") else None,
                                  chosen_weight=settings["chosen_weight"]) for i in range(len(pool))]
    return rose_scores(pool, vals, settings["checkpoint_weights"], val_stores["groups"], progress=False,
                       dtype=np.float64).scores
