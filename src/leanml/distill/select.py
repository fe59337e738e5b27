"""Data selection to cut distillation cost: drop duplicates, score items by the teacher, keep a fraction.

* :func:`exact_duplicates` / :func:`near_duplicates` / :func:`dedup` - indices of repeated texts
  (normalised equality; MinHash over word shingles with LSH banding, confirmed by the signature estimate).
* :func:`teacher_scores` - per-item teacher loss or predictive entropy (how informative an item is).
* :func:`select` - the indices of a fraction of the items: hardest, easiest, random or as a curriculum.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LeanmlError, check
from ..models.handle import ModelHandle, output_tensor
from ..progress import progress

PRIME = (1 << 31) - 1  # Mersenne prime; hashes and permutation parameters stay below it so a*h+b fits in int64
KINDS = ("loss", "entropy")
ORDERS = ("hard", "easy", "random", "curriculum")

_PUNCT = re.compile(r"[^\w\s]+")


def normalise_text(text: str) -> str:
    """Lowercase, remove punctuation and collapse runs of whitespace to one space."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def _check_texts(texts: Any) -> None:
    check(
        isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts),
        f"texts must be a list of strings, got {type(texts).__name__}",
    )


def exact_duplicates(texts: list[str]) -> list[int]:
    """Indices to drop: every later copy of a text whose normalised form was already seen."""
    _check_texts(texts)
    seen: set[str] = set()
    drop = []
    for i, text in enumerate(texts):
        key = normalise_text(text)
        if key in seen:
            drop.append(i)
        seen.add(key)
    return drop


def shingles(text: str, shingle: int = 5) -> set[str]:
    """The set of ``shingle``-word windows of the normalised text (the whole text if it is shorter)."""
    check(isinstance(shingle, int) and shingle >= 1, f"shingle must be an integer >= 1, got {shingle!r}")
    words = normalise_text(text).split()
    if len(words) <= shingle:
        return {" ".join(words)}
    return {" ".join(words[i : i + shingle]) for i in range(len(words) - shingle + 1)}


def jaccard(a: str, b: str, shingle: int = 5) -> float:
    """Exact Jaccard similarity of the shingle sets of ``a`` and ``b``."""
    sa, sb = shingles(a, shingle), shingles(b, shingle)
    return len(sa & sb) / len(sa | sb)


def _stable_hash(s: str) -> int:
    """A 64-bit hash that is the same in every process (unlike the salted built-in ``hash``), reduced mod PRIME."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % PRIME


def minhash_signatures(texts: list[str], num_perm: int = 64, shingle: int = 5, seed: int = 0) -> torch.Tensor:
    """MinHash signatures ``(N, num_perm)`` int64: per permutation ``(a*h + b) mod p``, the minimum over shingles."""
    _check_texts(texts)
    check(isinstance(num_perm, int) and num_perm >= 1, f"num_perm must be an integer >= 1, got {num_perm!r}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(1, PRIME, (num_perm,), generator=gen, dtype=torch.int64)
    b = torch.randint(0, PRIME, (num_perm,), generator=gen, dtype=torch.int64)
    sigs = torch.empty(len(texts), num_perm, dtype=torch.int64)
    for i, text in enumerate(progress(texts, "minhash")):
        h = torch.tensor([_stable_hash(s) for s in shingles(text, shingle)], dtype=torch.int64)
        sigs[i] = ((h[:, None] * a[None, :] + b[None, :]) % PRIME).min(dim=0).values
    return sigs


def estimate_jaccard(sig_a: torch.Tensor, sig_b: torch.Tensor) -> float:
    """The MinHash estimate of Jaccard similarity: the fraction of equal signature entries."""
    return (sig_a == sig_b).double().mean().item()


def _default_bands(num_perm: int, threshold: float) -> int:
    """The fewest bands (longest rows, fewest false candidates) that still catch a pair at ``threshold`` with p >= 0.99."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= 0.99:
            return bands
    return num_perm


def near_duplicates(
    texts: list[str], threshold: float = 0.8, num_perm: int = 64, shingle: int = 5, bands: int | None = None, seed: int = 0
) -> list[int]:
    """Indices to drop: texts whose estimated shingle Jaccard with an earlier kept text is >= ``threshold``.

    Candidates come from LSH banding of the MinHash signatures; each candidate is confirmed with the
    signature estimate. Greedy by index, so every dropped text is close to a kept one.
    """
    check(
        isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0, f"threshold must be a number in (0, 1], got {threshold!r}"
    )
    sigs = minhash_signatures(texts, num_perm=num_perm, shingle=shingle, seed=seed)
    if bands is None:
        bands = _default_bands(num_perm, float(threshold))
    check(
        isinstance(bands, int) and 1 <= bands <= num_perm, f"bands must be an integer in [1, num_perm={num_perm}], got {bands!r}"
    )
    rows = num_perm // bands
    buckets: dict[tuple, list[int]] = {}  # (band, row values) -> kept indices
    drop = []
    for i in range(len(texts)):
        keys = [(k, tuple(sigs[i, k * rows : (k + 1) * rows].tolist())) for k in range(bands)]
        candidates = sorted({j for key in keys for j in buckets.get(key, ())})
        if any(estimate_jaccard(sigs[i], sigs[j]) >= threshold for j in candidates):
            drop.append(i)
            continue
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return drop


def dedup(texts: list[str], near: bool = True, threshold: float = 0.8) -> tuple[list[int], dict]:
    """Kept indices (ascending) after dropping exact and, when ``near``, near duplicates; and a count report."""
    exact = set(exact_duplicates(texts))
    rest = [i for i in range(len(texts)) if i not in exact]
    near_drop = {rest[j] for j in near_duplicates([texts[i] for i in rest], threshold=threshold)} if near else set()
    kept = [i for i in rest if i not in near_drop]
    report = {"items": len(texts), "exact_duplicates": len(exact), "near_duplicates": len(near_drop), "kept": len(kept)}
    return kept, report


def _device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _from_logp(logp: torch.Tensor, target: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Per-position loss (``-log p[target]``) or entropy (``-sum p log p``) from log-probabilities (..., C)."""
    if kind == "loss":
        return -logp.gather(-1, target[..., None]).squeeze(-1)
    return -(logp.exp() * logp).sum(-1)


def _lm_scores(handle: ModelHandle, items: Any, kind: str, batch_size: int) -> torch.Tensor:
    ok = isinstance(items, (list, tuple)) and len(items) > 0
    check(
        ok and all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in items),
        f"items for causal-lm model {handle.name!r} must be a non-empty list of 1-D token-id tensors",
    )
    lengths = sorted({len(t) for t in items})
    check(len(lengths) == 1 and lengths[0] >= 2, f"token windows must all have one length >= 2, got lengths {lengths[:5]}")
    device, out = _device(handle.module), []
    for lo in progress(range(0, len(items), batch_size), "teacher scores"):
        ids = torch.stack(list(items[lo : lo + batch_size])).long().to(device)
        logp = F.log_softmax(output_tensor(handle.call(ids)).float()[:, :-1], dim=-1)
        out.append(_from_logp(logp, ids[:, 1:], kind).mean(dim=1).cpu())  # mean over the T-1 predicted positions
    return torch.cat(out)


def _labelled_scores(handle: ModelHandle, items: Any, kind: str, batch_size: int) -> torch.Tensor:
    if hasattr(items, "x") and hasattr(items, "y"):  # a TensorData
        items = (items.x, items.y)
    check(
        isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], torch.Tensor) and len(items[0]) > 0,
        f"items for {handle.task} model {handle.name!r} must be a tuple (x, y) of tensors, got {type(items).__name__}",
    )
    x, y = items
    check(
        y is not None or kind == "entropy",
        f"kind 'loss' needs labels y for model {handle.name!r}; accepted without labels: kind 'entropy'",
    )
    check(y is None or len(y) == len(x), f"x has {len(x)} items but y has {len(y) if y is not None else 0}")
    device, out = _device(handle.module), []
    for lo in progress(range(0, len(x), batch_size), "teacher scores"):
        logits = output_tensor(handle.call(x[lo : lo + batch_size].to(device))).float()
        check(logits.dim() == 2, f"model {handle.name!r} must return logits (batch, classes), got shape {tuple(logits.shape)}")
        target = y[lo : lo + batch_size].long().to(device) if y is not None else None
        out.append(_from_logp(F.log_softmax(logits, dim=-1), target, kind).cpu())
    return torch.cat(out)


def teacher_scores(handle: ModelHandle, items: Any, kind: str = "loss", batch_size: int = 8) -> torch.Tensor:
    """Per-item informativeness ``(N,)`` from the teacher: its loss on the item or its predictive entropy.

    Causal LM: ``items`` is a list of equal-length 1-D token-id tensors; the score is the mean over next-token
    positions. Classifier: ``items`` is ``(x, y)`` (or a TensorData); the score is per-sample.
    """
    check(kind in KINDS, f"kind {kind!r} is not accepted; accepted: {', '.join(KINDS)}")
    check(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be an integer >= 1, got {batch_size!r}")
    if handle.task == "sentence-embedding":
        raise LeanmlError(
            f"teacher_scores needs a model with logits, but {handle.name!r} is a sentence-embedding model; "
            "accepted: causal-lm or classifier models"
        )
    module, was_training = handle.module, handle.module.training
    module.eval()
    try:
        with torch.no_grad():
            if handle.task == "causal-lm":
                return _lm_scores(handle, items, kind, batch_size)
            return _labelled_scores(handle, items, kind, batch_size)
    finally:
        module.train(was_training)


def select(scores: torch.Tensor, fraction: float, order: str = "hard", seed: int = 0) -> list[int]:
    """Indices of ``round(fraction * N)`` items (at least 1).

    ``hard``: highest scores first; ``easy``: lowest first; ``random``: a seeded subset, ascending by index;
    ``curriculum``: the ``hard`` subset ordered from lowest to highest score (easy items first).
    """
    check(isinstance(scores, torch.Tensor) and scores.dim() == 1 and scores.numel() > 0, "scores must be a non-empty 1-D tensor")
    bad = int((~torch.isfinite(scores)).sum())
    check(bad == 0, f"scores hold {bad} non-finite values; accepted: finite numbers only")
    check(
        isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0.0 < fraction <= 1.0,
        f"fraction must be a number in (0, 1], got {fraction!r}",
    )
    check(order in ORDERS, f"order {order!r} is not accepted; accepted: {', '.join(ORDERS)}")
    n = scores.numel()
    k = min(n, max(1, round(fraction * n)))
    if order == "random":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return sorted(perm[:k].tolist())
    if order == "easy":
        return torch.argsort(scores, stable=True)[:k].tolist()
    hard = torch.argsort(scores, descending=True, stable=True)[:k]
    if order == "hard":
        return hard.tolist()
    return hard[torch.argsort(scores[hard], stable=True)].tolist()
