"""Per-input-channel scaling math: AWQ scale search and SmoothQuant migration scales.

A linear layer ``y = X Wᵀ`` is unchanged when its input channels are rescaled: ``(X / s)(W · s)ᵀ = X Wᵀ``
with ``W · s = W * s[None, :]``. The ``1 / s`` is folded into whatever produces X (the previous linear
layer's output rows or a norm's weight/bias, see :func:`fold_scale_into_producer`).

* AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization") picks
  ``s = mean|x|^alpha`` (normalised) with alpha from a grid minimising ``||X Wᵀ - (X / s) Q(W · s)ᵀ||²``.
* SmoothQuant (Xiao et al. 2022) uses ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` to move activation
  outliers into the weights before W8A8 quantization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from leanml.errors import LeanmlError

MIN_STAT = 1e-8


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise LeanmlError(f"alpha {alpha!r} is out of range; use a value in [0, 1]")


def _check_vector(s: torch.Tensor, n: int, name: str) -> None:
    if s.dim() != 1 or s.numel() != n:
        raise LeanmlError(f"{name} has shape {tuple(s.shape)}; expected ({n},), one value per input channel")


def apply_input_scale(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W · s``: multiply input column j of ``W (out, in)`` by ``s[j]``."""
    _check_vector(s, W.shape[-1], "s")
    return W * s.to(W.dtype)


def remove_input_scale(W_scaled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_input_scale` (exact when s holds powers of two, else within 1 ulp)."""
    _check_vector(s, W_scaled.shape[-1], "s")
    return W_scaled / s.to(W_scaled.dtype)


def scale_inputs(X: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``X / s`` along the last (channel) axis: the input that pairs with ``apply_input_scale(W, s)``."""
    _check_vector(s, X.shape[-1], "s")
    return X / s.to(X.dtype)


def fold_scale_into_producer(
    weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divide the producer of X by s: a norm's ``weight (in,)`` / a linear's ``weight (in, k)`` rows and
    the ``bias (in,)``, so that the producer now outputs ``X / s``."""
    _check_vector(s, weight.shape[0], "s")
    sw = s.to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))
    return weight / sw, None if bias is None else bias / s.to(bias.dtype)


def awq_scales(act_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = m^alpha / sqrt(max(m^alpha) * min(m^alpha))`` with ``m = max(mean|x|, 1e-8)``.

    The normalisation centres s around 1 (geometric mean of its extremes); alpha=0 gives s == 1.
    """
    _check_alpha(alpha)
    s = act_mean_abs.clamp(min=MIN_STAT).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def awq_grid_losses(
    W: torch.Tensor,
    X: torch.Tensor,
    quantize_fn: Callable[[torch.Tensor], torch.Tensor],
    alphas: Sequence[float],
    act_mean_abs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||X Wᵀ - (X / s) quantize_fn(W · s)ᵀ||²`` for ``s = awq_scales(act_mean_abs, alpha)`` per alpha.

    ``quantize_fn`` maps a weight to its fake-quantized (dequantized) version, e.g.
    ``lambda w: rtn_quantize_weight(w, 4, 128).weight``. ``act_mean_abs`` defaults to ``mean |X|`` over
    rows (pass the statistic of a larger calibration set, e.g. ``HessianAccumulator.mean_abs``).
    """
    if W.dim() != 2 or X.dim() != 2 or X.shape[1] != W.shape[1]:
        raise LeanmlError(f"need W (out, in) and X (n, in); got {tuple(W.shape)} and {tuple(X.shape)}")
    dtype = torch.promote_types(torch.promote_types(W.dtype, X.dtype), torch.float32)
    W, X = W.detach().to(dtype), X.detach().to(dtype)
    m = X.abs().mean(0) if act_mean_abs is None else act_mean_abs.detach().to(dtype)
    _check_vector(m, W.shape[1], "act_mean_abs")
    ref = X @ W.T
    losses = []
    for alpha in alphas:
        s = awq_scales(m, alpha)
        out = scale_inputs(X, s) @ quantize_fn(apply_input_scale(W, s)).to(dtype).T
        losses.append(float((ref - out).double().pow(2).sum()))
    return torch.tensor(losses, dtype=torch.float64)


def awq_search_scale(
    W: torch.Tensor,
    X: torch.Tensor,
    quantize_fn: Callable[[torch.Tensor], torch.Tensor],
    n_grid: int = 20,
    act_mean_abs: torch.Tensor | None = None,
) -> torch.Tensor:
    """AWQ per-input-channel scales: the best of ``alpha = i / n_grid, i = 0..n_grid`` (ties: smaller
    alpha). Because alpha=0 (s == 1) is on the grid, the result is never worse than no scaling on X."""
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise LeanmlError(f"n_grid {n_grid!r} is not a positive integer")
    alphas = [i / n_grid for i in range(n_grid + 1)]
    dtype = torch.promote_types(torch.promote_types(W.dtype, X.dtype), torch.float32)
    m = (X.detach().abs().mean(0) if act_mean_abs is None else act_mean_abs.detach()).to(dtype)
    losses = awq_grid_losses(W, X, quantize_fn, alphas, m)
    return awq_scales(m, alphas[int(torch.argmin(losses))])


def smoothquant_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant migration scales ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, clamped to ``>= eps``.

    ``weight_absmax[j]`` is the max over output rows of ``|W[:, j]|`` (over all layers fed by X, e.g.
    q/k/v concatenated). Channels with a zero activation or weight max get ``s = 1``. Apply with
    ``scale_inputs(X, s)`` / ``fold_scale_into_producer`` and ``apply_input_scale(W, s)``.
    """
    _check_alpha(alpha)
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise LeanmlError(
            f"act_absmax {tuple(act_absmax.shape)} and weight_absmax {tuple(weight_absmax.shape)} "
            "must be 1-D with one value per input channel"
        )
    if bool((act_absmax < 0).any() or (weight_absmax < 0).any()):
        raise LeanmlError("act_absmax and weight_absmax are absolute maxima and must be >= 0")
    a, w = act_absmax.double(), weight_absmax.double()
    s = (a.clamp(min=eps).pow(alpha) / w.clamp(min=eps).pow(1.0 - alpha)).clamp(min=eps)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.to(torch.promote_types(act_absmax.dtype, torch.float32))
