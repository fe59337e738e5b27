"""Unit-level importance for structured pruning: pure functions on tensors.

A *unit* is what structured pruning removes as a whole: a conv filter (output channel), an FFN neuron,
an attention head, a key/value group. Its weights are slices of several tensors: rows of the layers that
produce it, columns of the layers that read it, per-channel parameters in between. A slice is described
by ``(tensor, axis)``: the units lie along ``axis`` in contiguous, equal chunks (a channel read by a
Linear after a flatten owns ``H*W`` consecutive input features; a head owns ``head_dim`` consecutive
rows), so ``tensor.size(axis) == n_units * chunk``.

* :func:`unit_sum` - sum of a per-weight score over every weight of each unit;
* :func:`unit_magnitude` - ``L1`` (``sum |w|``) or ``L2`` (``sqrt(sum w²)``) norm of all of a unit's weights
  across its slices (Li et al. 2017, "Pruning Filters for Efficient ConvNets", ranked filters by L1);
* :func:`unit_taylor` - first-order Taylor importance ``sum over the unit of |w * dL/dw|`` (Molchanov et al.
  2017/2019), from per-weight Taylor scores;
* :func:`unit_activation` - mean ``|a|`` of the features a unit owns, from per-feature activation scores;
* :func:`units_to_remove` - how many units a ratio removes; :func:`lowest_units` - which ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leanml.errors import LeanmlError

from .criteria import magnitude
from .masks import n_removed

Slice = tuple[torch.Tensor, int]


def unit_sum(score: torch.Tensor, axis: int, n_units: int) -> torch.Tensor:
    """``(n_units,)`` float64 sums of ``score`` over the contiguous chunk of ``axis`` each unit owns (and
    every other axis)."""
    if not -score.dim() <= axis < score.dim():
        raise LeanmlError(f"axis {axis} does not exist in a tensor of shape {tuple(score.shape)}")
    size = score.shape[axis]
    if n_units < 1 or size % n_units:
        raise LeanmlError(f"{n_units} units do not split an axis of size {size} into equal chunks")
    return score.detach().movedim(axis, 0).reshape(n_units, -1).to(torch.float64).sum(1)


def _sum_slices(scores: Sequence[Slice], n_units: int) -> torch.Tensor:
    if not scores:
        raise LeanmlError("a unit needs at least one weight slice to be scored")
    parts = [unit_sum(t, axis, n_units) for t, axis in scores]
    return torch.stack(parts).sum(0)


def unit_magnitude(slices: Sequence[Slice], n_units: int, p: int = 1) -> torch.Tensor:
    """Norm of every unit's weights across ``slices``: ``sum |w|`` (p=1) or ``sqrt(sum w²)`` (p=2).
    float64, shape ``(n_units,)``."""
    total = _sum_slices([(magnitude(t, p), axis) for t, axis in slices], n_units)
    return total if p == 1 else total.sqrt()


def unit_taylor(scores: Sequence[Slice], n_units: int) -> torch.Tensor:
    """First-order Taylor importance of each unit: the sum of the per-weight scores ``|w * dL/dw|``
    (:func:`leanml.prune.criteria.taylor`) over its slices. float64, shape ``(n_units,)``."""
    for t, _ in scores:
        if bool((t < 0).any()):
            raise LeanmlError("Taylor scores must be >= 0 (|w * dL/dw|); pass criteria.taylor's output")
    return _sum_slices(scores, n_units)


def unit_activation(feature_scores: Sequence[torch.Tensor], n_units: int) -> torch.Tensor:
    """Mean over each unit's features of per-feature activation scores (e.g. mean ``|a|`` from
    :func:`leanml.prune.criteria.activation_importance`), averaged over the places the unit is read
    (one 1-D tensor per consuming layer). float64, shape ``(n_units,)``."""
    if not feature_scores:
        raise LeanmlError("a unit needs activations from at least one layer to be scored")
    parts = []
    for s in feature_scores:
        if s.dim() != 1:
            raise LeanmlError(f"per-feature activation scores must be 1-D, got shape {tuple(s.shape)}")
        chunk = s.numel() // n_units if n_units and s.numel() % n_units == 0 else 0
        if not chunk:
            raise LeanmlError(f"{s.numel()} activation features do not split into {n_units} equal units")
        parts.append(unit_sum(s, 0, n_units) / chunk)
    return torch.stack(parts).mean(0)


def units_to_remove(ratio: float, n_units: int, what: str) -> int:
    """``round_half_up(ratio * n_units)``; a ratio that would remove every unit of ``what`` is an error."""
    k = n_removed(ratio, n_units)
    if k >= n_units:
        raise LeanmlError(
            f"ratio {ratio} would remove all {n_units} units of {what}; use a smaller ratio or leave it out with ignore"
        )
    return k


def lowest_units(scores: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """``(removed, kept)``: the ``k`` lowest-scoring unit indices and the others, both ascending. Ties are
    broken by position (the lower index is removed first), like :mod:`leanml.prune.masks`."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise LeanmlError(f"unit scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise LeanmlError("unit scores contain nan; every unit needs a comparable importance")
    if not 0 <= k < scores.numel():
        raise LeanmlError(f"cannot remove {k} of {scores.numel()} units; at least one must stay")
    order = torch.sort(scores.detach().cpu(), stable=True).indices.tolist()
    removed = sorted(order[:k])
    kept = sorted(order[k:])
    return removed, kept
