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

from rose_select.config import require
from rose_select.errors import ConfigError
from rose_select.features.stage import FeatureSettings
from rose_select.io import write_json
from rose_select.losses import DpoSettings
from rose_select.modeling import LoraSettings, ModelSettings
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


@dataclass
class PlanSettings:
    """The target and the workload of a plan (the model and the stages' own sections beside it)."""

    gpu: str = field(default="h100-80gb", metadata={"help": "device kind (" + " | ".join(DEVICES) + ") or its memory in bytes"})
    gpus: int = field(default=1, metadata={"help": "devices the work is split over (data parallel)"})
    peak_flops: Optional[float] = field(default=None, metadata={"help": "peak dense FLOP/s (default: the device kind's bf16 figure)"})
    mfu: float = field(default=0.35, metadata={"help": "model-FLOPs utilisation assumed for device-hours"})
    margin: float = field(default=0.10, metadata={"help": "fraction of the planned peak added for allocator rounding and fragmentation"})
    reserve_gib: float = field(default=1.0, metadata={"help": "device memory not available to tensors (CUDA context, workspaces)"})
    pool_size: int = field(default=270679, metadata={"help": "pool examples (default: the Tulu v2 mix of the paper)"})
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
            (min(self.pool_size, self.validation_size, self.heldout_size) >= 1, "pool, validation and heldout sizes must be >= 1"),
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
        return AutoConfig.from_pretrained(name)
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


def synthetic_batch(rows: int, length: int, vocab: int) -> dict:
    """``rows`` sequences of ``length`` tokens, every token after the first a response token
    (the worst case for the response-only head), collated as the stages collate."""
    from rose_select.losses import IGNORE_INDEX
    from rose_select.tokenization import collate

    ids = [3 + (i % (vocab - 3)) for i in range(length)]
    return collate([{"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}] * rows, 0)


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
    return make_projector(f.projection, 0 if f.projection == "none" else f.dim, f.seed, dict(G.param_numels(model)))


def pool_step(cfg: PlanConfig, model, batch):
    """Pool featurization: SFT loss, Adam preconditioning, projection (``_batch_features``)."""
    import torch

    from rose_select.features import gradients as G
    from rose_select.modeling import lora_parameters

    f = cfg.featurize
    moments = {n: (torch.zeros(p.shape), torch.ones(p.shape)) for n, p in lora_parameters(model).items()}
    adam = G.AdamState(moments, f.adam_beta1, f.adam_beta2, f.adam_eps).to("cpu")
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
        with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
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


def stage_trace(cfg: PlanConfig, stage: str, model, items: int, length: int, mode=None):
    """Trace one step of ``stage`` on ``items`` items of ``length`` tokens; with a fake ``mode``
    the batch becomes constant fake tensors and the step runs in that mode."""
    import contextlib

    from rose_select.plan_trace import constant, trace

    build, per_item = STEPS[stage]
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = synthetic_batch(items * per_item, length, vocab)  # real: built outside the fake mode
    with mode if mode is not None else contextlib.nullcontext():
        if mode is not None:
            batch = {k: constant(mode, v) for k, v in batch.items()}
        step, extra = build(cfg, model, batch)
        return trace(step, [*model.parameters(), *model.buffers(), *extra])


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


def stage_fits(cfg: PlanConfig, config, stages, length: int) -> dict:
    """``{stage: (peak Affine, flops Affine)}`` from four fake runs per stage (1 and 2 layers,
    batch 1 and 2) of the stage's own step; stages with equal steps share the runs."""
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
                                                stage_trace(cfg, stage, model, b, length, mode))
        del model
    torch.set_grad_enabled(True)
    key = [(1, 1), (1, 2), (2, 1), (2, 2)]
    lora = traces.pop("lora_numel")
    fits = {s: (Affine.fit(*(t[k].peak_bytes for k in key)), Affine.fit(*(t[k].flops for k in key)))
            for s, t in traces.items()}
    return fits, lora[2] - lora[1]

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


def _stage_row(cfg: PlanConfig, stage: str, fit, layers: int, items: int, budget: float) -> dict:
    peak, flops = fit
    best = largest_batch(peak, layers, budget)
    per_item = flops.c + flops.d * layers
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


def make_plan(cfg: PlanConfig) -> dict:
    """The plan as a dict (see ``format_plan``)."""
    config = model_config(cfg.model)
    layers = config.num_hidden_layers
    fits, lora_per_layer = stage_fits(cfg, config, GPU_STAGES, cfg.tokenize.max_length)
    if cfg.mean_length and cfg.mean_length != cfg.tokenize.max_length:
        flop_fits, _ = stage_fits(cfg, config, GPU_STAGES, cfg.mean_length)
        fits = {s: (fits[s][0], flop_fits[s][1]) for s in fits}
    budget = (cfg.memory() - cfg.reserve_gib * GIB) / (1 + cfg.margin)
    items, disk = stage_items(cfg), disk_bytes(cfg, lora_per_layer * layers)
    rows = [_scoring_row(cfg, items[s]) if s == "scoring" else
            _stage_row(cfg, s, fits[s], layers, items[s], budget) for s in STAGES]
    for r in rows:
        r["disk_bytes"] = disk[r["stage"]]
    return {"model": cfg.model, "layers": layers, "model_dtype": cfg.model_dtype, "gpu": cfg.gpu,
            "gpus": cfg.gpus, "memory_gib": cfg.memory() / GIB, "budget_gib": budget / GIB,
            "max_length": cfg.tokenize.max_length, "mean_length": cfg.mean_length or cfg.tokenize.max_length,
            "mfu": cfg.mfu, "peak_flops": cfg.flops_rate(), "lora_params": lora_per_layer * layers,
            "checkpoints": cfg.warmup.epochs, "rows": rows,
            "total": {"device_hours": sum(r["device_hours"] for r in rows),
                      "wall_hours": sum(r["wall_hours"] for r in rows),
                      "disk_bytes": sum(r["disk_bytes"] for r in rows)}}


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
    return head + "\n\n" + markdown(rows, list(rows[0]))


def run_plan(cfg: PlanConfig) -> Optional[Path]:
    """Print the plan; write its JSON to ``cfg.output`` when given."""
    plan = make_plan(cfg)
    print(format_plan(plan))
    if not cfg.output:
        return None
    write_json(cfg.output, plan)
    return Path(cfg.output)

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
