"""Pruning masks from importance scores: pure functions on tensors.

A mask is a ``torch.bool`` tensor of the scores' shape; ``True`` means the weight is KEPT. Lower scores
are removed first, and equal scores are broken deterministically by position: a stable sort on the
row-major flattened scores, so among equal scores the one with the lower flat index (lower layer first
in a global ranking) is removed first, and in an N:M group the earlier column is kept.

Counts are exact: a fraction ``s`` of ``n`` weights removes ``round_half_up(s * n)`` of them
(:func:`n_removed`).

* :func:`unstructured_mask` - per layer (one comparison group: the whole tensor).
* :func:`row_mask` - per output row (Wanda's comparison group).
* :func:`global_masks` - one ranking (one threshold) over every layer.
* :func:`nm_mask` - N:M semi-structured: in every group of ``m`` consecutive input columns exactly ``n``
  are kept (2:4 is what sparse tensor cores run).
* :func:`cubic_schedule` - the gradual sparsity schedule of Zhu & Gupta 2017 ("To prune, or not to
  prune").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from leanml.errors import LeanmlError


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """``sparsity`` as a float in [0, 1), else a :class:`LeanmlError`."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise LeanmlError(f"{what} {sparsity!r} is out of range; use a fraction in [0, 1) (e.g. 0.5)")
    return float(sparsity)


def check_nm(n: int, m: int) -> tuple[int, int]:
    """``(n, m)`` of an N:M pattern (keep n of every m, ``0 < n < m``), else a :class:`LeanmlError`."""
    for v in (n, m):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LeanmlError(f"N:M pattern {n!r}:{m!r} needs integers n < m (e.g. 2:4)")
    if not 0 < n < m:
        raise LeanmlError(f"N:M pattern {n}:{m} is not accepted; keep n of every m with 0 < n < m (e.g. 2:4)")
    return n, m


def n_removed(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a fraction ``sparsity`` removes: ``floor(sparsity * numel + 1/2)``."""
    return min(numel, int(math.floor(check_sparsity(sparsity) * numel + 0.5)))


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.numel() == 0:
        raise LeanmlError("scores must be a non-empty tensor")
    if bool(torch.isnan(scores).any()):
        raise LeanmlError("scores contain nan; every weight needs a comparable importance")
    return scores.detach()


def _remove_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 1-D score vector with its ``k`` lowest entries removed (stable: lower index first)."""
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        keep[order[:k]] = False
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing exactly ``n_removed(sparsity, scores.numel())`` lowest-scoring entries."""
    scores = _check_scores(scores)
    k = n_removed(sparsity, scores.numel())
    return _remove_lowest(scores.reshape(-1), k).reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing ``n_removed(sparsity, cols)`` lowest scores in every output row (axis 0 indexes
    rows; the other axes are flattened), so every row has the same sparsity (Wanda's comparison group)."""
    scores = _check_scores(scores)
    if scores.dim() < 2:
        raise LeanmlError(f"row_mask needs scores with an output axis and inputs, got shape {tuple(scores.shape)}")
    rows = scores.reshape(scores.shape[0], -1)
    k = n_removed(sparsity, rows.shape[1])
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k > 0:
        order = torch.sort(rows, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :k], False)
    return keep.reshape(scores.shape)


def global_masks(scores_by_layer: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks for every layer from ONE ranking of all scores (a single global threshold): exactly
    ``n_removed(sparsity, total)`` weights are removed overall; layers may end up with any sparsity.

    Scores must be comparable across layers (e.g. magnitudes, or Taylor scores of one loss).
    """
    if not scores_by_layer:
        raise LeanmlError("global_masks needs at least one layer of scores")
    names = list(scores_by_layer)
    tensors = [_check_scores(scores_by_layer[n]) for n in names]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    keep = _remove_lowest(flat, n_removed(sparsity, flat.numel()))
    out, start = {}, 0
    for name, t in zip(names, tensors, strict=True):
        out[name] = keep[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive input columns of every row, the ``n`` largest
    scores are kept (exactly ``n`` per group; ties keep the earlier column).

    ``scores`` is ``(out, in)`` (other axes after the first are flattened into the input axis, in
    memory order); the flattened input width must be a multiple of ``m``.
    """
    n, m = check_nm(n, m)
    scores = _check_scores(scores)
    if scores.dim() < 2:
        raise LeanmlError(f"nm_mask needs scores of shape (out, in), got {tuple(scores.shape)}")
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise LeanmlError(f"N:M pattern {n}:{m} needs an input width divisible by {m}, got {rows.shape[1]}")
    groups = rows.reshape(rows.shape[0], -1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(scores.shape)


def sparsity_of(mask: torch.Tensor) -> float:
    """Fraction of removed entries of a keep-mask."""
    return 1.0 - float(mask.sum()) / max(1, mask.numel())


def cubic_schedule(step: int, total: int, final_sparsity: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) cubic schedule: ``s_t = s_f + (s_i - s_f) * (1 - t / total) ** 3`` for
    ``t = clamp(step, 0, total)``: ``initial`` at step 0, ``final_sparsity`` from step ``total`` on, pruning
    fast early (when many weights are redundant) and slowly near the end."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise LeanmlError(f"schedule length {total!r} is not a positive integer")
    if isinstance(step, bool) or not isinstance(step, int):
        raise LeanmlError(f"schedule step {step!r} is not an integer")
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    s_i = check_sparsity(initial, "initial sparsity")
    if s_i > s_f:
        raise LeanmlError(f"initial sparsity {s_i} is above final_sparsity {s_f}")
    t = min(max(step, 0), total)
    return s_f + (s_i - s_f) * (1.0 - t / total) ** 3


def select_masks(
    scores_by_layer: Mapping[str, torch.Tensor],
    comparison: str,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks for every layer by ``comparison``: ``layer`` (:func:`unstructured_mask`), ``row``
    (:func:`row_mask`), ``global`` (:func:`global_masks`) or ``nm`` (:func:`nm_mask` with ``n``/``m``)."""
    if comparison == "nm":
        return {k: nm_mask(s, n, m) for k, s in scores_by_layer.items()}
    if comparison == "global":
        return global_masks(scores_by_layer, sparsity)
    if comparison == "row":
        return {k: row_mask(s, sparsity) for k, s in scores_by_layer.items()}
    if comparison == "layer":
        return {k: unstructured_mask(s, sparsity) for k, s in scores_by_layer.items()}
    raise LeanmlError(f"comparison group {comparison!r} is not supported; use layer, row, global or nm")


def outlier_ratio(score: torch.Tensor, m: float = 5.0) -> float:
    """Fraction of entries of a (Wanda) score matrix above ``m`` times its mean: how much of the layer
    is "outlier" weight (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", OWL)."""
    s = score.detach().double()
    return float((s > m * s.mean()).double().mean())


def owl_sparsities(ratios: dict[str, float], sizes: dict[str, int], target: float, lam: float) -> dict[str, float]:
    """Per-layer sparsities from outlier ratios (OWL): layers with more outliers are pruned less. The
    ratios are mapped linearly onto ``[target - lam, target + lam]`` (most outliers → least sparse), then
    shifted so that the weight-count-weighted mean is exactly ``target``; the result is clipped to
    ``[0, 0.99]``. ``lam = 0`` gives the uniform allocation."""
    if not 0 <= lam < 1:
        raise LeanmlError(f"OWL lambda {lam!r} is out of range; use 0 <= lambda < 1 (e.g. 0.08)")
    names = list(ratios)
    r = torch.tensor([ratios[n] for n in names], dtype=torch.float64)
    n = torch.tensor([sizes[k] for k in names], dtype=torch.float64)
    spread = r.max() - r.min()
    unit = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)
    s = target + lam - 2 * lam * unit  # most outliers -> target - lam
    s = s + (target - (s * n).sum() / n.sum())
    s = s.clamp(0.0, 0.99)
    return {k: float(v) for k, v in zip(names, s, strict=True)}
