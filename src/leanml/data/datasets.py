"""Dataset types with explicit, seeded, disjoint splits.

Every kind has four splits that never overlap:

* ``eval`` (also called ``test``) - what ``profile`` and ``compress`` report, and what ``optimize``
  scores once for the original, the chosen model and the Pareto front;
* ``select`` - what ``optimize`` scores every candidate on (the search selects on it, so it never
  reports it as the model's quality);
* ``check`` - a small held-out part of the calibration domain, for label-free fidelity checks;
* ``calib`` (also called ``train``) - calibration and training data.

* :class:`TextCorpus` - running text for causal LMs, split by token position.
* :class:`TextRecords` - texts with optional labels, split by a seeded permutation.
* :class:`SimilarityPairs` - texts, pairs of them and human similarity scores, split by text.
* :class:`TensorData` - input tensors with optional labels, split by a seeded permutation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import LeanmlError
from .tokens import bos_id, text_ids, token_windows

SPLITS = ("eval", "test", "select", "check", "calib", "train")
SPLIT_NAMES = "eval (or test), select, check, calib (or train)"
CHECK_FRACTION = 0.1  # of what is left after the evaluation and selection splits
CHECK_MAX = 64  # items (or texts) in the check split at most


def _split_name(split: str) -> str:
    """The canonical name of ``split`` (``test`` is ``eval``, ``train`` is ``calib``)."""
    if split not in SPLITS:
        raise LeanmlError(f"unknown split {split!r}; accepted: {SPLIT_NAMES}")
    return {"test": "eval", "train": "calib"}.get(split, split)


def seeded_split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(rest, eval)`` of :func:`seeded_splits`: its evaluation split and everything else."""
    parts = seeded_splits(n, eval_fraction, seed)
    return sorted(parts["select"] + parts["check"] + parts["calib"]), parts["eval"]


def seeded_splits(n: int, eval_fraction: float, seed: int) -> dict[str, list[int]]:
    """Indices of the four splits of ``range(n)`` (sorted, disjoint, covering).

    The evaluation split is the one :func:`seeded_split` gives (so evaluation figures do not depend on
    the other splits); of the rest, as many as the evaluation split (at most half) are the selection
    split, a tenth of what remains (at most
    :data:`CHECK_MAX`) the check split and the remainder the calibration split. With fewer than 4
    items left after evaluation, all of them stay calibration (there is no selection split)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(n * eval_fraction)) if n > 1 else 0
    rest = order[n_eval:]
    n_sel = min(n_eval, len(rest) // 2) if len(rest) >= 4 else 0
    n_chk = min(CHECK_MAX, max(1, round((len(rest) - n_sel) * CHECK_FRACTION))) if n_sel else 0
    return {
        "eval": sorted(order[:n_eval]),
        "select": sorted(rest[:n_sel]),
        "check": sorted(rest[n_sel : n_sel + n_chk]),
        "calib": sorted(rest[n_sel + n_chk :]),
    }


@dataclass
class TextCorpus:
    """Running text, split by token position: ``[0, e)`` is the evaluation split (``e`` = ``eval_tokens``,
    at most half the text), then the selection split up to ``calib_start`` (or as long as the
    evaluation split, at most a third of what follows it), then the calibration (and training) split,
    whose last tenth (at most ``eval_tokens // 2`` tokens) is held out as the check split."""

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
        """``(start, end)`` token positions of ``split``."""
        split = _split_name(split)
        n = len(self.tokens(tokenizer))
        eval_end = min(self.eval_tokens, n // 2)
        if self.calib_start is not None and self.calib_start > eval_end:
            select_end = min(self.calib_start, n)
        else:
            select_end = eval_end + min(eval_end, (n - eval_end) // 3)
        check = min(self.eval_tokens // 2, (n - select_end) // 10)
        ranges = {
            "eval": (0, eval_end),
            "select": (eval_end, select_end),
            "calib": (select_end, n - check),
            "check": (n - check, n),
        }
        return ranges[split]

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
        """Paragraphs of the text (blank-line or line separated), split by position like the tokens: the
        first quarter is the evaluation split, the next quarter the selection split, and of the rest a
        tenth at its end (at most 64) the check split; a text of fewer than 8 paragraphs is cut into
        sentences instead, so every split holds documents."""
        split = _split_name(split)
        docs = [d.strip() for d in self.text.replace("\r\n", "\n").split("\n") if d.strip()]
        if len(docs) < 8:
            docs = [d.strip() for d in re.split(r"(?<=[.!?])\s+", " ".join(docs)) if d.strip()]
        cut = max(1, len(docs) // 4)
        sel = cut + (cut if len(docs) - cut >= 4 else 0)
        chk = min(CHECK_MAX, (len(docs) - sel) // 10)
        parts = {
            "eval": docs[:cut],
            "select": docs[cut:sel],
            "calib": docs[sel : len(docs) - chk],
            "check": docs[len(docs) - chk :],
        }
        return parts[split]


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
        return seeded_splits(len(self.texts), self.eval_fraction, self.seed)[_split_name(split)]

    def documents(self, split: str = "eval") -> list[str]:
        return [self.texts[i] for i in self.indices(split)]

    def labelled(self, split: str = "eval") -> tuple[list[str], list[int]]:
        if self.labels is None:
            raise LeanmlError(f"data {self.name!r} has no labels")
        idx = self.indices(split)
        return [self.texts[i] for i in idx], [self.labels[i] for i in idx]


def split_pairs(n_texts: int, pairs: list[tuple[int, int]], seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the pairs of the evaluation and of the selection split, so that no text is in both.

    Pairs that share a text form groups (connected components). A group holding more than a quarter of
    all pairs (e.g. every pair of 50 documents) has its texts split into two halves (a seeded
    breadth-first order cut in the middle): pairs within one half go to that half's split, pairs
    across the halves to neither. Smaller groups go whole to
    the split that has fewer pairs so far, in a seeded order.
    """
    parent = list(range(n_texts))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(pairs):
        groups.setdefault(find(i), []).append(k)
    members = list(groups.values())
    gen = torch.Generator().manual_seed(seed)
    out: tuple[list[int], list[int]] = ([], [])
    for g in torch.randperm(len(members), generator=gen).tolist():
        ks = members[g]
        texts = sorted({t for k in ks for t in pairs[k]})
        if len(ks) > len(pairs) // 4 and len(texts) >= 4:
            first = set(_breadth_first(texts, [pairs[k] for k in ks], gen)[: len(texts) // 2])
            for k in ks:
                inside = [t in first for t in pairs[k]]
                if all(inside):
                    out[0].append(k)
                elif not any(inside):
                    out[1].append(k)
        else:
            out[0 if len(out[0]) <= len(out[1]) else 1].extend(ks)
    return sorted(out[0]), sorted(out[1])


def _breadth_first(texts: list[int], pairs: list[tuple[int, int]], gen: torch.Generator) -> list[int]:
    """The texts of one connected group in breadth-first order from a seeded start, neighbours in a
    seeded order: the first half of it is a connected piece, so cutting there drops few pairs of a
    chain and a seeded half of a complete graph."""
    nbrs: dict[int, list[int]] = {t: [] for t in texts}
    for i, j in pairs:
        nbrs[i].append(j)
        nbrs[j].append(i)
    start = texts[int(torch.randint(len(texts), (1,), generator=gen))]
    order, seen, k = [start], {start}, 0
    while k < len(order):
        around = nbrs[order[k]]
        for p in torch.randperm(len(around), generator=gen).tolist():
            if around[p] not in seen:
                seen.add(around[p])
                order.append(around[p])
        k += 1
    return order


@dataclass
class SimilarityPairs:
    """Texts, pairs ``(i, j)`` of them and a human similarity score per pair.

    The scored pairs are split by text (:func:`split_pairs`) into the evaluation and the selection
    split; ``calib_texts`` are separate texts for calibration, whose last tenth (at most 64) is the
    check split.
    """

    name: str
    texts: list[str]
    pairs: list[tuple[int, int]]
    scores: list[float]
    calib_texts: list[str] = field(default_factory=list)
    seed: int = 0
    kind: str = "pairs"
    _groups: tuple | None = field(default=None, repr=False)

    def pair_indices(self, split: str = "eval") -> list[int]:
        """Indices into :attr:`pairs` of the scored pairs of ``split`` (``eval`` or ``select``)."""
        split = _split_name(split)
        if split not in ("eval", "select"):
            raise LeanmlError(f"data {self.name!r}: scored pairs belong to the eval and select splits, not {split!r}")
        if self._groups is None:
            self._groups = split_pairs(len(self.texts), self.pairs, self.seed)
        return self._groups[0 if split == "eval" else 1]

    def scored(self, split: str = "eval") -> tuple[list[str], list[tuple[int, int]], list[float]]:
        """``(texts, pairs, scores)`` of ``split``, the pairs indexing into those texts."""
        ks = self.pair_indices(split)
        used = sorted({t for k in ks for t in self.pairs[k]})
        where = {t: n for n, t in enumerate(used)}
        pairs = [(where[self.pairs[k][0]], where[self.pairs[k][1]]) for k in ks]
        return [self.texts[t] for t in used], pairs, [self.scores[k] for k in ks]

    def documents(self, split: str = "eval") -> list[str]:
        split = _split_name(split)
        if split in ("eval", "select"):
            return self.scored(split)[0]
        n_chk = min(CHECK_MAX, len(self.calib_texts) // 10)
        if split == "check":
            return self.calib_texts[len(self.calib_texts) - n_chk :]
        if not self.calib_texts:
            raise LeanmlError(f"data {self.name!r} has no calibration texts")
        return self.calib_texts[: len(self.calib_texts) - n_chk]


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
        return seeded_splits(len(self.x), self.eval_fraction, self.seed)[_split_name(split)]

    def tensors(self, split: str = "eval") -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.tensor(self.indices(split))
        return self.x[idx], (self.y[idx] if self.y is not None else None)


Dataset = TextCorpus | TextRecords | SimilarityPairs | TensorData
