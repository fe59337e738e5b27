"""Dataset types with explicit, seeded, non-overlapping calibration and evaluation splits.

* :class:`TextCorpus` - running text for causal LMs, split by token position.
* :class:`TextRecords` - texts with optional labels, split by a seeded permutation.
* :class:`SimilarityPairs` - texts, pairs of them and human similarity scores.
* :class:`TensorData` - input tensors with optional labels, split by a seeded permutation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import LeanmlError
from .tokens import bos_id, text_ids, token_windows


def seeded_split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(calib, eval)`` of a seeded permutation of ``range(n)``; disjoint and covering."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(n * eval_fraction)) if n > 1 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


@dataclass
class TextCorpus:
    """Running text. Tokens ``[0, eval_tokens)`` are the evaluation split and tokens from
    ``calib_start`` on the calibration (and training) split, so the two never overlap."""

    name: str
    text: str
    eval_tokens: int = 8192
    calib_start: int | None = None
    kind: str = "text"
    _cache: dict = field(default_factory=dict, repr=False)

    def tokens(self, tokenizer) -> torch.Tensor:
        """The text tokens of the whole text (no special tokens; :meth:`windows` adds the BOS)."""
        return self._cached("tokens", tokenizer, lambda: torch.tensor(text_ids(tokenizer, self.text), dtype=torch.long))

    def bos(self, tokenizer) -> int | None:
        """The BOS id that starts every window under ``tokenizer`` (:func:`~leanml.data.tokens.bos_id`)."""
        return self._cached("bos", tokenizer, lambda: bos_id(tokenizer))

    def _cached(self, what: str, tokenizer, compute):
        # The tokenizer is kept with its entry, so its id cannot be reused by another one while cached.
        key = (what, id(tokenizer))
        hit = self._cache.get(key)
        if hit is None or hit[0] is not tokenizer:
            hit = self._cache[key] = (tokenizer, compute())
        return hit[1]

    def split_range(self, tokenizer, split: str) -> tuple[int, int]:
        n = len(self.tokens(tokenizer))
        eval_end = min(self.eval_tokens, n // 2)
        start = self.calib_start if self.calib_start is not None else eval_end
        if split == "eval":
            return 0, eval_end
        if split in ("calib", "train"):
            return max(start, eval_end), n
        raise LeanmlError(f"unknown split {split!r}; accepted: eval, calib, train")

    def windows(self, tokenizer, split: str = "eval", window: int = 512, limit: int | None = None) -> list[torch.Tensor]:
        """Non-overlapping windows of ``window`` tokens from ``split`` (a short tail is kept if ≥ 2 tokens).

        When the tokenizer adds a BOS token, each window is the BOS and ``window - 1`` text tokens
        (:func:`~leanml.data.tokens.token_windows`)."""
        lo, hi = self.split_range(tokenizer, split)
        out = token_windows(self.tokens(tokenizer)[lo:hi], window, self.bos(tokenizer))
        if not out:
            raise LeanmlError(f"data {self.name!r} has too few tokens for a {split} split ({hi - lo} tokens)")
        return out[:limit] if limit else out

    def documents(self, split: str = "eval") -> list[str]:
        """Paragraphs of the text (blank-line or line separated), split by position like the tokens; a
        text of fewer than 8 paragraphs is cut into sentences instead, so both splits hold documents."""
        docs = [d.strip() for d in self.text.replace("\r\n", "\n").split("\n") if d.strip()]
        if len(docs) < 8:
            docs = [d.strip() for d in re.split(r"(?<=[.!?])\s+", " ".join(docs)) if d.strip()]
        cut = max(1, len(docs) // 4)
        return docs[:cut] if split == "eval" else docs[cut:]


@dataclass
class TextRecords:
    """Texts with optional integer labels; a seeded half is the evaluation split."""

    name: str
    texts: list[str]
    labels: list[int] | None = None
    seed: int = 0
    eval_fraction: float = 0.5
    kind: str = "records"

    def indices(self, split: str) -> list[int]:
        calib, evals = seeded_split(len(self.texts), self.eval_fraction, self.seed)
        return evals if split == "eval" else calib

    def documents(self, split: str = "eval") -> list[str]:
        return [self.texts[i] for i in self.indices(split)]

    def labelled(self, split: str = "eval") -> tuple[list[str], list[int]]:
        if self.labels is None:
            raise LeanmlError(f"data {self.name!r} has no labels")
        idx = self.indices(split)
        return [self.texts[i] for i in idx], [self.labels[i] for i in idx]


@dataclass
class SimilarityPairs:
    """Texts, pairs ``(i, j)`` of them and a human similarity score per pair.

    The evaluation split is the scored pairs; ``calib_texts`` are separate texts for calibration.
    """

    name: str
    texts: list[str]
    pairs: list[tuple[int, int]]
    scores: list[float]
    calib_texts: list[str] = field(default_factory=list)
    kind: str = "pairs"

    def documents(self, split: str = "eval") -> list[str]:
        if split == "eval":
            return self.texts
        if not self.calib_texts:
            raise LeanmlError(f"data {self.name!r} has no calibration texts")
        return self.calib_texts


@dataclass
class TensorData:
    """Input tensors ``x`` (first dim = items) with optional labels ``y``; seeded evaluation split."""

    name: str
    x: torch.Tensor
    y: torch.Tensor | None = None
    seed: int = 0
    eval_fraction: float = 0.2
    kind: str = "tensors"

    def __post_init__(self) -> None:
        if len(self.x) == 0:
            raise LeanmlError(f"data {self.name!r} holds no items")
        if self.y is not None and len(self.y) != len(self.x):
            raise LeanmlError(f"data {self.name!r}: {len(self.x)} inputs but {len(self.y)} labels")

    def indices(self, split: str) -> list[int]:
        calib, evals = seeded_split(len(self.x), self.eval_fraction, self.seed)
        return evals if split == "eval" else calib

    def tensors(self, split: str = "eval") -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.tensor(self.indices(split))
        return self.x[idx], (self.y[idx] if self.y is not None else None)


Dataset = TextCorpus | TextRecords | SimilarityPairs | TensorData
