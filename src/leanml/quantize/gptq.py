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

    Computed with one factorization: with J the order-reversing permutation, ``J H J = M M^T`` (M lower)
    gives ``H^-1 = (J M^-1 J)^T (J M^-1 J)``, and ``J M^-1 J`` is upper triangular with a positive
    diagonal, hence U. One Cholesky and one triangular inverse instead of a Cholesky, an inverse from it
    and a second Cholesky (about half the work at the sizes of LLM layers).
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise LeanmlError(f"Hessian must be a square matrix, got shape {tuple(H.shape)}")
    return _reversed_inverse_factor(H.detach().flip(0, 1).to(torch.float64), damp).flip(0, 1)


def _reversed_inverse_factor(R: torch.Tensor, damp: float) -> torch.Tensor:
    """``M^-1`` for ``R + damp * mean(diag R) * I = M M^T`` (M lower), computed in ``R`` (float64; a
    Hessian in reversed processing order, overwritten): the memory of one matrix plus products of a
    quarter of it, however large the layer."""
    if not damp >= 0:
        raise LeanmlError(f"damp {damp!r} is out of range; use a fraction >= 0 of mean(diag H) (e.g. 0.01)")
    R.diagonal().add_(damp * R.diagonal().mean())
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(R, out=(R, info))  # in place; the upper triangle becomes 0
    if int(info) != 0:
        raise LeanmlError(f"Hessian is not positive definite with damp {damp}; use a larger damp (e.g. 0.1)")
    invert_lower_triangular_(R)
    if not bool(torch.isfinite(R).all()):
        raise LeanmlError(f"inverse Hessian is numerically singular with damp {damp}; use a larger damp")
    return R


TRIANGULAR_BASE = 256  # invert_lower_triangular_ solves blocks up to this size directly


def invert_lower_triangular_(L: torch.Tensor) -> torch.Tensor:
    """Invert a lower-triangular matrix in place by recursive halving: with ``L = [[A, 0], [C, B]]``,
    ``L^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``: A is inverted in place, ``C <- -B^-1 (C A^-1)`` by one
    product and one triangular solve (B still intact), then B in place. About half the arithmetic of
    solving ``L X = I``, and no second matrix of L's size. Returns L."""
    n = L.shape[0]
    if n <= TRIANGULAR_BASE:
        L.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False))
        return L
    h = (n // 2 + 63) // 64 * 64  # split on a multiple of 64 (aligned products) where there is room
    h = h if h < n else n // 2
    invert_lower_triangular_(L[:h, :h])
    L[h:, :h] = torch.linalg.solve_triangular(L[h:, h:], L[h:, :h] @ L[:h, :h], upper=False).neg_()
    invert_lower_triangular_(L[h:, h:])
    return L


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


GPTQ_SUB_BLOCK = 16  # columns per inner block of _gptq_loop (rank-1 updates stay inside it)


def _gptq_loop(W: torch.Tensor, plan: _Plan, bits: int, symmetric: bool, mse_clip: bool) -> torch.Tensor:
    """Quantize W (processing order, modified in place) column by column with lazy block updates.

    Two levels of laziness, both exact reorderings of the column-by-column OBS updates: a column's error
    is applied at once only inside its sub-block of :data:`GPTQ_SUB_BLOCK` columns, to the rest of its
    block of ``block_size`` columns by one product when the sub-block ends, and to the columns after the
    block by one product when the block ends. Sub-blocks end at group starts, so a dynamic group's
    qparams are computed on columns that hold every earlier column's update."""
    rows, cols = W.shape
    qmin, qmax = qrange(bits, symmetric)
    codes = torch.empty(rows, cols, dtype=CODE_DTYPE)
    gs, U = plan.group_size, plan.U
    for i1 in range(0, cols, plan.block_size):
        i2 = min(i1 + plan.block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)
        j1 = 0
        while j1 < i2 - i1:
            j2 = min(j1 + GPTQ_SUB_BLOCK, i2 - i1)
            if plan.dynamic:  # end the sub-block where the next group starts
                j2 = min(j2, ((i1 + j1) // gs + 1) * gs - i1)
            for i in range(j1, j2):
                k = i1 + i
                if plan.dynamic and k % gs == 0:  # block_size is a multiple of gs: the group is in W1, current
                    s, z = group_qparams(W1[:, i : i + gs], bits, symmetric, gs, mse_clip)
                    plan.scales[:, k // gs], plan.zeros[:, k // gs] = s[:, 0], z[:, 0]
                g = plan.col_group[k]
                q = _round_codes(W1[:, i], plan.scales[:, g], plan.zeros[:, g], qmin, qmax)
                codes[:, k] = q.to(CODE_DTYPE)
                err = (W1[:, i] - (q - plan.zeros[:, g]) * plan.scales[:, g]) / U1[i, i]
                W1[:, i:j2].addr_(err, U1[i, i:j2], alpha=-1)
                E1[:, i] = err
            if j2 < i2 - i1:
                W1[:, j2:].addmm_(E1[:, j1:j2], U1[j1:j2, j2:], alpha=-1)
            j1 = j2
        if i2 < cols:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
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


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ takes from a Hessian, computed once for every weight that reads the same input (q/k/v,
    gate/up): the processing order, the inputs that are never active, and the upper Cholesky factor of
    the damped inverse in that order."""

    U: torch.Tensor  # (in, in), processing order, in the dtype of the weights' arithmetic
    perm: torch.Tensor  # int64 (in,), processing order (identity without act_order)
    dead: torch.Tensor  # bool (in,), inputs with H[j, j] == 0
    act_order: bool
    damp: float


def factor_hessian(
    H: torch.Tensor, act_order: bool = False, damp: float = 0.01, dtype: torch.dtype = torch.float32
) -> HessianFactor:
    """The :class:`HessianFactor` of ``H`` (see :func:`gptq_quantize_weight` for dead inputs, the
    ``act_order`` order and dampening); U is computed in float64 and stored in ``dtype``."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise LeanmlError(f"Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise LeanmlError("Hessian contains inf or nan; accumulate it from finite calibration inputs")
    H = H.detach()
    diag = H.diagonal().to(torch.float64)
    dead = diag == 0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    # the reversed processing order directly (one gather per axis; see inverse_hessian_cholesky)
    rev = perm.flip(0)
    R = H.index_select(0, rev).index_select(1, rev).to(torch.float64)
    R.diagonal()[dead[rev]] = 1.0
    U = _reversed_inverse_factor(R, damp).to(dtype).flip(0, 1)
    return HessianFactor(U, perm, dead, bool(act_order), float(damp))


def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor | None,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool | None = None,
    mse_clip: bool = False,
    factor: HessianFactor | None = None,
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
      updates;
    * ``factor`` (from :func:`factor_hessian` with the same ``act_order`` and ``damp``) replaces ``H``:
      weights that share an input share one factorization. Rows are quantized independently given it,
      so any subset of W's rows gets the rows of the whole result.
    """
    gs = _check_weight(W, bits, group_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise LeanmlError(f"block_size {block_size!r} is not a positive integer")
    cols = W.shape[1]
    work = _work_dtype(W)
    if factor is None:
        if H is None or H.shape != (cols, cols):
            got = "no Hessian" if H is None else f"Hessian shape {tuple(H.shape)}"
            raise LeanmlError(f"{got} does not match the weight's {cols} input columns")
        factor = factor_hessian(H, act_order, damp, work)
    elif factor.U.shape != (cols, cols) or factor.act_order != bool(act_order) or factor.damp != float(damp):
        raise LeanmlError(
            f"the Hessian factor ({factor.U.shape[0]} inputs, act_order={factor.act_order}, damp={factor.damp}) "
            f"was not made for this weight ({cols} inputs, act_order={bool(act_order)}, damp={damp})"
        )
    Wf = W.detach().to(work).clone()
    Wf[:, factor.dead] = 0.0
    perm = factor.perm
    static = True if group_size is None else (act_order if static_groups is None else static_groups)
    plan = _plan(Wf, factor.U.to(work), perm, bits, symmetric, mse_clip, gs, static, block_size)
    if act_order:  # the loop works on its own copy in processing order; the original order is not needed
        Wf = Wf[:, perm].contiguous()
    codes_p = _gptq_loop(Wf, plan, bits, symmetric, mse_clip)
    del Wf
    if act_order:
        codes = torch.empty_like(codes_p)
        codes[:, perm] = codes_p
        del codes_p
    else:
        codes = codes_p
    g_idx = torch.empty(cols, dtype=torch.long)
    g_idx[perm] = plan.col_group
    weight = dequantize_groups(codes, plan.scales, plan.zeros, g_idx).to(W.dtype)
    return QuantizedWeight(weight, codes, plan.scales, plan.zeros, g_idx, perm if act_order else None, bits, symmetric, gs)
