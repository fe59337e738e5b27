"""Example inputs: what one forward call of a model is fed when it is timed."""

from __future__ import annotations

import torch

from ..data.tokens import bos_id, text_ids, token_windows
from .handle import ModelHandle

# A neutral English paragraph used when no data is given (repeated to reach the prompt length).
DEFAULT_TEXT = (
    "The city council met on Tuesday evening to discuss the new budget for public transport. "
    "Several members argued that more buses were needed in the northern suburbs, while others "
    "said the money would be better spent on repairing roads and bridges before the winter. "
)


def text_prompt(tokenizer, length: int, text: str | None = None) -> torch.Tensor:
    """``length`` token ids (shape (1, length)) from ``text`` (repeated if too short); the first is
    the BOS token when the tokenizer adds one (:func:`leanml.data.tokens.token_windows`)."""
    ids: list[int] = []
    source = text or DEFAULT_TEXT
    while len(ids) < length:
        ids.extend(text_ids(tokenizer, source))
    out = torch.tensor(ids, dtype=torch.long)
    if length >= 2 and (bos := bos_id(tokenizer)) is not None:
        out = token_windows(out, length, bos)[0]
    return out[:length][None]


def text_batch(tokenizer, texts: list[str], max_length: int) -> dict:
    """A padded, truncated batch of ``texts`` as keyword tensors."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def infer_input_shape(module: torch.nn.Module, batch: int) -> tuple[int, ...] | None:
    """Guess an input shape from the first layer with weights (Linear/Conv/Embedding), or None."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            return (batch, layer.in_features)
        if isinstance(layer, torch.nn.Conv1d):
            return (batch, layer.in_channels, 64)
        if isinstance(layer, torch.nn.Conv2d):
            return (batch, layer.in_channels, 32, 32)
        if isinstance(layer, torch.nn.Conv3d):
            return (batch, layer.in_channels, 16, 16, 16)
    return None


def default_example_inputs(handle: ModelHandle, batch: int | None = None, seq_len: int | None = None):
    """Example inputs for ``handle`` when no data is given."""
    if handle.task == "causal-lm":
        if handle.tokenizer is not None:
            return {"input_ids": text_prompt(handle.tokenizer, seq_len or 64)}
        vocab = int(getattr(getattr(handle.module, "config", None), "vocab_size", 100))
        gen = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, vocab, (1, seq_len or 64), generator=gen)}
    if handle.tokenizer is not None and handle.task in ("sentence-embedding", "sequence-classification"):
        n = batch or 8
        sentences = [s.strip() + "." for s in DEFAULT_TEXT.split(".") if s.strip()]
        texts = [sentences[i % len(sentences)] for i in range(n)]
        return text_batch(handle.tokenizer, texts, seq_len or handle.max_length)
    if handle.task == "image-classification":
        size = 224
        return {"pixel_values": torch.randn(batch or 8, 3, size, size, generator=torch.Generator().manual_seed(0))}
    shape = infer_input_shape(handle.module, batch or 8)
    if shape is None:
        return None
    handle.meta["example_inputs"] = f"inferred shape {tuple(shape)} from the first layer; pass --data for real inputs"
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)


def data_example(data) -> tuple:
    """Example inputs from tensor data: a few rows of its calibration split (its evaluation split when the
    calibration split is empty)."""
    x, _ = data.tensors("calib")
    if len(x) == 0:
        x, _ = data.tensors("eval")
    return (x[:8],)
