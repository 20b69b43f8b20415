"""Stage ``featurize``: model + LoRA checkpoint + data + loss -> feature store.

Losses:

- ``sft``: per-example SFT loss (mean token cross-entropy over response tokens) of pool examples;
  Adam-preconditioned with the checkpoint's moments by default (LESS/ROSE training side).
- ``pairwise``: the DPO loss of each validation triple (ROSE validation side); no Adam.
- ``sft_chosen``: SFT loss of each triple's chosen answer (LESS validation side); no Adam.

``checkpoint`` is a warm-up checkpoint directory (peft adapter, plus ``optimizer_state.safetensors``
for Adam). Without one, a fresh LoRA adapter (``lora`` settings, peft's init: B = 0, so only the B
matrices have non-zero gradients) is attached: base-model features, for ablations.

Batches are formed once over all of this shard's rows (sorted by length, for little padding) and a
batch is computed whenever any of its rows is pending, so an interrupted and resumed run computes
exactly the batches, and therefore the bytes, of an uninterrupted one. Rows are written back at
their input positions. Features are taken in eval mode (no LoRA dropout).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rose_select.errors import ConfigError
from rose_select.modeling import LoraSettings

log = logging.getLogger(__name__)
LOSSES = ("sft", "pairwise", "sft_chosen")
FEATURIZE_VERSION = 1


@dataclass
class FeaturizeConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "base model (HF id, local dir or smollm2-135m)"})
    checkpoint: Optional[str] = field(default=None, metadata={"help": "LoRA checkpoint dir (adapter + optimizer state); none: a fresh adapter from `lora`"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: str = field(default="", metadata={"help": "data file (pool or preference triples)"})
    data_kind: str = field(default="auto", metadata={"help": "pool | preference | auto (pool for loss sft)"})
    data_format: str = field(default="auto", metadata={"help": "loader format (see data.py)"})
    limit: Optional[int] = field(default=None, metadata={"help": "use only the first N records"})
    loss: str = field(default="sft", metadata={"help": "sft | pairwise | sft_chosen"})
    adam: Optional[bool] = field(default=None, metadata={"help": "Adam-precondition (default: true for sft, must be false otherwise)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 of the preconditioning"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 of the preconditioning"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam eps (inside the square root)"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta (pairwise loss)"})
    ref: str = field(default="base", metadata={"help": "pairwise reference: base (adapters off) | self | <model path>"})
    projection: str = field(default="sjlt", metadata={"help": "none | rademacher | sjlt"})
    dim: int = field(default=8192, metadata={"help": "projection dimension (ignored for none)"})
    seed: int = field(default=0, metadata={"help": "projection seed (shared by both sides)"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward"})
    max_length: int = field(default=512, metadata={"help": "maximum tokens per sequence"})
    template: str = field(default="auto", metadata={"help": "auto | chat | less"})
    padding_side: str = field(default="right", metadata={"help": "left | right"})
    dtype: str = field(default="float16", metadata={"help": "storage dtype: float16 | float32"})
    model_dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 | bfloat16 | float16 | float64"})
    autocast: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA) | none | bfloat16 | float16"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    output: str = field(default="", metadata={"help": "feature store directory"})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.adam is None:
            self.adam = self.loss == "sft"
        if self.adam and self.loss != "sft":
            raise ConfigError(f"adam preconditioning applies to the sft (training-side) loss only, not {self.loss!r}")
        if self.adam and not self.checkpoint:
            raise ConfigError("adam=true needs a checkpoint with optimizer state; set checkpoint or adam=false")
        if self.data_kind == "auto":
            self.data_kind = "pool" if self.loss == "sft" else "preference"
        if self.data_kind not in ("pool", "preference"):
            raise ConfigError(f"data_kind must be pool|preference|auto, got {self.data_kind!r}")
        if (self.data_kind == "pool") != (self.loss == "sft"):
            raise ConfigError(f"loss {self.loss!r} needs data_kind "
                              f"{'pool' if self.loss == 'sft' else 'preference'}, got {self.data_kind!r}")
        if self.projection not in ("none", "rademacher", "sjlt"):
            raise ConfigError(f"projection must be none|rademacher|sjlt, got {self.projection!r}")
        if self.projection != "none" and self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be left|right, got {self.padding_side!r}")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be float16|float32, got {self.dtype!r}")
        if self.model_dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"model_dtype must be float32|bfloat16|float16|float64, got {self.model_dtype!r}")
        if self.autocast not in ("auto", "none", "bfloat16", "float16"):
            raise ConfigError(f"autocast must be auto|none|bfloat16|float16, got {self.autocast!r}")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1 or self.adam_eps <= 0:
            raise ConfigError("adam_beta1/adam_beta2 must lie in [0, 1) and adam_eps be > 0")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.data:
            raise ConfigError("data: a data file is required")
        if not self.output:
            raise ConfigError("output: a feature store directory is required")


# --------------------------------------------------------------------------- helpers

def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(cfg: FeaturizeConfig, device):
    import torch

    if cfg.autocast == "none" or device.type != "cuda":
        return None
    if cfg.autocast == "auto":
        return torch.bfloat16 if cfg.model_dtype == "float32" else None
    return getattr(torch, cfg.autocast)


def _load_items(cfg: FeaturizeConfig, tokenizer):
    """(ids, groups, encodings) where an encoding is a list of rows (1 row, or chosen+rejected)."""
    from rose_select import data
    from rose_select.tokenization import TokenizeConfig, encode_messages, encode_record, encode_triple
    from rose_select.records import Message

    tcfg = TokenizeConfig(max_length=cfg.max_length, template=cfg.template)
    if cfg.data_kind == "pool":
        recs = data.load_pool(cfg.data, format=cfg.data_format, limit=cfg.limit)
        return [r.id for r in recs], None, [[encode_record(r, tokenizer, tcfg)] for r in recs]
    triples = data.load_preferences(cfg.data, format=cfg.data_format)
    if cfg.limit is not None:
        triples = triples[: cfg.limit]
    ids, groups = [t.id for t in triples], [t.subtask for t in triples]
    if cfg.loss == "pairwise":
        encs = []
        for t in triples:
            e = encode_triple(t, tokenizer, tcfg)
            encs.append([e["chosen"], e["rejected"]])
    else:  # sft_chosen: the chosen answer as an SFT target (pair truncation, as on the pairwise side)
        encs = [[encode_messages(list(t.prompt) + [Message("assistant", t.chosen)], tokenizer, tcfg,
                                 record=f"{t.id} (chosen)", pair=True)] for t in triples]
    return ids, groups, encs


def _plan_batches(rows, encs, batch_size: int) -> list[list[int]]:
    """Deterministic batches over ``rows``: sorted by (longest sequence, index), then chunked."""
    order = sorted(rows, key=lambda i: (max(len(e["input_ids"]) for e in encs[i]), i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def settings_fingerprint(cfg: FeaturizeConfig, projector_fp: dict, adapter_sha: str | None,
                         data_sha: str) -> dict:
    import rose_select

    ckpt = str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None
    return {
        "stage": "featurize", "featurize_version": FEATURIZE_VERSION,
        "rose_select_version": getattr(rose_select, "__version__", "?"),
        "model": cfg.model, "model_dtype": cfg.model_dtype,
        "checkpoint": ckpt, "adapter_sha256": adapter_sha,
        "lora": None if cfg.checkpoint else {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                             "target_modules": list(cfg.lora.target_modules)},
        "data": str(Path(cfg.data).resolve()), "data_sha256": data_sha, "data_kind": cfg.data_kind,
        "data_format": cfg.data_format, "limit": cfg.limit,
        "loss": cfg.loss, "adam": cfg.adam,
        "adam_hparams": [cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps] if cfg.adam else None,
        "beta": cfg.beta if cfg.loss == "pairwise" else None,
        "ref": cfg.ref if cfg.loss == "pairwise" else None,
        "projection": projector_fp, "max_length": cfg.max_length, "template": cfg.template,
        "batch_size": cfg.batch_size, "padding_side": cfg.padding_side, "autocast": cfg.autocast,
    }


def _file_sha(path: str) -> str:
    from rose_select.io import sha256_file

    p = Path(path)
    return sha256_file(p) if p.is_file() else f"not-a-file:{path}"


# --------------------------------------------------------------------------- the stage

def run_featurize(cfg: FeaturizeConfig, *, shard: tuple[int, int] = (0, 1),
                  stop_after_batches: int | None = None) -> Path:
    """Compute (or resume) the feature store ``cfg.output``; returns its path.

    ``shard=(rank, world)``: this process computes rows ``rank::world``; rank 0 creates the store
    and finalizes it when every row is done (other ranks attach). ``stop_after_batches`` stops
    early without finalizing (tests, smoke runs)."""
    import torch
    from tqdm.auto import tqdm

    from rose_select import gradients as G
    from rose_select.modeling import attach_lora, load_adapter, load_model, load_tokenizer
    from rose_select.projection import make_projector
    from rose_select.store import FeatureStore
    from rose_select.tokenization import collate

    rank, world = shard
    if not 0 <= rank < world:
        raise ConfigError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    ids, groups, encs = _load_items(cfg, tokenizer)
    if not ids:
        raise ConfigError(f"{cfg.data}: no records to featurize")

    model = load_model(cfg.model, dtype=cfg.model_dtype, device=str(device))
    adapter_sha = None
    if cfg.checkpoint:
        model = load_adapter(model, cfg.checkpoint, trainable=True)
        sft = Path(cfg.checkpoint) / "adapter_model.safetensors"
        adapter_sha = _file_sha(str(sft))
    else:
        model = attach_lora(model, cfg.lora)
    model = model.to(device).eval()
    for p in model.parameters():  # only LoRA parameters take gradients
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(True)

    numels = dict(G.param_numels(model))
    projector = make_projector(cfg.projection, 0 if cfg.projection == "none" else cfg.dim, cfg.seed,
                               numels, device=device)
    settings = settings_fingerprint(cfg, projector.fingerprint(), adapter_sha, _file_sha(cfg.data))
    store_kw = dict(n_rows=len(ids), dim=projector.dim, dtype=cfg.dtype, settings=settings, row_ids=ids)
    if rank == 0:
        store = FeatureStore.open(cfg.output, row_groups=groups, **store_kw)
    else:
        store = FeatureStore.attach(cfg.output, **store_kw)

    adam = None
    if cfg.adam:
        adam = G.load_adam_state(cfg.checkpoint, model, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2,
                                 eps=cfg.adam_eps, device=device)
    if cfg.loss == "pairwise":
        ref = cfg.ref
        if ref not in ("base", "self"):
            ref = load_model(cfg.ref, dtype=cfg.model_dtype, device=str(device)).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
        loss_fn = G.pairwise_loss_fn(cfg.beta, ref)
    else:
        loss_fn = G.sft_loss_fn
    amp = autocast_dtype(cfg, device)

    pending = set(store.pending().tolist())
    mine = list(range(rank, len(ids), world))
    batches = [b for b in _plan_batches(mine, encs, cfg.batch_size) if any(i in pending for i in b)]
    n_todo = sum(1 for b in batches for i in b if i in pending)
    pad_id = tokenizer.pad_token_id
    bar = tqdm(total=n_todo, desc=f"featurize {Path(cfg.output).name}", unit="ex",
               disable=os.environ.get("ROSE_NO_PROGRESS") == "1", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for k, batch_rows in enumerate(batches):
            if stop_after_batches is not None and k >= stop_after_batches:
                return Path(cfg.output)
            seqs = [e for i in batch_rows for e in encs[i][:1]]
            row_to_item = None
            if cfg.loss == "pairwise":
                seqs += [encs[i][1] for i in batch_rows]
                row_to_item = G.pair_row_to_item(len(batch_rows), device)
            batch = {k2: v.to(device) for k2, v in collate(seqs, pad_id, cfg.padding_side).items()}
            feats = G.per_example_features(model, batch, loss_fn, projector, row_to_item=row_to_item,
                                           n_items=len(batch_rows), item_ids=[ids[i] for i in batch_rows],
                                           adam=adam, autocast_dtype=amp)
            keep = [j for j, i in enumerate(batch_rows) if i in pending]
            store.write([batch_rows[j] for j in keep], feats[keep].float().cpu().numpy())
            bar.update(len(keep))
    finally:
        bar.close()
    if n_todo:
        log.info("featurized %d rows in %.1fs", n_todo, time.perf_counter() - t0)
    if rank == 0 and world == 1:
        store.finalize()
    elif rank == 0 and store.pending().size == 0:
        store.finalize()
    return Path(cfg.output)
