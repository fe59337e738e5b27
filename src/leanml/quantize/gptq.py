"""Weight quantization: round-to-nearest (RTN) baseline and GPTQ (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers").

Both return a :class:`QuantizedWeight` whose integer ``codes`` (int32, ``(out, in)``, ORIGINAL column
order), ``scales`` and ``zero_points`` (``(out, n_groups)``) and ``g_idx`` (group of each input column)
satisfy exactly::

    weight == dequantize_groups(codes, scales, zero_points, g_idx).to(W.dtype)

Group layout: without ``act_order`` (and always with static groups) ``g_idx[j] == j // group_size``,
i.e. contiguous groups in the stored order. With ``act_order`` and ``static_groups=False`` the groups
are formed in processing order: column ``perm[k]`` belongs to group ``k // group_size`` (the "desc_act"
``g_idx`` layout), so kernels must gather scales through ``g_idx``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanml.errors import LeanmlError
from leanml.quantize.primitives import (
    CODE_DTYPE,
    check_bits,
    check_group_size,
    compute_qparams,
    mse_clip_range,
    qrange,
)


@dataclass(frozen=True)
class QuantizedWeight:
    """Result of RTN/GPTQ weight quantization (see the module docstring for the layout)."""

    weight: torch.Tensor  # dequantized, original column order, dtype of the input W
    codes: torch.Tensor  # int32 (out, in), original column order
    scales: torch.Tensor  # (out, n_groups)
    zero_points: torch.Tensor  # (out, n_groups), integer-valued floats (0 when symmetric)
    g_idx: torch.Tensor  # int64 (in,), group index of each input column
    perm: torch.Tensor | None  # act_order processing order (column indices), None otherwise
    bits: int
    symmetric: bool
    group_size: int  # == in_features for per-output-channel quantization


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """``(codes - zero_points[:, g_idx]) * scales[:, g_idx]`` in the scales' dtype."""
    return (codes.to(scales.dtype) - zero_points[:, g_idx]) * scales[:, g_idx]


def group_qparams(
    W: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int,
    mse_clip: bool = False,
    ratios: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-contiguous-group scales and zero points, each ``(rows, cols // group_size)``.

    ``mse_clip`` shrinks each group's min/max by the ratio (grid ``ratios``, default 1.0..0.2) that
    minimises that group's squared rounding error; otherwise plain min/max.
    """
    rows, cols = W.shape
    check_group_size(group_size, cols)
    flat = W.reshape(rows * (cols // group_size), group_size)
    if mse_clip:
        lo, hi = mse_clip_range(flat, bits, symmetric, ratios)
    else:
        lo, hi = flat.amin(1), flat.amax(1)
    qp = compute_qparams(lo, hi, bits, symmetric)
    shape = (rows, cols // group_size)
    return qp.scale.to(W.dtype).reshape(shape), qp.zero_point.to(W.dtype).reshape(shape)


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.promote_types(W.dtype, torch.float32)


def _check_weight(W: torch.Tensor, bits: int, group_size: int | None) -> int:
    check_bits(bits)
    if W.dim() != 2 or W.numel() == 0:
        raise LeanmlError(f"weight must be a non-empty 2-D (out, in) tensor, got shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise LeanmlError("weight contains inf or nan; only finite weights can be quantized")
    return W.shape[1] if group_size is None else check_group_size(group_size, W.shape[1])


def _round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.round(w / scale + zero).clamp(qmin, qmax)


def rtn_quantize_weight(
    W: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    mse_clip: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest baseline: per-output-channel (``group_size=None``) or per-group qparams.

    Rows are independent, so a large weight is done :data:`RTN_CHUNK_ELEMENTS` at a time (the same
    result): the temporaries of one chunk, not of the whole weight, sit beside the outputs."""
    gs = _check_weight(W, bits, group_size)
    rows, cols = W.shape
    g_idx = torch.arange(cols) // gs
    step = max(1, RTN_CHUNK_ELEMENTS // cols)
    work = _work_dtype(W)
    weight = torch.empty(rows, cols, dtype=W.dtype)
    codes = torch.empty(rows, cols, dtype=CODE_DTYPE)
    scales = torch.empty(rows, cols // gs, dtype=work)
    zeros = torch.empty(rows, cols // gs, dtype=work)
    for i in range(0, rows, step):
        Wf = W[i : i + step].detach().to(work)
        s, z = group_qparams(Wf, bits, symmetric, gs, mse_clip)
        c = _round_codes(Wf, s[:, g_idx], z[:, g_idx], *qrange(bits, symmetric)).to(CODE_DTYPE)
        weight[i : i + step] = dequantize_groups(c, s, z, g_idx).to(W.dtype)
        codes[i : i + step], scales[i : i + step], zeros[i : i + step] = c, s, z
    return QuantizedWeight(weight, codes, scales, zeros, g_idx, None, bits, symmetric, gs)


RTN_CHUNK_ELEMENTS = 1 << 22  # weights rounded at a time by rtn_quantize_weight (its temporaries: ~16 MB each)


def inverse_hessian_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of ``(H + damp * mean(diag H) * I)^-1`` (float64), so ``Hinv = U^T U``.

    Row ``j`` of U, divided by ``U[j, j]``, is the OBS update direction for quantizing column j after
    columns ``< j`` are fixed.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise LeanmlError(f"Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not damp >= 0:
        raise LeanmlError(f"damp {damp!r} is out of range; use a fraction >= 0 of mean(diag H) (e.g. 0.01)")
    H = H.detach().to(torch.float64).clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise LeanmlError(f"Hessian is not positive definite with damp {damp}; use a larger damp (e.g. 0.1)")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise LeanmlError(f"inverse Hessian is numerically singular with damp {damp}; use a larger damp")
    return U


def obs_column_update(W: torch.Tensor, U: torch.Tensor, j: int, q: torch.Tensor) -> torch.Tensor:
    """One OBS step: set column j to ``q`` and move the error onto columns ``> j`` optimally.

    Returns ``W - ((W[:, j] - q) / U[j, j]) outer U[j, :]`` (columns ``< j`` are untouched because U is
    upper triangular; column j becomes exactly ``q`` up to rounding).
    """
    err = (W[:, j] - q) / U[j, j]
    return W - err[:, None] * U[j, :].to(W.dtype)[None, :]


@dataclass
class _Plan:
    """Everything the GPTQ loop needs besides the weight (processing order)."""

    U: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    col_group: torch.Tensor  # processing position -> group index
    dynamic: bool  # compute group qparams when the first column of a group is reached
    group_size: int
    block_size: int


def _gptq_loop(W: torch.Tensor, plan: _Plan, bits: int, symmetric: bool, mse_clip: bool) -> torch.Tensor:
    """Quantize W (processing order, modified in place) column by column with lazy block updates."""
    rows, cols = W.shape
    qmin, qmax = qrange(bits, symmetric)
    codes = torch.empty(rows, cols, dtype=CODE_DTYPE)
    gs, U = plan.group_size, plan.U
    for i1 in range(0, cols, plan.block_size):
        i2 = min(i1 + plan.block_size, cols)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            k = i1 + i
            if plan.dynamic and k % gs == 0:  # block_size is a multiple of gs: the group is in W1, current
                s, z = group_qparams(W[:, k : k + gs], bits, symmetric, gs, mse_clip)
                plan.scales[:, k // gs], plan.zeros[:, k // gs] = s[:, 0], z[:, 0]
            g = plan.col_group[k]
            q = _round_codes(W1[:, i], plan.scales[:, g], plan.zeros[:, g], qmin, qmax)
            codes[:, k] = q.to(CODE_DTYPE)
            err = (W1[:, i] - (q - plan.zeros[:, g]) * plan.scales[:, g]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes


def _plan(
    W: torch.Tensor,
    U: torch.Tensor,
    perm: torch.Tensor,
    bits: int,
    symmetric: bool,
    mse_clip: bool,
    gs: int,
    static: bool,
    block_size: int,
) -> _Plan:
    """Group qparams/layout. Static: contiguous groups of the ORIGINAL order, computed up front on W
    (original order); dynamic: groups of the processing order, computed during the loop."""
    rows, cols = W.shape
    if static:
        scales, zeros = group_qparams(W, bits, symmetric, gs, mse_clip)
        return _Plan(U, scales, zeros, perm // gs, False, gs, block_size)
    ng = cols // gs
    scales, zeros = torch.empty(rows, ng, dtype=W.dtype), torch.empty(rows, ng, dtype=W.dtype)
    block = max(1, block_size // gs) * gs
    return _Plan(U, scales, zeros, torch.arange(cols) // gs, True, gs, block)


def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool | None = None,
    mse_clip: bool = False,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022) of a linear weight ``W (out, in)`` given ``H (in, in)`` = 2/n XᵀX.

    * dampening: ``damp * mean(diag H)`` is added to the diagonal;
    * dead inputs (``H[j, j] == 0``) are zeroed in W and get ``H[j, j] = 1``;
    * ``act_order`` processes columns by decreasing ``diag H`` (dead columns last);
    * ``group_size=None`` means one (min/max or MSE-clipped) range per output row, computed up front;
    * groups: ``static_groups`` (default: ``act_order``) computes every group's qparams up front on the
      original-order W (contiguous layout); otherwise qparams of each group are computed from the
      error-updated weights when its first column is reached (``block_size`` is then rounded to a
      multiple of ``group_size`` so that a group never spans two lazy-update blocks);
    * the lazy block update of width ``block_size`` is an exact reordering of the column-by-column OBS
      updates.
    """
    gs = _check_weight(W, bits, group_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise LeanmlError(f"block_size {block_size!r} is not a positive integer")
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise LeanmlError(f"Hessian shape {tuple(H.shape)} does not match the weight's {cols} input columns")
    if not bool(torch.isfinite(H).all()):
        raise LeanmlError("Hessian contains inf or nan; accumulate it from finite calibration inputs")
    Wf = W.detach().to(_work_dtype(W)).clone()
    H = H.detach().to(torch.float64).clone()
    diag = H.diagonal().clone()
    dead = diag == 0
    H[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(cols)
    static = True if group_size is None else (act_order if static_groups is None else static_groups)
    U = inverse_hessian_cholesky(H[perm][:, perm], damp).to(Wf.dtype)
    plan = _plan(Wf, U, perm, bits, symmetric, mse_clip, gs, static, block_size)
    codes_p = _gptq_loop(Wf[:, perm].contiguous(), plan, bits, symmetric, mse_clip)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    g_idx = torch.empty(cols, dtype=torch.long)
    g_idx[perm] = plan.col_group
    weight = dequantize_groups(codes, plan.scales, plan.zeros, g_idx).to(W.dtype)
    return QuantizedWeight(weight, codes, plan.scales, plan.zeros, g_idx, perm if act_order else None, bits, symmetric, gs)
