"""Do the selection's inputs belong together? Every check ``rose select`` makes before it scores.

Each input is valid on its own; these checks refuse (``IncompatibleError``, naming the key and
both sides) a combination that was never made together:

- each pool store was featurized from the ``--pool`` file (by content) and lists its records;
- each validation store was featurized from the ``--validation`` file (by content) with the subtask
  layout select reads it with (``num_subtasks``/``subtasks``): the same triples in the same groups;
- pool and validation stores pair checkpoint by checkpoint, in the order given: same model
  content, adapter (by content), LoRA settings, tokenisation and projection (``compat``);
- the validation stores of a variant (pairwise, chosen-answer, rejected-answer) hold the same
  triples from the same file, checkpoint and projection;
- each store holds the loss its list is for (pool: ``sft``; rose: ``pairwise``; less: ``sft_chosen``);
- with ``--warmup-dir``: the stores were featurized at that warm-up's checkpoints (adapters by
  content), in its order when its learning rates weight them;
- ``--compare``: the selections compared were drawn from one pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rose_select.checkpoint import adapter_sha256, read_warmup_checkpoints
from rose_select.compat import PAIRED_STORE_KEYS, SAME_TRIPLES_KEYS, require_same, show
from rose_select.data import subtask_counts
from rose_select.errors import IncompatibleError
from rose_select.features.store import open_features
from rose_select.io import read_json, sha256_file


@dataclass
class Store:
    """A store's fingerprint: its path, the role it plays, its settings and its rows."""

    path: str
    role: str
    settings: dict
    ids: list
    groups: list | None

    @property
    def side(self) -> tuple[str, dict]:
        return f"the {self.role} store {self.path}", self.settings


def read_store(path: str, role: str) -> Store:
    _, meta, rows = open_features(path)
    groups = rows.get("groups")
    return Store(str(path), role, meta.get("settings") or {}, [str(i) for i in rows["ids"]],
                 None if groups is None else [str(g) for g in groups])


def check_loss(store: Store, loss: str) -> None:
    require_same(f"{store.path} and its place in the selection", store.side,
                 (f"the {store.role} stores of this method", {"loss": loss}), ["loss"],
                 hint=f"give {store.role} stores featurized with loss {loss}")


def check_pool_store(store: Store, pool_path: str, pool_sha: str, pool_ids: list[str]) -> None:
    """Made from the ``--pool`` file's content, listing its records in order."""
    require_same(f"the pool store {store.path} and the --pool file {pool_path}", store.side,
                 (f"--pool {pool_path}", {"data_sha256": pool_sha}), ["data_sha256"],
                 hint="featurize the pool file you select from (or select from the file the store was made of)")
    _same_rows(store, "the --pool file", pool_ids, None)


def check_validation_store(store: Store, val_path: str, val_sha: str, triples) -> None:
    """Made from the ``--validation`` file's content, with the subtask layout select uses."""
    groups = [t.subtask for t in triples]
    layout = {"data_sha256": val_sha, "subtask_layout": subtask_counts(groups)}
    mine = {**store.settings, "subtask_layout": subtask_counts(store.groups or [])}
    require_same(f"the {store.role} store {store.path} and the --validation file {val_path}",
                 (f"the store {store.path}", mine), ("select's reading of --validation", layout),
                 ["data_sha256", "subtask_layout"],
                 hint="featurize the validation file again with the num_subtasks/subtasks select uses")
    _same_rows(store, "select's reading of --validation", [t.id for t in triples], groups)


def _same_rows(store: Store, other: str, ids: list[str], groups: list[str] | None) -> None:
    for key, mine, theirs in (("ids", store.ids, ids), ("groups", store.groups, groups)):
        if theirs is None or mine == theirs:
            continue
        if len(mine or []) != len(theirs):
            raise IncompatibleError(f"rows.{key}: the store {store.path} has {len(mine or [])} rows, "
                                    f"{other} has {len(theirs)}; featurize that file again")
        i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        raise IncompatibleError(f"rows.{key}[{i}]: the store {store.path} has {show(mine[i])}, {other} has "
                                f"{show(theirs[i])}; featurize that file again")


def check_pairs(pools: list[Store], vals: list[Store]) -> None:
    """Pool and validation stores of each checkpoint: one model, adapter, tokenisation, projection."""
    for i, (p, v) in enumerate(zip(pools, vals), start=1):
        require_same(f"checkpoint {i}: the pool store {p.path} and the {v.role} store {v.path}", p.side, v.side,
                     PAIRED_STORE_KEYS, hint="featurize both at the same checkpoint with the same model, "
                                             "LoRA, tokenisation and projection (kind, dim, seed)")


def check_same_triples(first: list[Store], other: list[Store]) -> None:
    """Validation stores combined into one direction: same file, triples, checkpoint, projection."""
    for i, (a, b) in enumerate(zip(first, other), start=1):
        require_same(f"checkpoint {i}: the {a.role} store {a.path} and the {b.role} store {b.path}", a.side,
                     b.side, SAME_TRIPLES_KEYS, hint="featurize every validation store of a checkpoint from "
                                                     "the same file, checkpoint and projection")
        _same_rows(b, f"the {a.role} store {a.path}", a.ids, a.groups)


def check_warmup(pools: list[Store], warmup_dir: str, ordered: bool) -> None:
    """The stores' checkpoints are the warm-up's (adapters by content); in its order when its
    learning rates weight them (``ordered``), else each one of them (explicit weights)."""
    ckpts = [(path, adapter_sha256(path)) for _, path, _ in read_warmup_checkpoints(warmup_dir)]
    if ordered:
        for i, (store, (path, sha)) in enumerate(zip(pools, ckpts), start=1):
            require_same(f"checkpoint {i}: the pool store {store.path} and the warm-up {warmup_dir}", store.side,
                         (f"{Path(path).name} of the warm-up", {"adapter_sha256": sha}), ["adapter_sha256"],
                         hint="give the warm-up whose checkpoints made the stores (in epoch order), or "
                              "checkpoint_weights for other checkpoints")
        return
    known = {sha: path for path, sha in ckpts}
    for store in pools:
        if store.settings.get("adapter_sha256") not in known:
            raise IncompatibleError(
                f"adapter_sha256: the pool store {store.path} was featurized at {store.settings.get('checkpoint')} "
                f"({show(store.settings.get('adapter_sha256'))}), which is none of the checkpoints of the warm-up "
                f"{warmup_dir} ({', '.join(Path(p).name for p, _ in ckpts)}); give the warm-up that made the stores")


def check_gradient_inputs(cfg, pool, triples, lists: dict[str, tuple[str, list[str]]]) -> None:
    """Every check above, for a gradient method: ``lists`` maps each validation role to the loss
    its stores must hold and their paths (one per checkpoint, as ``cfg.pool_features``)."""
    pools = [read_store(p, "pool") for p in cfg.pool_features]
    pool_sha, pool_ids = sha256_file(cfg.pool), [r.id for r in pool]
    for s in pools:
        check_loss(s, "sft")
        check_pool_store(s, cfg.pool, pool_sha, pool_ids)
    val_sha, first = sha256_file(cfg.validation), None
    for role, (loss, paths) in lists.items():
        vals = [read_store(p, role) for p in paths]
        for v in vals:
            check_loss(v, loss)
            check_validation_store(v, cfg.validation, val_sha, triples)
        check_pairs(pools, vals)
        if first is None:
            first = vals
        else:
            check_same_triples(first, vals)
    if cfg.warmup_dir:
        check_warmup(pools, cfg.warmup_dir, ordered=not cfg.checkpoint_weights)


def check_same_pool(dirs: dict[str, str]) -> None:
    """Selections compared (``--compare``: overlap, shares by another selection's subtasks) must be
    drawn from one pool (its sha256 and record limit, from each ``config.json``)."""
    sides = [(f"the selection {path}", _pool_of(Path(path))) for path in dirs.values()
             if (Path(path) / "config.json").is_file()]
    for side in sides[1:]:
        require_same("selections compared", sides[0], side, ["pool_sha256", "pool_limit"],
                     hint="compare selections of the same pool")


def _pool_of(selection: Path) -> dict:
    fp = read_json(selection / "config.json")
    return {"pool_sha256": fp.get("inputs", {}).get("pool_sha256"), "pool_limit": fp.get("config", {}).get("pool_limit")}
