"""A tiny random Llama model and tokenizer built offline, for tests, benches and smoke runs.

It is written to a directory and loaded back through the ordinary ``from_pretrained`` path, so
tests exercise the same loading code as real models.
"""

from __future__ import annotations

from pathlib import Path
from rose_select.checkpoint import save_adam_moments, write_base_model
from rose_select.modeling import LoraSettings, attach_lora, load_model, lora_parameters

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead.",
    "<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis is the capital of France.",
    "Physics explains how the universe works; chemistry explains how matter reacts.",
    "def add(a, b):\n    return a + b  # numbers 0123456789",
    "I think the answer is yes, because the evidence points that way. No, it is not.",
]


def build_tiny_tokenizer(chat_template: bool = False):
    """A byte-level BPE tokenizer trained in memory (no hub access). Every string encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return fast


def build_tiny_model(vocab_size: int, *, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                     dtype=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model


def write_tiny_model_dir(path: str | Path, *, seed: int = 0, chat_template: bool = False, **kw) -> Path:
    """Save a tiny random Llama + tokenizer to ``path`` (a normal HF model directory)."""
    path = Path(path)
    tok = build_tiny_tokenizer(chat_template=chat_template)
    model = build_tiny_model(len(tok), seed=seed, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def poison_embeddings(path: str | Path, text: str) -> list[int]:
    """Set the input embeddings of ``text``'s tokens to NaN in a saved model directory, so that
    exactly the examples containing ``text`` get non-finite losses (tests of error reporting)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    path = Path(path)
    ids = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    weights = load_file(str(path / "model.safetensors"))
    weights["model.embed_tokens.weight"][ids] = float("nan")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return ids


def write_lora_checkpoint(model: str | Path, out: str | Path, lora=None, *, seed: int = 0) -> Path:
    """A warm-up-like checkpoint without training (tests, benches): the base model with random
    LoRA weights (A and B non-zero, so every gradient block is) and random Adam moments."""
    import torch

    out = Path(out)
    torch.manual_seed(seed)
    peft_model = attach_lora(load_model(str(model)), lora or LoraSettings(r=2, alpha=4.0, dropout=0.0))
    moments = {}
    with torch.no_grad():
        for name, p in lora_parameters(peft_model).items():
            p.normal_(0, 0.2)
            moments[name] = (torch.randn(p.shape) * 1e-3, torch.rand(p.shape) * 1e-5 + 1e-7)
    peft_model.save_pretrained(out)
    write_base_model(out, str(model))
    save_adam_moments(out / "optimizer_state.safetensors", moments, step=1)
    return out
