"""`ModelHandle`: a model together with what is needed to feed it and to judge it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TASKS = ("causal-lm", "sentence-embedding", "sequence-classification", "image-classification", "generic")


@dataclass
class ModelHandle:
    """A loaded model.

    ``module`` is what runs (an ``nn.Module``; ONNX files are wrapped in one); ``tokenizer`` is the
    tokenizer or processor when the model takes text; ``task`` is one of :data:`TASKS`;
    ``example_inputs`` is a dict of keyword tensors (or a tuple of positional tensors) that one
    forward call accepts; ``source`` is where it was loaded from and ``artifact`` the file or folder
    whose bytes are the model as stored.
    """

    module: torch.nn.Module
    task: str
    name: str
    tokenizer: Any = None
    example_inputs: Any = None
    source: str = ""
    artifact: Path | None = None
    runtime: str = "torch"
    max_length: int = 512
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if isinstance(self.module, torch.nn.Module):
            from .arch import normalise

            normalise(self.module)  # GPT-2's Conv1D layers become nn.Linear (same function)

    @property
    def is_torch(self) -> bool:
        return self.runtime == "torch"

    def call(self, inputs: Any) -> Any:
        """Run one forward pass on ``inputs`` (a dict of keyword tensors or a tuple)."""
        if isinstance(inputs, dict):
            return self.module(**inputs)
        if isinstance(inputs, (tuple, list)):
            return self.module(*inputs)
        return self.module(inputs)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Sentence embeddings (mean pooling over the attention mask) for a text encoder."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer, so it cannot embed text")
        chunks = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            chunks.append(mean_pool(self.call(dict(enc)), enc["attention_mask"]))
        return torch.cat(chunks)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB (float64; inf when equal)."""
    ref64, out64 = ref.double(), out.double()
    noise = (ref64 - out64).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref64.pow(2).sum().clamp(min=1e-30) / noise))


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: logits, last hidden state, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, dict):
            value = out.get(key)
        if value is not None:
            return value
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise TypeError(f"cannot find a tensor in a model output of type {type(out).__name__}")


def mean_pool(out: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``attention_mask`` is 1: the sentence embedding."""
    hidden = output_tensor(out)  # (B, T, H)
    mask = attention_mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
