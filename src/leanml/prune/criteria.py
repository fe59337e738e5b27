"""Importance scores for pruning: pure functions on tensors (a larger score means "keep").

Every score has the shape of the weight it ranks (``(out, in)`` for a linear layer), except
:func:`activation_importance`, which scores neurons (one value per feature). Scores are float32 or
float64 (the promoted dtype of the inputs) and never negative.

* :func:`magnitude` - ``|w|^p`` (Han et al. 2015; ``p=2`` ranks the same, but adds differently across
  layers in a global ranking).
* :func:`gradient_importance` - ``mean_b |dL/dw|_b`` over batches.
* :func:`taylor` - first-order Taylor estimate of the loss change when a weight is zeroed,
  ``|w * dL/dw|`` (Molchanov et al. 2017/2019), averaged over batches when per-batch gradients are given.
* :func:`activation_importance` - per-neuron mean ``|a|`` or L2 norm of the activations.
* :func:`wanda` - ``|w_ij| * ||x_j||_2`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for
  Large Language Models"), with ``||x_j||`` the L2 norm of input feature j over the calibration tokens
  (:func:`input_norms` computes it from batches of inputs, :func:`input_norms_from_hessian` from a
  Hessian ``c * XᵀX``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from leanml.errors import LeanmlError

TensorOrBatches = torch.Tensor | Sequence[torch.Tensor]


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _batches(x: TensorOrBatches, what: str) -> list[torch.Tensor]:
    """A list of tensors from a list/tuple (one per batch) or one tensor whose axis 0 indexes batches."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise LeanmlError(f"{what} must have a batch axis or be a list of per-batch tensors, got a scalar")
        items = list(x.unbind(0))
    elif isinstance(x, Iterable):
        items = list(x)
    else:
        raise LeanmlError(f"{what} must be a tensor or a list of tensors, got {type(x).__name__}")
    if not items:
        raise LeanmlError(f"{what} is empty; pass at least one batch")
    shape = items[0].shape
    for t in items:
        if not isinstance(t, torch.Tensor):
            raise LeanmlError(f"{what} must hold tensors, got {type(t).__name__}")
        if t.shape != shape:
            raise LeanmlError(f"{what} mixes shapes {tuple(shape)} and {tuple(t.shape)}")
    return items


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise LeanmlError(f"{what} contains inf or nan")


def magnitude(w: torch.Tensor, p: int = 1) -> torch.Tensor:
    """``|w| ** p`` elementwise (``p`` = 1 or 2)."""
    if p not in (1, 2) or isinstance(p, bool):
        raise LeanmlError(f"magnitude norm p={p!r} is not supported; use 1 or 2")
    a = _float(w).abs()
    return a if p == 1 else a * a


def gradient_importance(grads: TensorOrBatches) -> torch.Tensor:
    """Mean over batches of ``|dL/dw|``: ``grads`` is a list of per-batch gradients (or a tensor whose
    axis 0 indexes batches)."""
    items = _batches(grads, "grads")
    total = torch.zeros_like(_float(items[0]))
    for g in items:
        total += _float(g).abs()
    out = total / len(items)
    _check_finite(out, "grads")
    return out


def taylor(w: torch.Tensor, grad: TensorOrBatches) -> torch.Tensor:
    """First-order Taylor importance ``|w * dL/dw|``.

    ``grad`` is either one gradient of ``w``'s shape (already accumulated over batches) or a list of
    per-batch gradients, in which case the result is ``mean_b |w * g_b|`` (the per-batch estimates are
    accumulated in absolute value, so opposite-signed batches do not cancel).
    """
    wf = _float(w)
    items = [grad] if isinstance(grad, torch.Tensor) and grad.shape == w.shape else _batches(grad, "grad")
    if items[0].shape != w.shape:
        raise LeanmlError(f"gradient shape {tuple(items[0].shape)} does not match the weight's {tuple(w.shape)}")
    total = torch.zeros_like(wf)
    for g in items:
        total += (wf * _float(g)).abs()
    out = total / len(items)
    _check_finite(out, "taylor importance")
    return out


def activation_importance(acts: TensorOrBatches, reduce: str = "mean") -> torch.Tensor:
    """Per-neuron importance from activations ``(..., features)`` (or a list of such batches).

    ``reduce="mean"``: mean of ``|a|`` over every token/sample; ``"norm"``: the L2 norm over them.
    """
    if reduce not in ("mean", "norm"):
        raise LeanmlError(f"activation reduce {reduce!r} is not supported; use 'mean' or 'norm'")
    items = [acts] if isinstance(acts, torch.Tensor) else list(acts)
    if not items:
        raise LeanmlError("acts is empty; pass at least one batch of activations")
    features = items[0].shape[-1] if items[0].dim() else 0
    if features == 0:
        raise LeanmlError(f"activations of shape {tuple(items[0].shape)} have no feature axis")
    acc = None
    n = 0
    for a in items:
        if a.dim() == 0 or a.shape[-1] != features:
            raise LeanmlError(f"activations of shape {tuple(a.shape)} do not have {features} features")
        rows = _float(a).reshape(-1, features)
        part = rows.abs().sum(0) if reduce == "mean" else (rows * rows).sum(0)
        acc = part if acc is None else acc + part.to(acc.dtype)
        n += rows.shape[0]
    if n == 0:
        raise LeanmlError("acts holds no rows")
    out = acc / n if reduce == "mean" else acc.sqrt()
    _check_finite(out, "activations")
    return out


def input_norms(xs: TensorOrBatches) -> torch.Tensor:
    """``||x_j||_2`` per input feature j over every row of the inputs ``(..., in)`` (or a list of them)."""
    return activation_importance(xs, reduce="norm")


def input_norms_from_hessian(H: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``||x_j||_2`` from a Hessian ``H = c * XᵀX``: ``sqrt(diag(H) / c)`` with ``scale = c`` (e.g. ``2 / n``
    for :class:`~leanml.calibrate.hessian.HessianAccumulator`). A common ``scale`` does not change a
    per-layer Wanda ranking."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise LeanmlError(f"Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not scale > 0:
        raise LeanmlError(f"Hessian scale {scale!r} must be > 0")
    return (_float(H).diagonal().clamp(min=0) / scale).sqrt()


def wanda(w: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda score ``|w_ij| * ||x_j||`` for a weight ``(out, in)`` and input-feature norms ``(in,)``."""
    if w.dim() != 2:
        raise LeanmlError(f"wanda needs a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if x_norm.dim() != 1 or x_norm.numel() != w.shape[1]:
        raise LeanmlError(f"input norms of shape {tuple(x_norm.shape)} do not match the weight's {w.shape[1]} inputs")
    xf = _float(x_norm)
    if bool((xf < 0).any()):
        raise LeanmlError("input norms must be >= 0")
    out = _float(w).abs() * xf.to(torch.promote_types(xf.dtype, _float(w).dtype))[None, :]
    _check_finite(out, "wanda score")
    return out
