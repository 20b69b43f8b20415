"""Stage ``featurize``: model + LoRA checkpoint + data + loss -> feature store.

Losses:

- ``sft``: per-example SFT loss (mean token cross-entropy over response tokens) of pool examples;
  Adam-preconditioned with the checkpoint's moments by default (LESS/ROSE training side).
- ``pairwise``: the DPO loss of each validation triple (ROSE validation side); no Adam.
- ``sft_chosen``: SFT loss of each triple's chosen answer (LESS validation side); no Adam.
- ``sft_rejected``: the same for the rejected answer. With ``sft_chosen`` it gives the
  length-normalised pairwise direction ``sft_chosen - sft_rejected`` (``rose select --direction
  pairwise_ln``); the pairwise loss direction itself uses summed log-probabilities.

``chosen_output`` (loss ``pairwise``): also write the ``sft_chosen`` features of the same triples
into a second store, from the same forward/backward pass (``joint.py``). ``ref: auto`` skips the
pairwise reference forward; its store records ``pair_scale: unweighted`` (see ``joint.py``).

``checkpoint`` is a warm-up checkpoint directory (peft adapter, plus ``optimizer_state.safetensors``
for Adam). Without one, a fresh LoRA adapter (``lora`` settings, peft's init: B = 0, so only the B
matrices have non-zero gradients) is attached: base-model features, for ablations.

Batches are planned once over all rows (sorted by length, for little padding), whatever the
number of processes, and a batch is computed whenever any of its rows is pending, so an
interrupted and resumed run, or a run in 1, 2 or N processes, computes exactly the batches, and
therefore the bytes, of an uninterrupted single-process one (on CPU: at the same number of threads
per process; the intra-op thread count can change the last bits of some rows). Rows are written
back at their input positions. Features are taken in eval mode (no LoRA dropout).

Several processes (``torchrun ... -m rose_select featurize`` or ``rose featurize --nproc N``):
whole batches are dealt to ranks round-robin and rank 0 writes every row (``distributed.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rose_select import data, distributed as D
from rose_select.checkpoint import check_base_model
from rose_select.config import from_args, require
from rose_select.errors import ConfigError, DataError, NonFiniteError
from rose_select.features import gradients as G, sink
from rose_select.features.joint import REFS, joint_features, load_reference, pair_scale
from rose_select.features.projection import make_projector
from rose_select.features.sink import outputs
from rose_select.features.store import settings_identity
from rose_select.io import sha256_file, sha256_json
from rose_select.losses import DpoSettings
from rose_select.modeling import (
    LoraSettings,
    ModelSettings,
    attach_lora,
    load_adapter,
    load_model,
    load_tokenizer,
    model_identity,
)
from rose_select.records import Message
from rose_select.runtime import progress_disabled, resolve_device
from rose_select.tokenization import TokenizeConfig, collate, encode_messages, encode_record, encode_triple

log = logging.getLogger(__name__)
LOSSES = ("sft", "pairwise", "sft_chosen", "sft_rejected")
FEATURIZE_VERSION = 3  # 2: one global batch plan; a fresh adapter is seeded; 3: model by content

STORE_DTYPES = ("float16", "float32")


@dataclass
class FeatureSettings:
    """How features are computed and stored, whatever the data: the ``featurize`` section of a run."""

    projection: str = field(default="sjlt", metadata={"help": "none | rademacher | sjlt"})
    dim: int = field(default=8192, metadata={"help": "projection dimension (ignored for none)"})
    seed: int = field(default=0, metadata={"help": "projection seed (shared by both sides); also seeds a fresh adapter"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward (with auto_batch: on the CPU)"})
    auto_batch: str = field(default="cuda", metadata={"help": "cuda: on a CUDA device, the largest batch `rose plan` fits into its free memory (10% margin) | always | never (batch_size)"})
    store_dtype: str = field(default="float16", metadata={"help": "feature storage dtype: float16 | float32"})
    autocast: str = field(default="auto", metadata={"help": "auto (none: the faithful ranking, on every device) | none | bfloat16 | float16"})
    padding_side: str = field(default="right", metadata={"help": "left | right"})
    ref: str = field(default="auto", metadata={"help": "pairwise reference: auto (skipped: enough for cosine scoring, rose/shapley) | base (adapters off: the true DPO scale, for influence) | self | <model path>"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 of the preconditioning"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 of the preconditioning"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam eps (inside the square root)"})

    RENAMED = {"dtype": "store_dtype"}

    def __post_init__(self):
        checks = [
            (self.projection in ("none", "rademacher", "sjlt"), f"projection must be none|rademacher|sjlt, got {self.projection!r}"),
            (self.projection == "none" or self.dim >= 1, f"dim must be >= 1, got {self.dim}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.auto_batch in ("cuda", "always", "never"), f"auto_batch must be cuda|always|never, got {self.auto_batch!r}"),
            (self.padding_side in ("left", "right"), f"padding_side must be left|right, got {self.padding_side!r}"),
            (self.store_dtype in STORE_DTYPES, f"store_dtype must be float16|float32, got {self.store_dtype!r}"),
            (self.autocast in ("auto", "none", "bfloat16", "float16"), f"autocast must be auto|none|bfloat16|float16, got {self.autocast!r}"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0,
             "adam_beta1/adam_beta2 must lie in [0, 1) and adam_eps be > 0"),
        ]
        require(checks)
        getattr(super(), "__post_init__", lambda: None)()


@dataclass
class FeaturizeConfig(ModelSettings, FeatureSettings, data.SubtaskSettings, DpoSettings):
    """One feature store: a model (+ checkpoint), a data file and a loss. A preference file is
    split into subtasks by the ``SubtaskSettings`` (``num_subtasks``/``subtasks``), the same
    settings select reads it with; the store records the layout (the subtask of every
    row: ``rows.json`` groups) and select refuses a store whose layout is not its own."""

    checkpoint: Optional[str] = field(default=None, metadata={"help": "LoRA checkpoint dir (adapter + optimizer state); none: a fresh adapter from `lora`"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    data: str = field(default="", metadata={"help": "data file (pool or preference triples)"})
    data_kind: str = field(default="auto", metadata={"help": "pool | preference | auto (pool for loss sft)"})
    data_format: str = field(default="auto", metadata={"help": "loader format (see rose_select.data)"})
    limit: Optional[int] = field(default=None, metadata={"help": "use only the first N records"})
    loss: str = field(default="sft", metadata={"help": "sft | pairwise | sft_chosen | sft_rejected"})
    adam: Optional[bool] = field(default=None, metadata={"help": "Adam-precondition (default: true for sft, must be false otherwise)"})
    chosen_output: Optional[str] = field(default=None, metadata={"help": "loss pairwise: also write the chosen answers' sft_chosen features (LESS) to this store, from the same pass"})
    output: str = field(default="", metadata={"help": "feature store directory"})

    RENAMED = {**FeatureSettings.RENAMED, "max_length": "tokenize.max_length",
               "template": "tokenize.template", "truncation": "tokenize.truncation"}

    def __post_init__(self):
        super().__post_init__()
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
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if not self.data:
            raise ConfigError("data: a data file is required")
        if not self.output:
            raise ConfigError("output: a feature store directory is required")
        if self.chosen_output and self.loss != "pairwise":
            raise ConfigError(f"chosen_output comes from the pairwise pass: it needs loss pairwise, not {self.loss!r}")
        if self.chosen_output and Path(self.chosen_output).resolve() == Path(self.output).resolve():
            raise ConfigError(f"chosen_output and output are the same directory ({self.output})")

# --------------------------------------------------------------------------- helpers


def autocast_dtype(cfg: FeaturizeConfig, device):
    """The autocast dtype of the forward pass: ``auto`` is none on every device. bf16 autocast
    kept ROSE scores at Spearman 0.961 against float32 (and bf16 weights at 0.990; README, "bf16
    on this CPU"), short of the 0.995 a default must keep, so speed is asked for explicitly. An
    explicit ``bfloat16``/``float16`` is honoured on any device (CPU autocast runs the matrix
    products in bf16, AVX-512 BF16/AMX where the CPU has them)."""
    import torch

    if cfg.autocast in ("none", "auto"):
        return None
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"autocast {cfg.autocast} is supported on cuda and cpu, not {device.type}; "
                          "use autocast: none")
    return getattr(torch, cfg.autocast)


PRECISION_FIDELITY = "precision_fidelity.json"  # assets/: written by bench/bf16_fidelity.py


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def measured_fidelity(mode: str, store_dtype: str) -> dict:
    """What bench/bf16_fidelity.py measured for this precision against the float32 path (README,
    "bf16 that keeps the ranking"): the worst seed's Spearman of ROSE scores and top-5%/10%
    overlap, for the computation and for the storage format; None where it was not measured."""
    import json

    from rose_select.data.builtin import asset_path

    table = json.loads(asset_path(PRECISION_FIDELITY).read_text())
    exact = {"exact": True}
    return {"source": table["source"], "compute": exact if mode == "float32" else table["modes"].get(mode),
            "store": exact if store_dtype == "float32" else table["modes"].get(f"{store_dtype}_store")}


def precision_record(job: "_Job") -> dict:
    """The precision a store was computed in (``meta.json``: ``precision``) and its measured
    fidelity: a store says how far its ranking may stand from the exact path's."""
    weights = _dtype_name(job.model.get_input_embeddings().weight.dtype)
    adapter = next((_dtype_name(p.dtype) for p in job.model.parameters() if p.requires_grad), None)
    autocast = _dtype_name(job.amp)
    mode = {("float32", None): "float32", ("bfloat16", None): "bf16_weights",
            ("float32", "bfloat16"): "bf16_autocast"}.get((weights, autocast), "unmeasured")
    return {"base_weights": weights, "adapter": adapter, "autocast": autocast, "projection": "float32",
            "store": job.store_dtype, "mode": mode, "fidelity": measured_fidelity(mode, job.store_dtype)}


def _in_file(err: DataError, path: str) -> DataError:
    """The same problem, with the data file named (tokenisation knows only the record)."""
    if err.path is not None:
        return err
    return DataError(err.problem, path=path, line=err.line, record=err.record, field=err.field)


def _encode_all(items, encode, path: str) -> list:
    try:
        return [encode(item) for item in items]
    except DataError as e:
        raise _in_file(e, path) from None


def _load_items(cfg: FeaturizeConfig, tokenizer):
    """(ids, groups, encodings) where an encoding is a list of rows (1 row, or chosen+rejected)."""

    tcfg = cfg.tokenize
    if cfg.data_kind == "pool":
        recs = data.load_pool(cfg.data, format=cfg.data_format, limit=cfg.limit)
        return [r.id for r in recs], None, _encode_all(recs, lambda r: [encode_record(r, tokenizer, tcfg)], cfg.data)
    triples = data.load_preferences(cfg.data, format=cfg.data_format, **cfg.subtask_kwargs())
    if cfg.limit is not None:
        triples = triples[: cfg.limit]
    ids, groups = [t.id for t in triples], [t.subtask for t in triples]
    if cfg.loss == "pairwise":
        def encode(t):
            e = encode_triple(t, tokenizer, tcfg)
            return [e["chosen"], e["rejected"]]
    else:  # sft_chosen / sft_rejected: one answer as an SFT target (pair truncation, as on the pairwise side)
        side = "chosen" if cfg.loss == "sft_chosen" else "rejected"

        def encode(t):
            return [encode_messages(list(t.prompt) + [Message("assistant", getattr(t, side))], tokenizer, tcfg,
                                    record=f"{t.id} ({side})", pair=True)]
    return ids, groups, _encode_all(triples, encode, cfg.data)


def plan_batches(encs, batch_size: int) -> list[list[int]]:
    """Batches over every row, whatever the number of processes: rows sorted by (longest
    sequence, index), then chunked. A row's features depend on its batch (padding width), so one
    global plan is what makes 1, 2 or N processes, and resumed runs, write the same bytes."""
    order = sorted(range(len(encs)), key=lambda i: (max(len(e["input_ids"]) for e in encs[i]), i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def plan_rounds(batches: list[list[int]], world: int) -> list[list[list[int]]]:
    """Whole batches dealt round-robin: round ``k`` gives batch ``k * world + r`` to rank ``r``."""
    return [batches[k:k + world] for k in range(0, len(batches), world)]


def settings_fingerprint(cfg: FeaturizeConfig, projector_fp: dict, adapter_sha: str | None,
                         data_sha: str) -> dict:
    import rose_select

    ckpt = str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None
    return {
        "stage": "featurize", "featurize_version": FEATURIZE_VERSION,
        "rose_select_version": getattr(rose_select, "__version__", "?"),
        "model": model_identity(cfg.model), "model_dtype": cfg.model_dtype,  # by content, not path
        "checkpoint": ckpt, "adapter_sha256": adapter_sha,  # and the Adam moments, by content:
        "optimizer_sha256": _file_sha(str(Path(cfg.checkpoint) / "optimizer_state.safetensors")) if cfg.adam else None,
        "lora": None if cfg.checkpoint else {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                             "target_modules": list(cfg.lora.target_modules),
                                             "init_seed": cfg.seed},
        "data": str(Path(cfg.data).resolve()), "data_sha256": data_sha, "data_kind": cfg.data_kind,
        "data_format": cfg.data_format, "limit": cfg.limit,
        "loss": cfg.loss, "adam": cfg.adam,
        "adam_hparams": [cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps] if cfg.adam else None,
        "beta": cfg.beta if cfg.loss == "pairwise" else None,
        "ref": (cfg.ref if cfg.ref in REFS else model_identity(cfg.ref)) if cfg.loss == "pairwise" else None,
        **({"pair_scale": pair_scale(cfg.ref)} if cfg.loss == "pairwise" else {}),
        "projection": projector_fp, "max_length": cfg.tokenize.max_length, "template": cfg.tokenize.template,
        "truncation": cfg.tokenize.truncation, "batch_size": cfg.batch_size, "padding_side": cfg.padding_side,
        "autocast": cfg.autocast,
    }


def _settings_token(settings: dict) -> int:
    """63-bit hash of the settings, local paths left out (nodes may mount data elsewhere)."""

    return int(sha256_json(settings_identity(settings))[:15], 16)


def _file_sha(path: str) -> str:

    p = Path(path)
    return sha256_file(p) if p.is_file() else f"not-a-file:{path}"

# --------------------------------------------------------------------------- preparing a job


@dataclass
class _Job:
    """Everything a batch needs, loaded and checked before any output exists."""

    ids: list
    groups: Optional[list]
    encs: list
    model: object
    projector: object
    settings: dict
    adam: object
    loss_fn: object
    amp: object
    pad_id: int
    device: object
    outputs: list  # sink.Output per store: one, or pairwise + chosen for the joint pass
    store_dtype: str
    ref: object = None  # the joint pass's reference ("auto", "base", "self" or a model)


def _load_lora_model(cfg: FeaturizeConfig, device):
    """The base model with the checkpoint's adapter (or a fresh one, seeded by ``cfg.seed``);
    only LoRA parameters take gradients. Returns (model, adapter sha256 or None)."""
    import torch

    model = load_model(cfg.model, dtype=cfg.model_dtype, device=str(device))
    adapter_sha = None
    if cfg.checkpoint:
        check_base_model(cfg.checkpoint, cfg.model, user="rose featurize")
        model = load_adapter(model, cfg.checkpoint, trainable=True)
        adapter_sha = _file_sha(str(Path(cfg.checkpoint) / "adapter_model.safetensors"))
    else:  # peft draws lora_A at random: seed it, or features would differ run to run
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            model = attach_lora(model, cfg.lora)
    model = model.to(device).eval()
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return model, adapter_sha


def resolve_batch_size(cfg: FeaturizeConfig, model, encs, device) -> int:
    """The batch size of this job: ``batch_size``, or (``auto_batch``) the largest batch the plan
    of this model's featurization step fits into the device's free memory with a 10% margin
    (``plan.fitting_batch``); a store being resumed keeps the batch it was started with."""
    import json

    if cfg.auto_batch == "never" or (cfg.auto_batch == "cuda" and device.type != "cuda"):
        return cfg.batch_size  # a store started with another batch is refused, naming it
    meta = Path(cfg.output) / "meta.json"
    if meta.is_file():
        started = json.loads(meta.read_text()).get("settings", {}).get("batch_size")
        if isinstance(started, int):
            return started
    from rose_select.plan import fitting_batch, free_device_bytes

    longest = max(len(e["input_ids"]) for enc in encs for e in enc)
    size = max(1, fitting_batch(cfg, model, longest, free_device_bytes(device)))
    log.info("featurize: auto batch size %d (longest sequence %d tokens)", size, longest)
    return size


def _prepare(cfg: FeaturizeConfig, device) -> _Job:

    tokenizer = load_tokenizer(cfg.model)
    ids, groups, encs = _load_items(cfg, tokenizer)
    if not ids:
        raise ConfigError(f"{cfg.data}: no records to featurize")
    model, adapter_sha = _load_lora_model(cfg, device)
    cfg.batch_size = resolve_batch_size(cfg, model, encs, device)  # fixed from here on (and recorded)
    projector = make_projector(cfg.projection, 0 if cfg.projection == "none" else cfg.dim, cfg.seed,
                               dict(G.param_numels(model)), device=device)
    adam = None
    if cfg.adam:
        adam = G.load_adam_state(cfg.checkpoint, model, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2,
                                 eps=cfg.adam_eps, device=device)
    settings = settings_fingerprint(cfg, projector.fingerprint(), adapter_sha, _file_sha(cfg.data))
    ref = load_reference(cfg.ref, cfg.model_dtype, device) if cfg.loss == "pairwise" else None
    loss_fn = G.pairwise_loss_fn(cfg.beta, ref) if cfg.loss == "pairwise" else G.sft_loss_fn
    return _Job(ids, groups, encs, model, projector, settings, adam, loss_fn, autocast_dtype(cfg, device),
                tokenizer.pad_token_id, device, outputs(cfg.output, cfg.chosen_output, settings), cfg.store_dtype, ref)

# --------------------------------------------------------------------------- batches


def _collated(cfg: FeaturizeConfig, job: _Job, rows: list[int], part: list[int]) -> dict:
    """The tensors of the items at positions ``part`` of batch ``rows``, padded as the whole
    batch is (a split batch computes the bytes of the whole one)."""
    seqs = [job.encs[i][0] for i in rows]
    if cfg.loss == "pairwise":
        seqs += [job.encs[i][1] for i in rows]
        part = part + [len(rows) + p for p in part]
    batch = collate(seqs, job.pad_id, cfg.padding_side)
    return {k: v[part].to(job.device) for k, v in batch.items()}


def _batch_features(cfg: FeaturizeConfig, job: _Job, rows: list[int], part: list[int] | None = None):
    """``[len(part), k * dim]`` float32 features of the items ``part`` (default: all) of one
    batch (k outputs), on the job's device."""

    part = list(range(len(rows))) if part is None else part
    batch = _collated(cfg, job, rows, part)
    row_to_item = G.pair_row_to_item(len(part), job.device) if cfg.loss == "pairwise" else None
    item_ids = [job.ids[rows[p]] for p in part]
    try:
        if len(job.outputs) == 2:
            return joint_features(job.model, batch, job.projector, ref=job.ref, beta=cfg.beta,
                                  item_ids=item_ids, autocast_dtype=job.amp).float()
        feats = G.per_example_features(job.model, batch, job.loss_fn, job.projector, row_to_item=row_to_item,
                                       n_items=len(part), item_ids=item_ids, adam=job.adam, autocast_dtype=job.amp)
    except NonFiniteError as e:
        raise NonFiniteError(f"{cfg.data}: {e}; nothing of this batch was written. Check the model "
                             f"({cfg.model}) and checkpoint ({cfg.checkpoint}) for NaN/inf weights") from None
    return feats.float()


def _features_or_split(cfg: FeaturizeConfig, job: _Job, rows: list[int], part: list[int] | None = None):
    """``_batch_features``; a part that runs out of device memory is split in two and each half
    retried (padded as the whole batch), never skipped; the log says so. A single item that does
    not fit is an error."""
    import torch

    part = list(range(len(rows))) if part is None else part
    try:
        return _batch_features(cfg, job, rows, part)
    except torch.OutOfMemoryError:
        if len(part) == 1:
            raise ConfigError(f"{cfg.data}: one item ({job.ids[rows[part[0]]]}) does not fit in the device's "
                              f"memory; lower tokenize.max_length or use a larger device") from None
    if job.device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(part) // 2
    log.warning("featurize: out of memory on %d items of a batch of %d (first %s); retrying them as %d + %d",
                len(part), len(rows), job.ids[rows[part[0]]], half, len(part) - half)
    return torch.cat([_features_or_split(cfg, job, rows, part[:half]),
                      _features_or_split(cfg, job, rows, part[half:])])


def _round(cfg: FeaturizeConfig, job: _Job, d, stores, round_, done) -> tuple[list, int]:
    """One round: every rank computes its batch (if it has one), rank 0 writes them all; a
    failure anywhere stops every rank. Returns (stores, rows written)."""

    mine = round_[d.rank] if d.rank < len(round_) else None
    feats, err = D.attempt(lambda: _features_or_split(cfg, job, mine)) if mine else (None, None)
    D.agree(d, err)
    got = D.gather_features(d, feats, cfg.batch_size, job.projector.dim * len(job.outputs))
    if not d.is_main:
        D.agree(d, None)  # learns whether rank 0's write failed
        return stores, 0
    outcome, err = D.attempt(lambda: sink.write_round(job, stores, round_, got, done))
    D.agree(d, err)
    return outcome


def _run_rounds(cfg: FeaturizeConfig, job: _Job, d, stores, rounds, done, stop_after: int | None):
    """All rounds, with a progress bar on rank 0. Returns (stores, finished)."""
    from tqdm.auto import tqdm

    todo = sum(1 for r in rounds for b in r for i in b if not done[i])
    bar = tqdm(total=todo, desc=f"featurize {Path(cfg.output).name}", unit="ex", dynamic_ncols=True,
               disable=progress_disabled() or not d.is_main)
    try:
        for k, round_ in enumerate(rounds):
            if stop_after is not None and k >= stop_after:
                return stores, False
            stores, written = _round(cfg, job, d, stores, round_, done)
            bar.update(written)
    finally:
        bar.close()
    return stores, True

# --------------------------------------------------------------------------- the stage


def run_featurize(cfg: FeaturizeConfig, *, stop_after_batches: int | None = None,
                  stats: dict | None = None) -> Path:
    """Compute (or resume) the feature store ``cfg.output`` (and ``cfg.chosen_output``); returns
    the path of ``cfg.output``.

    Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) every process calls this; they
    split the batches and rank 0 writes the store. The store is created only once the first
    batch has features, after inputs, model and checkpoint were all loaded and checked.
    ``stop_after_batches`` stops after that many rounds without finalizing (tests, smoke runs).
    ``stats``, if given, receives ``batches`` and ``seconds`` of this process's batch loop
    (benchmarks)."""

    _, world, local_rank = D.env_ranks()
    device = resolve_device(cfg.device, local_rank if world > 1 else None)
    d = D.start(device.type == "cuda")
    try:
        job, err = D.attempt(lambda: _prepare(cfg, device))
        tokens = D.agree(d, err, token=_settings_token(job.settings) if job else 0)
        if len(set(tokens)) > 1:
            raise ConfigError(f"the ranks loaded different inputs (settings hashes {tokens}): every node "
                              f"needs the same model, checkpoint and data files")
        stores, err = D.attempt(lambda: sink.open_existing(job)) if d.is_main else ([None] * len(job.outputs), None)
        D.agree(d, err)
        done = D.broadcast_mask(d, sink.done_mask(stores, len(job.ids)))
        batches = [b for b in plan_batches(job.encs, cfg.batch_size) if not all(done[i] for i in b)]
        t0 = time.perf_counter()
        stores, finished = _run_rounds(cfg, job, d, stores, plan_rounds(batches, d.world), done,
                                       stop_after_batches)
        seconds = time.perf_counter() - t0
        if stats is not None:
            stats.update(batches=len(batches), seconds=seconds)
        if d.is_main and finished:
            log.info("featurized %d batches in %.1fs", len(batches), seconds)
            sink.finalize(stores, {"precision": precision_record(job)})
    finally:
        D.stop(d)
    return Path(cfg.output)

# --------------------------------------------------------------------------- CLI hooks


def add_cli_arguments(command: str, parser) -> None:
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes on this machine: >1 starts torchrun with that many (default 1; "
                             "for several machines run torchrun yourself, see the README)")


def handle_cli(command: str, args) -> int | None:
    if args.nproc == 1:
        return None
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")

    return D.launch("featurize", from_args(FeaturizeConfig, args, args.config), args.nproc)
