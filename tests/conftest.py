"""Tiny models and data built in the tests (seconds, no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LEANML_QUIET", "1")


class CharTokenizer:
    """A byte-level tokenizer with the call signature the code uses (no special tokens)."""

    vocab_size = 128
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [min(ord(c), 127) for c in text]}


def tiny_llama_module(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    from leanml.models import ModelHandle

    module = tiny_llama_module()
    handle = ModelHandle(module=module, task="causal-lm", name="tiny-llama", tokenizer=CharTokenizer())
    handle.example_inputs = {"input_ids": torch.randint(0, 128, (1, 16))}
    return handle


@pytest.fixture
def tiny_text():
    from leanml.data import TextCorpus

    body = " ".join(f"sentence number {i} says the quick brown fox jumps over the lazy dog." for i in range(80))
    return TextCorpus(name="tiny", text=body, eval_tokens=600, calib_start=1200)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()
