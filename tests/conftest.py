"""Shared fixtures: a tiny random Llama model directory built offline (no hub access)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory of a tiny random Llama-architecture causal LM with a byte-level BPE tokenizer
    and no chat template (so the LESS ``<|user|>``/``<|assistant|>`` format is used)."""
    from rose_select.testing import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """The same tiny model, with a chat template on its tokenizer."""
    from rose_select.testing import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama_chat"), chat_template=True)


@pytest.fixture(scope="session")
def shared_data_dir():
    """``../shared/data/rose`` when it is beside the checkout (CI has it; users may not)."""
    from pathlib import Path

    here = Path(__file__).resolve().parents[1]
    return here.parent / "shared" / "data" / "rose"


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    """A warm-up checkpoint of the tiny model (random LoRA weights and Adam moments)."""
    from rose_select.testing import write_lora_checkpoint

    return write_lora_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ckpt"))
