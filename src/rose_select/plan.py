"""``rose plan``: memory, batch, FLOPs, device-hours and disk of every stage, before renting GPUs.

The figures are measured, not written down: each stage's own step function (the featurizer with
its hooks, projection and Adam preconditioning; the joint validation pass; the LoRA training step;
the evaluation forward) runs on fake tensors at the model's full width (``plan_trace.py``).
Memory and FLOPs are affine in the number of layers and in the batch size (each layer and each
example adds the same tensors), so four fake runs per stage, at 1 and 2 layers and batch 1 and 2,
give the fixed part (embeddings, output head, optimizer, projector), the part per layer, per
example, and per layer and example; the plan extrapolates them to the model's depth and to every
batch size (``bench/rehearsal.py`` checks the extrapolation against real models at 1, 2 and 4
layers, and the test against a real run).

Batches that fit: the largest batch whose planned peak, plus ``margin`` (allocator rounding and
fragmentation), fits the device memory less ``reserve`` (CUDA context, cuBLAS workspace), which
``max_memory_allocated`` does not see.

A pool (``--pool``): its records are encoded as featurization encodes them (``encode_record``:
template, truncation), and the stages over pool records (warm-up, featurization, training) take
their FLOPs from the actual lengths. Per item they are exactly ``c0 + c1 t + c2 t^2 + c3 r`` in
the padded width ``t`` (attention grows with ``t^2``) and the response tokens ``r`` (the output
head runs only there): four traces fix the coefficients (``LengthFlops``), summed over the items,
featurization's at their width in its length-sorted batches, the trainer's unpadded (exact at
its micro-batch of 1; larger random micro-batches pad more). Memory: the longest item.

Device-hours: FLOPs (matrix products and attention, what ``FlopCounterMode`` counts) over the
device's peak dense bf16 rate times ``mfu``. The default MFU (0.35) is what LoRA fine-tuning of
7-13B models at 2k tokens commonly reaches with Hugging Face's Trainer on A100/H100; it is a stated
assumption, not a measurement (no GPU has been lent to this project; ``bench/gpu.py`` measures
it). Featurization also spends memory-bound time outside matrix products (Adam transform, sparse
projection), which FLOPs do not see: its hours are the least certain figure of the plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from rose_select.config import require, section_fields
from rose_select.errors import ConfigError
from rose_select.features.stage import FeatureSettings
from rose_select.io import write_json
from rose_select.losses import DpoSettings
from rose_select.modeling import EMBEDDED_ALIASES, LoraSettings, ModelSettings, resolve_model
from rose_select.tokenization import TokenizeConfig
from rose_select.train.stage import Schedule

SHAPES_DIR = Path(__file__).parent / "assets" / "shapes"
GIB = 2**30
# name -> (memory in bytes as nvidia-smi reports it, peak dense bf16 FLOP/s of the data sheet)
DEVICES = {
    "h100-80gb": (81559 * 2**20, 989e12), "h200-141gb": (143771 * 2**20, 989e12),
    "a100-80gb": (81920 * 2**20, 312e12), "a100-40gb": (40960 * 2**20, 312e12),
    "l40s-48gb": (46068 * 2**20, 362e12), "a10-24gb": (23028 * 2**20, 125e12),
}
STAGES = ("warmup", "featurize_pool", "validation", "scoring", "train", "evaluate")
POOL_STAGES = ("warmup", "featurize_pool", "train")  # the stages whose items are pool records
PAPER_POOL = 270679  # the Tulu v2 mix of the paper: the pool size without --pool


@dataclass
class PlanSettings:
    """The target and the workload of a plan (the model and the stages' own sections beside it)."""

    gpu: str = field(default="h100-80gb", metadata={"help": "device kind (" + " | ".join(DEVICES) + ") or its memory in bytes"})
    gpus: int = field(default=1, metadata={"help": "devices the work is split over (data parallel)"})
    peak_flops: Optional[float] = field(default=None, metadata={"help": "peak dense FLOP/s (default: the device kind's bf16 figure)"})
    mfu: float = field(default=0.35, metadata={"help": "model-FLOPs utilisation assumed for device-hours"})
    margin: float = field(default=0.10, metadata={"help": "fraction of the planned peak added for allocator rounding and fragmentation"})
    reserve_gib: float = field(default=1.0, metadata={"help": "device memory not available to tensors (CUDA context, workspaces)"})
    pool: Optional[str] = field(default=None, metadata={"help": "pool file (any format the pool readers take, or builtin:...): its tokenized lengths set the pool stages' FLOPs, memory and pool size"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "tokenizer for --pool (local directory or hub id; default: the model's own, which a named shape lacks)"})
    pool_size: Optional[int] = field(default=None, metadata={"help": "pool examples (default: the records of --pool, else 270,679: the Tulu v2 mix of the paper)"})
    validation_size: int = field(default=100, metadata={"help": "validation triples"})
    heldout_size: int = field(default=500, metadata={"help": "held-out evaluation pairs"})
    mean_length: Optional[int] = field(default=None, metadata={"help": "mean tokens per example for FLOPs (default: tokenize.max_length); memory uses max_length"})
    select_fraction: float = field(default=0.05, metadata={"help": "fraction of the pool selected for the final training"})
    warmup_fraction: float = field(default=0.05, metadata={"help": "fraction of the pool in the warm-up"})
    output: Optional[str] = field(default=None, metadata={"help": "also write the plan as JSON here"})

    def __post_init__(self):
        require([
            (self.gpu in DEVICES or self.gpu.isdigit(), f"gpu must be one of {list(DEVICES)} or bytes, got {self.gpu!r}"),
            (self.gpus >= 1, f"gpus must be >= 1, got {self.gpus}"),
            (0 < self.mfu <= 1, f"mfu must be in (0, 1], got {self.mfu}"),
            (self.margin >= 0 and self.reserve_gib >= 0, "margin and reserve_gib must be >= 0"),
            ((self.pool_size is None or self.pool_size >= 1) and min(self.validation_size, self.heldout_size) >= 1,
             "pool, validation and heldout sizes must be >= 1"),
            (0 < self.select_fraction <= 1 and 0 < self.warmup_fraction <= 1, "select_fraction and warmup_fraction must be in (0, 1]"),
        ])
        getattr(super(), "__post_init__", lambda: None)()

    def memory(self) -> int:
        return int(self.gpu) if self.gpu.isdigit() else DEVICES[self.gpu][0]

    def flops_rate(self) -> float:
        if self.peak_flops:
            return self.peak_flops
        if self.gpu not in DEVICES:
            raise ConfigError(f"gpu {self.gpu!r} is a byte count: give peak_flops for device-hours")
        return DEVICES[self.gpu][1]


@dataclass
class PlanConfig(ModelSettings, PlanSettings, DpoSettings):
    """A plan: the model (a named shape, ``config.json``, local directory or hub id) and the run's
    own sections (``lora``, ``tokenize``, ``featurize``, ``warmup``, ``train``); the warm-up's
    epochs are the checkpoints."""

    model_dtype: str = field(default="bfloat16", metadata={"help": "model weights dtype on the GPU"})
    lora: LoraSettings = field(default_factory=LoraSettings)
    tokenize: TokenizeConfig = field(default_factory=lambda: TokenizeConfig(max_length=2048))
    featurize: FeatureSettings = field(default_factory=FeatureSettings)
    warmup: Schedule = field(default_factory=Schedule)
    train: Schedule = field(default_factory=Schedule)

# --------------------------------------------------------------------------- the model


def model_config(name: str):
    """A transformers config from a named shape, a ``config.json``, a directory or a hub id."""
    from transformers import AutoConfig

    shape = SHAPES_DIR / f"{name.lower()}.json"
    path = shape if shape.is_file() else Path(name).expanduser()
    if path.is_file():
        data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(resolve_model(name) if name.lower() in EMBEDDED_ALIASES else name)
    except OSError as e:
        raise ConfigError(f"model {name!r}: not a named shape ({', '.join(named_shapes())}), config.json, "
                          f"model directory or reachable hub id ({e})") from None


def named_shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def fake_model(config, layers: int, dtype: str, lora: LoraSettings, mode):
    """The model with ``layers`` layers and a LoRA adapter, as fake CPU tensors of ``mode``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from rose_select.modeling import attach_lora

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    with torch.device("meta"):
        model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)), lora)
    with mode:
        model = model.to_empty(device="cpu")
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return model

# --------------------------------------------------------------------------- the stages' steps


def synthetic_batch(rows: int, length: int, vocab: int, response: int | None = None) -> dict:
    """``rows`` sequences of ``length`` tokens whose last ``response`` tokens are response tokens
    (default: every token after the first, the worst case for the response-only head), collated
    as the stages collate."""
    from rose_select.losses import IGNORE_INDEX
    from rose_select.tokenization import collate

    prompt = 1 if response is None else length - response
    ids = [3 + (i % (vocab - 3)) for i in range(length)]
    return collate([{"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}] * rows, 0)


def _amp(cfg: PlanConfig, mixed_precision: str | None = None):
    """The autocast dtype a stage would use on CUDA, resolved by the stage's own rule."""
    import torch

    from rose_select.features.stage import autocast_dtype

    if mixed_precision is None:
        probe = type("C", (), {"autocast": cfg.featurize.autocast, "model_dtype": cfg.model_dtype})
        return autocast_dtype(probe, torch.device("cuda"))
    auto = mixed_precision == "auto" and cfg.model_dtype == "float32"
    return torch.bfloat16 if auto or mixed_precision == "bf16" else torch.float16 if mixed_precision == "fp16" else None


def _projector(cfg: PlanConfig, model):
    from rose_select.features import gradients as G
    from rose_select.features.projection import make_projector

    f = cfg.featurize
    return make_projector(f.projection, 0 if f.projection == "none" else f.dim, f.seed, dict(G.param_numels(model)),
                          device=_device(model))


def _device(model):
    """Where the step's own tensors go: the model's device (the CPU for fake tensors)."""
    return next(model.parameters()).device


def pool_step(cfg: PlanConfig, model, batch):
    """Pool featurization: SFT loss, Adam preconditioning, projection (``_batch_features``)."""
    import torch

    from rose_select.features import gradients as G
    from rose_select.modeling import lora_parameters

    f = cfg.featurize
    moments = {n: (torch.zeros(p.shape), torch.ones(p.shape)) for n, p in lora_parameters(model).items()}
    adam = G.AdamState(moments, f.adam_beta1, f.adam_beta2, f.adam_eps).to(_device(model))
    held = [t for m in adam.moments.values() for t in m]
    model.eval()
    return (lambda: G.per_example_features(model, batch, G.sft_loss_fn, _projector(cfg, model), adam=adam,
                                           autocast_dtype=_amp(cfg)).float()), held


def validation_step(cfg: PlanConfig, model, batch):
    """The joint validation pass (pairwise and chosen-answer features; ``ref: auto``)."""
    from rose_select.features.joint import joint_features

    n = batch["input_ids"].shape[0] // 2
    model.eval()
    return (lambda: joint_features(model, batch, _projector(cfg, model), ref="self", beta=cfg.beta,
                                   item_ids=list(range(n)), autocast_dtype=_amp(cfg)).float()), []


def train_step_fn(schedule: Schedule, cfg: PlanConfig, model, batch):
    """One LoRA training step as the engine takes it (response-only SFT loss, AdamW), after one
    step that creates the optimizer state (the steady state holds it)."""
    import contextlib

    import torch

    from rose_select.features.gradients import sft_loss_fn
    from rose_select.modeling import lora_parameters

    base = model.base_model.model
    if schedule.gradient_checkpointing:  # as the Trainer sets it (train/stage.py)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()
    model.train()
    params = list(lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=schedule.lr, foreach=False)
    amp = _amp(cfg, schedule.mixed_precision)

    def step():
        with torch.autocast(_device(model).type, dtype=amp) if amp else contextlib.nullcontext():
            loss = sft_loss_fn(model, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return step, [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def evaluate_step(cfg: PlanConfig, model, batch):
    """The evaluation forward: response log-probabilities, no gradient (``sequence_stats``)."""
    import torch

    from rose_select.losses import response_logprobs

    model.eval()

    def step():
        with torch.no_grad():
            return response_logprobs(model, batch)[0]
    return step, []


# stage -> (step builder, batch rows per item, the schedule whose settings it uses)
STEPS = {
    "warmup": (lambda cfg, m, b: train_step_fn(cfg.warmup, cfg, m, b), 1),
    "featurize_pool": (pool_step, 1),
    "validation": (validation_step, 2),
    "train": (lambda cfg, m, b: train_step_fn(cfg.train, cfg, m, b), 1),
    "evaluate": (evaluate_step, 1),
}


def stage_batch(stage: str, model, items: int, length: int, response: int | None = None) -> dict:
    """A real batch of ``items`` items of ``length`` tokens for ``stage`` (``response`` of them
    response tokens; see ``synthetic_batch``), on the CPU: built outside any fake mode."""
    _, per_item = STEPS[stage]
    return synthetic_batch(items * per_item, length, model.get_input_embeddings().weight.shape[0], response)


def stage_step(cfg: PlanConfig, stage: str, model, batch: dict, mode=None):
    """``(step, held)``: one step of ``stage`` on ``batch`` and the state tensors it holds. Called
    inside a fake ``mode``, the batch becomes constant fake tensors; otherwise it goes to the
    model's device, so the same step runs for real on a CPU or a GPU (bench/rehearsal.py)."""
    from rose_select.plan_trace import constant

    if mode is not None:
        batch = {k: constant(mode, v) for k, v in batch.items()}
    else:
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
    return STEPS[stage][0](cfg, model, batch)


def stage_trace(cfg: PlanConfig, stage: str, model, items: int, length: int, mode=None,
                response: int | None = None):
    """Trace one step of ``stage`` (``stage_step``), in the fake ``mode`` if one is given."""
    import contextlib

    from rose_select.plan_trace import trace

    batch = stage_batch(stage, model, items, length, response)
    with mode if mode is not None else contextlib.nullcontext():
        step, held = stage_step(cfg, stage, model, batch, mode)
        return trace(step, [*model.parameters(), *model.buffers(), *held])


# --------------------------------------------------------------------------- fits


@dataclass
class Affine:
    """``v(L, B) = a + b L + c B + d L B`` (``L`` layers, ``B`` batch items), fitted exactly
    through (1, 1), (1, 2), (2, 1), (2, 2)."""

    a: float
    b: float
    c: float
    d: float

    @classmethod
    def fit(cls, v11: float, v12: float, v21: float, v22: float) -> "Affine":
        d = v22 - v21 - v12 + v11
        c = v12 - v11 - d
        b = v21 - v11 - d
        return cls(v11 - b - c - d, b, c, d)

    def at(self, layers: int, batch: int) -> float:
        return self.a + self.b * layers + self.c * batch + self.d * layers * batch


def largest_batch(peak: Affine, layers: int, budget: float, cap: int = 4096) -> int:
    """The largest ``B`` with ``peak(layers, B) <= budget`` (0: not even one item fits)."""
    per_item = peak.c + peak.d * layers
    room = budget - peak.at(layers, 0)
    if per_item <= 0:
        return cap if room >= 0 else 0
    return max(0, min(cap, math.floor(room / per_item)))


def stage_fits(cfg: PlanConfig, config, stages, length: int, response: int | None = None) -> dict:
    """``{stage: (peak Affine, flops Affine)}`` from four fake runs per stage (1 and 2 layers,
    batch 1 and 2) of the stage's own step on items of ``length`` tokens (``response`` of them
    response tokens); stages with equal steps share the runs."""
    import torch

    from rose_select.plan_trace import fake_mode

    from rose_select.features.gradients import param_numels

    traces: dict = {s: {} for s in stages}
    for layers in (1, 2):
        with fake_mode() as mode:
            model = fake_model(config, layers, cfg.model_dtype, cfg.lora, mode)
            traces.setdefault("lora_numel", {})[layers] = sum(param_numels(model).values())
            for stage in stages:
                same = "warmup" if stage == "train" and cfg.train == cfg.warmup and "warmup" in stages else None
                for b in (1, 2):
                    traces[stage][layers, b] = (traces[same][layers, b] if same else
                                                stage_trace(cfg, stage, model, b, length, mode, response))
        del model
    torch.set_grad_enabled(True)
    key = [(1, 1), (1, 2), (2, 1), (2, 2)]
    lora = traces.pop("lora_numel")
    fits = {s: (Affine.fit(*(t[k].peak_bytes for k in key)), Affine.fit(*(t[k].flops for k in key)))
            for s, t in traces.items()}
    return fits, lora[2] - lora[1]

# --------------------------------------------------------------------------- a pool's lengths


@dataclass
class PoolLengths:
    """Each record of a pool as featurization encodes it: tokens after truncation and predicted
    (response) positions, and how many records truncation cut."""

    path: str
    max_length: int
    tokens: list[int]
    responses: list[int]
    truncated: int

    def summary(self) -> dict:
        import numpy as np

        t = np.asarray(self.tokens)
        return {"pool": self.path, "n": len(t), "mean": float(t.mean()), "p50": float(np.percentile(t, 50)),
                "p95": float(np.percentile(t, 95)), "max": int(t.max()),
                "truncated_share": self.truncated / len(t), "max_length": self.max_length}


def pool_lengths(records, tokenizer, tcfg: TokenizeConfig, path: str) -> PoolLengths:
    """Encode ``records`` with ``encode_record`` (the featurizer's and trainer's own encoding:
    template, response-first truncation); a record at the cap is encoded once more without it to
    tell whether it was cut. A record truncation leaves no response token stops the plan, as it
    stops featurization, naming the file and the record."""
    from dataclasses import replace

    from rose_select.errors import DataError
    from rose_select.losses import IGNORE_INDEX
    from rose_select.tokenization import encode_record

    uncut = replace(tcfg, max_length=2**62)
    tokens, responses, truncated = [], [], 0
    for rec in records:
        try:
            enc = encode_record(rec, tokenizer, tcfg)
        except DataError as e:
            raise DataError(e.problem, path=path, record=e.record, field=e.field) from None
        tokens.append(len(enc["input_ids"]))
        responses.append(sum(label != IGNORE_INDEX for label in enc["labels"][1:]))
        at_cap = tokens[-1] == tcfg.max_length
        truncated += at_cap and len(encode_record(rec, tokenizer, uncut)["input_ids"]) > tcfg.max_length
    return PoolLengths(path, tcfg.max_length, tokens, responses, truncated)


def plan_tokenizer(cfg: PlanConfig):
    """The tokenizer of ``--pool``: ``--tokenizer``, else the model's own (a ``config.json``'s
    directory, a model directory, the embedded model, a hub id); a named shape has none."""
    from rose_select.errors import ModelLoadError
    from rose_select.modeling import load_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if (SHAPES_DIR / f"{cfg.model.lower()}.json").is_file():
        raise ConfigError(f"model {cfg.model!r} is a named shape without a tokenizer: give --tokenizer (a local "
                          f"model directory or hub id) to tokenize --pool {cfg.pool}")
    source = Path(cfg.model).expanduser()
    try:
        return load_tokenizer(str(source.parent) if source.is_file() else cfg.model)
    except ModelLoadError as e:
        raise ConfigError(f"--pool needs a tokenizer and {cfg.model!r} has none ({e}); give --tokenizer") from None


def read_pool_lengths(cfg: PlanConfig) -> PoolLengths:
    from rose_select.data import load_pool, resolve_input

    path = resolve_input(cfg.pool)
    return pool_lengths(load_pool(path), plan_tokenizer(cfg), cfg.tokenize, path)


@dataclass
class LengthFlops:
    """FLOPs of one item at full depth as a function of its padded width ``t`` and its predicted
    positions ``r``: ``c0 + c1 t + c2 t^2 + c3 r``. Exact, not an approximation: matrix products
    in the layers grow with ``t``, attention's score and value products with ``t^2``, the
    response-only output head with ``r``, and nothing else counts FLOPs. Fitted through four
    traced points (``length_points``); the tests check it against traces at other lengths."""

    c: tuple[float, float, float, float]

    @classmethod
    def fit(cls, points: list[tuple[int, int]], flops: list[float]) -> "LengthFlops":
        import numpy as np

        rows = [[1.0, t, t * t, r] for t, r in points]
        return cls(tuple(float(v) for v in np.linalg.solve(np.array(rows), np.array(flops, dtype=float))))

    def at(self, t, r):
        return self.c[0] + self.c[1] * t + self.c[2] * t * t + self.c[3] * r


def length_points(longest: int) -> list[tuple[int, int]]:
    """Four (width, responses) points spanning the pool's lengths (8 tokens at least, so they
    differ): three widths with every token after the first a response token (the first: the
    memory of the longest item), and the top width with a quarter of them."""
    top = max(longest, 8)
    return [(top, top - 1), (top // 2, top // 2 - 1), (top // 4, top // 4 - 1), (top, top // 4)]


def pool_fits(cfg: PlanConfig, config, stages, longest: int) -> tuple[dict, int]:
    """``{stage: (peak Affine at the longest item, LengthFlops)}`` and the LoRA parameters per
    layer: ``stage_fits`` at each of ``length_points``, per-item FLOPs at the model's depth."""
    layers, points = config.num_hidden_layers, length_points(longest)
    runs = [stage_fits(cfg, config, stages, t, r) for t, r in points]
    fits = [f for f, _ in runs]
    per_item = {s: [f[s][1].c + f[s][1].d * layers for f in fits] for s in stages}
    return {s: (fits[0][s][0], LengthFlops.fit(points, per_item[s])) for s in stages}, runs[0][1]


def padded_widths(tokens: list[int], batch: int) -> list[int]:
    """Each item's padded width in featurization's own batches (``plan_batches``: sorted by
    length, then chunked): the longest item of its batch."""
    from rose_select.features.stage import plan_batches

    widths = list(tokens)
    for rows in plan_batches([[{"input_ids": range(t)}] for t in tokens], max(batch, 1)):
        for i in rows:
            widths[i] = max(tokens[j] for j in rows)
    return widths


def mean_item_flops(fit: LengthFlops, lengths: PoolLengths, batch: int | None) -> float:
    """Mean FLOPs per pool item: every item at its own length (``batch`` None: the trainer's
    micro-batches, exact at its default of 1) or at its padded width in featurization's sorted
    batches of ``batch``."""
    import numpy as np

    widths = lengths.tokens if batch is None else padded_widths(lengths.tokens, batch)
    return float(np.mean(fit.at(np.asarray(widths, dtype=float), np.asarray(lengths.responses, dtype=float))))

# --------------------------------------------------------------------------- the plan

GPU_STAGES = ("warmup", "featurize_pool", "validation", "train", "evaluate")


def stage_items(cfg: PlanConfig) -> dict:
    """Items each stage processes in a whole run (examples, triples or sequences)."""
    ckpts = cfg.warmup.epochs
    return {"warmup": math.ceil(cfg.pool_size * cfg.warmup_fraction) * cfg.warmup.epochs,
            "featurize_pool": cfg.pool_size * ckpts, "validation": cfg.validation_size * ckpts,
            "scoring": cfg.pool_size * ckpts,
            "train": math.ceil(cfg.pool_size * cfg.select_fraction) * cfg.train.epochs,
            "evaluate": cfg.heldout_size * 4}  # chosen + rejected, with the adapter and the base model


def disk_bytes(cfg: PlanConfig, lora_numel: int) -> dict:
    """Bytes written per stage: checkpoints (fp32 adapter + two Adam moments), feature stores
    (``store_dtype`` rows + done mask), scores, the final adapter."""
    ckpts, d = cfg.warmup.epochs, cfg.featurize.dim
    row = d * (2 if cfg.featurize.store_dtype == "float16" else 4) + 1
    return {"warmup": ckpts * lora_numel * 4 * 3, "featurize_pool": ckpts * cfg.pool_size * row,
            "validation": ckpts * 2 * cfg.validation_size * row, "scoring": cfg.pool_size * 8 * 2,
            "train": lora_numel * 4, "evaluate": 0}


def _stage_row(cfg: PlanConfig, stage: str, peak: Affine, per_item: float, layers: int, items: int,
               budget: float) -> dict:
    best = largest_batch(peak, layers, budget)
    hours = items * per_item / (cfg.flops_rate() * cfg.mfu) / 3600
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max(2 * best, 1)]
    return {"stage": stage, "device": "gpu", "items": items, "batch": best,
            "peak_gib": {b: peak.at(layers, b) / GIB for b in sizes},
            "peak_gib_at_batch": peak.at(layers, best) / GIB if best else None,
            "fixed_gib": peak.at(layers, 0) / GIB, "per_item_gib": (peak.c + peak.d * layers) / GIB,
            "tflop_per_item": per_item / 1e12, "device_hours": hours, "wall_hours": hours / cfg.gpus}


def _scoring_row(cfg: PlanConfig, items: int) -> dict:
    """Scoring: cosine similarities of every pool row with every validation row (CPU, streamed)."""
    flops = 2.0 * cfg.pool_size * cfg.validation_size * cfg.featurize.dim * cfg.warmup.epochs
    return {"stage": "scoring", "device": "cpu", "items": items, "batch": None, "peak_gib": {},
            "peak_gib_at_batch": None, "tflop_per_item": flops / items / 1e12, "device_hours": 0.0,
            "wall_hours": 0.0}


def pool_figures(cfg: PlanConfig, config, lengths: PoolLengths, budget: float,
                 feature_batch: int | None = None) -> dict:
    """``{stage: (peak Affine, mean FLOPs per item)}`` of the pool stages at the pool's lengths
    (``pool_fits``); featurization's items padded in its sorted batches of ``feature_batch``
    (default: the largest that fits ``budget``, what ``auto_batch`` takes on CUDA)."""
    layers = config.num_hidden_layers
    fits, _ = pool_fits(cfg, config, POOL_STAGES, max(lengths.tokens))
    out = {}
    for stage, (peak, flops) in fits.items():
        batch = (feature_batch or largest_batch(peak, layers, budget)) if stage == "featurize_pool" else None
        out[stage] = (peak, mean_item_flops(flops, lengths, batch))
    return out


def stage_figures(cfg: PlanConfig, config, lengths: PoolLengths | None, budget: float) -> tuple[dict, int]:
    """``{stage: (peak Affine, FLOPs per item)}`` of the GPU stages and the LoRA parameters per
    layer: memory at ``tokenize.max_length``, FLOPs at ``mean_length`` (default: the same); with
    a pool, its stages at its lengths (``pool_figures``)."""
    layers = config.num_hidden_layers
    rest = [s for s in GPU_STAGES if lengths is None or s not in POOL_STAGES]
    fits, lora_per_layer = stage_fits(cfg, config, rest, cfg.tokenize.max_length)
    if cfg.mean_length and cfg.mean_length != cfg.tokenize.max_length:
        flop_fits, _ = stage_fits(cfg, config, rest, cfg.mean_length)
        fits = {s: (fits[s][0], flop_fits[s][1]) for s in fits}
    figures = {s: (peak, flops.c + flops.d * layers) for s, (peak, flops) in fits.items()}
    if lengths is not None:
        figures.update(pool_figures(cfg, config, lengths, budget))
    return figures, lora_per_layer


def make_plan(cfg: PlanConfig) -> dict:
    """The plan as a dict (see ``format_plan``)."""
    from dataclasses import replace

    config = model_config(cfg.model)
    lengths = read_pool_lengths(cfg) if cfg.pool else None
    cfg = replace(cfg, pool_size=cfg.pool_size or (len(lengths.tokens) if lengths else PAPER_POOL))
    layers = config.num_hidden_layers
    budget = (cfg.memory() - cfg.reserve_gib * GIB) / (1 + cfg.margin)
    figures, lora_per_layer = stage_figures(cfg, config, lengths, budget)
    items, disk = stage_items(cfg), disk_bytes(cfg, lora_per_layer * layers)
    rows = [_scoring_row(cfg, items[s]) if s == "scoring" else
            _stage_row(cfg, s, *figures[s], layers, items[s], budget) for s in STAGES]
    for r in rows:
        r["disk_bytes"] = disk[r["stage"]]
    return {"model": cfg.model, "layers": layers, "model_dtype": cfg.model_dtype, "gpu": cfg.gpu,
            "gpus": cfg.gpus, "memory_gib": cfg.memory() / GIB, "budget_gib": budget / GIB,
            "max_length": cfg.tokenize.max_length, "mean_length": cfg.mean_length or cfg.tokenize.max_length,
            "pool_lengths": lengths.summary() if lengths else None, "pool_size": cfg.pool_size,
            "mfu": cfg.mfu, "peak_flops": cfg.flops_rate(), "lora_params": lora_per_layer * layers,
            "checkpoints": cfg.warmup.epochs, "rows": rows,
            "total": {"device_hours": sum(r["device_hours"] for r in rows),
                      "wall_hours": sum(r["wall_hours"] for r in rows),
                      "disk_bytes": sum(r["disk_bytes"] for r in rows)}}


def format_lengths(summary: dict, pool_size: int) -> str:
    """The pool's length line of the printed plan."""
    scaled = f", scaled to a pool of {pool_size:,}" if pool_size != summary["n"] else ""
    return (f"pool {summary['pool']}: {summary['n']:,} records{scaled}; tokens mean {summary['mean']:.1f}, "
            f"p50 {summary['p50']:.0f}, p95 {summary['p95']:.0f}, max {summary['max']}; "
            f"{summary['truncated_share']:.1%} truncated at {summary['max_length']}. Warm-up, featurization "
            f"and training at these lengths (memory at the longest; featurization padded in its sorted "
            f"batches), validation and evaluation at the tokens above")


def format_plan(plan: dict) -> str:
    """The plan as a markdown table with a header line."""
    from rose_select.costs import _size
    from rose_select.tables import markdown

    head = (f"{plan['model']} ({plan['layers']} layers, {plan['model_dtype']}, LoRA {plan['lora_params'] / 1e6:.0f}M "
            f"params) on {plan['gpus']} x {plan['gpu']} ({plan['memory_gib']:.1f} GiB, batches fit "
            f"{plan['budget_gib']:.1f} GiB); {plan['max_length']} tokens (FLOPs at {plan['mean_length']}); "
            f"{plan['checkpoints']} checkpoints; hours at MFU {plan['mfu']:.2f} of {plan['peak_flops'] / 1e12:.0f} TFLOP/s")
    rows = [{"stage": r["stage"], "items": f"{r['items']:,}", "batch": r["batch"] if r["batch"] is not None else "-",
             "peak GiB @ batch": "-" if r["peak_gib_at_batch"] is None else f"{r['peak_gib_at_batch']:.1f}",
             "peak GiB @ 1": f"{r['peak_gib'][1]:.1f}" if r["peak_gib"] else "-",
             "TFLOP / item": f"{r['tflop_per_item']:.3g}", "device-hours": f"{r['device_hours']:.1f}",
             "wall hours": f"{r['wall_hours']:.1f}", "disk": _size(r["disk_bytes"])}
            for r in plan["rows"]]
    t = plan["total"]
    rows.append({"stage": "total", "device-hours": f"{t['device_hours']:.1f}", "wall hours": f"{t['wall_hours']:.1f}",
                 "disk": _size(t["disk_bytes"])})
    if plan.get("pool_lengths"):
        head += "\n" + format_lengths(plan["pool_lengths"], plan["pool_size"])
    return head + "\n\n" + markdown(rows, list(rows[0]))


def run_plan(cfg: PlanConfig) -> Optional[Path]:
    """Print the plan; write its JSON to ``cfg.output`` when given."""
    plan = make_plan(cfg)
    print(format_plan(plan))
    if not cfg.output:
        return None
    write_json(cfg.output, plan)
    return Path(cfg.output)

# --------------------------------------------------------------------------- a run's own plan


def gpu_kind(name: str, memory: int) -> str | None:
    """The device kind (a key of ``DEVICES``) of a CUDA device's name, e.g. ``NVIDIA H100 80GB
    HBM3``; None for a device the table does not know (its peak FLOP/s is then unknown)."""
    import re

    upper = name.upper()
    for token, kind in (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("L40S", "l40s-48gb")):
        if token in upper:
            return kind
    if "A100" in upper:
        return "a100-80gb" if memory > 48 * GIB else "a100-40gb"
    return "a10-24gb" if re.search(r"\bA10\b", upper) else None


def run_figures(run_cfg, pool: str, device: str) -> dict:
    """The plan of a run's own pool stages, for its cost table: per stage the planned TFLOP per
    example processed (every epoch; the pool's mean, at its tokenized lengths), and on CUDA the
    planned peak GiB at the stage's batch; ``flops_rate``: the device's peak times MFU (None
    where unknown, and on the CPU). ``run_cfg``: a ``RunConfig`` (its sections, whole)."""
    import torch

    from rose_select.costs import resolved_device
    from rose_select.data import load_pool

    device = torch.device(device if device != "auto" else resolved_device(device))
    cuda = device.type == "cuda"
    warmup = Schedule(**section_fields(run_cfg.warmup, Schedule))  # as a Schedule: equal to train, shared traces
    cfg = PlanConfig(model=run_cfg.model, model_dtype=run_cfg.model_dtype, lora=run_cfg.lora,
                     tokenize=run_cfg.tokenize, featurize=run_cfg.featurize, warmup=warmup,
                     train=run_cfg.train, beta=run_cfg.beta, gpu=str(free_device_bytes(device)))
    config = model_config(cfg.model)
    layers, budget = config.num_hidden_layers, cfg.memory() / (1 + cfg.margin)
    lengths = pool_lengths(load_pool(pool, format=run_cfg.pool_format, limit=run_cfg.pool_limit),
                           plan_tokenizer(cfg), cfg.tokenize, pool)
    auto = cfg.featurize.auto_batch == "always" or cfg.featurize.auto_batch == "cuda" and cuda
    feature_batch = None if auto else cfg.featurize.batch_size
    figures = {}
    for stage, (peak, per_item) in pool_figures(cfg, config, lengths, budget, feature_batch).items():
        schedule = {"warmup": cfg.warmup, "train": cfg.train}.get(stage)
        batch = schedule.batch_size if schedule else feature_batch or largest_batch(peak, layers, budget)
        figures[stage] = {"tflop_per_example": per_item * (schedule.epochs if schedule else 1) / 1e12,
                          "peak_gib": peak.at(layers, batch) / GIB if cuda else None}
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    kind = gpu_kind(torch.cuda.get_device_name(device), total) if cuda else None
    return {"stages": figures, "flops_rate": DEVICES[kind][1] * cfg.mfu if kind else None, "mfu": cfg.mfu,
            "lengths": lengths.summary()}

# --------------------------------------------------------------------------- batch_size: auto


def free_device_bytes(device) -> int:
    """Memory the featurizer may use on ``device``, the loaded model included: free + allocated
    (CUDA), or available RAM + this process's tensors (CPU)."""
    import os

    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fitting_batch(feature_cfg, model, length: int, budget: int) -> int:
    """The largest batch of ``length``-token items whose planned featurization peak (the model's
    own shape and adapter, the job's settings), plus the default margin, fits ``budget`` bytes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft = next(iter(model.peft_config.values()))
    lora = LoraSettings(r=peft.r, alpha=float(peft.lora_alpha), dropout=0.0,
                        target_modules=sorted(peft.target_modules))
    cfg = PlanConfig(model=feature_cfg.model, model_dtype=feature_cfg.model_dtype, lora=lora,
                     featurize=feature_cfg, tokenize=TokenizeConfig(max_length=max(length, 2)))
    stage = "validation" if feature_cfg.loss == "pairwise" else "featurize_pool"
    fits, _ = stage_fits(cfg, base.config, [stage], cfg.tokenize.max_length)
    return largest_batch(fits[stage][0], base.config.num_hidden_layers, budget / (1 + cfg.margin))
