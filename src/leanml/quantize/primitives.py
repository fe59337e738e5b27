"""Quantization math as pure functions on tensors.

Affine (integer) quantization follows ``q = clip(round(x / scale + zero_point), qmin, qmax)`` and
``x_hat = (q - zero_point) * scale``. Rounding is round-half-to-even (``torch.round``).

Range conventions (the integrator must keep these when packing codes):

* asymmetric: unsigned codes ``[0, 2**bits - 1]``; the observed range is widened to include 0 so that
  0.0 is exactly representable; the zero point is an integer in the code range.
* symmetric: signed codes ``[-2**(bits-1), 2**(bits-1) - 1]`` with zero point 0 and
  ``scale = absmax / (2**(bits-1) - 1)``, so ``+absmax`` and ``-absmax`` are both exact and the extra
  negative code ``-2**(bits-1)`` is only reached by values below ``-absmax`` (clipped inputs).

Zero points are stored as integer-valued float tensors (same dtype as the scale); codes are ``int32``.
A zero range never yields a zero scale (the scale falls back to 1.0).

Nothing here touches ``nn.Module``; module surgery lives elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanml.errors import LeanmlError

MIN_BITS = 2
MAX_BITS = 8
CODE_DTYPE = torch.int32
GRANULARITIES = ("tensor", "channel", "group")
FLOAT_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class QParams:
    """Affine quantization parameters.

    ``scale``/``zero_point`` have shape ``()`` per tensor, ``x.shape`` with 1 everywhere but ``axis`` per
    channel, and ``(rows, cols // group_size)`` per group (groups run along the last axis of a 2-D x).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    symmetric: bool
    axis: int | None = None
    group_size: int | None = None

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


def check_bits(bits: int, low: int = MIN_BITS, high: int = MAX_BITS) -> None:
    """Raise LeanmlError unless ``bits`` is an int in ``[low, high]``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise LeanmlError(f"bits {bits!r} is not supported; use an integer from {low} to {high}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` for the given bit width and mode."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else dtype
    return dtype


def _guard_scale(scale: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(scale.dtype).tiny
    return torch.where(scale > tiny, scale, torch.ones_like(scale))


def compute_qparams(
    xmin: torch.Tensor | float,
    xmax: torch.Tensor | float,
    bits: int,
    symmetric: bool,
    *,
    axis: int | None = None,
    group_size: int | None = None,
) -> QParams:
    """Scale and zero point that map ``[xmin, xmax]`` (widened to include 0) onto the code range."""
    qmin, qmax = qrange(bits, symmetric)
    xmin, xmax = torch.as_tensor(xmin), torch.as_tensor(xmax)
    dtype = _float_dtype(xmin, xmax)
    xmin, xmax = xmin.to(dtype).clamp(max=0), xmax.to(dtype).clamp(min=0)
    if not bool(torch.isfinite(xmin).all() and torch.isfinite(xmax).all()):
        raise LeanmlError("xmin/xmax contain inf or nan; the range to quantize must be finite")
    if symmetric:
        scale = _guard_scale(torch.maximum(-xmin, xmax) / qmax)
        zero = torch.zeros_like(scale)
    else:
        scale = _guard_scale((xmax - xmin) / (qmax - qmin))
        zero = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return QParams(scale, zero, bits, symmetric, axis, group_size)


def _broadcastable(qp: QParams, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point expanded so that they broadcast against ``x``."""
    if qp.group_size is None:
        return qp.scale, qp.zero_point
    if x.dim() != 2 or x.shape[1] != qp.scale.shape[-1] * qp.group_size:
        raise LeanmlError(
            f"tensor of shape {tuple(x.shape)} does not match per-group qparams of shape "
            f"{tuple(qp.scale.shape)} with group_size {qp.group_size}; expected a 2-D tensor "
            f"with {qp.scale.shape[-1] * qp.group_size} columns"
        )
    gs = qp.group_size
    return qp.scale.repeat_interleave(gs, dim=-1), qp.zero_point.repeat_interleave(gs, dim=-1)


def _scaled(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``x / scale + zero_point`` (before rounding), in the promoted float dtype."""
    scale, zero = _broadcastable(qp, x)
    dtype = torch.promote_types(x.dtype, scale.dtype) if x.is_floating_point() else scale.dtype
    return x.to(dtype) / scale.to(dtype) + zero.to(dtype)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes ``clip(round(x / s + z), qmin, qmax)`` as int32."""
    return torch.round(_scaled(x, qp)).clamp(qp.qmin, qp.qmax).to(CODE_DTYPE)


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float values ``(q - z) * s`` (in the scale's dtype unless ``dtype`` is given)."""
    scale, zero = _broadcastable(qp, q)
    out = (q.to(scale.dtype) - zero) * scale
    return out if dtype is None else out.to(dtype)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize, returned in ``x``'s dtype."""
    return dequantize(quantize(x, qp), qp, dtype=x.dtype)


def _check_axis(axis: int, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise LeanmlError(f"axis {axis!r} is out of range for a {ndim}-D tensor; use -{ndim}..{ndim - 1}")
    return axis % ndim


def check_group_size(group_size: int, cols: int, axis: int = 1) -> int:
    """Validate that ``group_size`` is a positive int dividing ``cols`` (the size of ``axis``)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise LeanmlError(f"group_size {group_size!r} is not a positive integer")
    if cols % group_size:
        raise LeanmlError(f"group_size {group_size} does not divide {cols} (the size of axis {axis})")
    return group_size


def _channel_minmax(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != axis]
    if not dims:
        return x, x
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def qparams_for(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str = "tensor",
    axis: int = 0,
    group_size: int | None = None,
) -> QParams:
    """Min/max qparams for ``x`` per tensor, per channel along ``axis``, or per group.

    "group" needs a 2-D ``x`` (a weight ``(out, in)``); groups are ``group_size`` consecutive elements of
    the last (input) axis, which ``group_size`` must divide.
    """
    check_bits(bits)
    if granularity not in GRANULARITIES:
        raise LeanmlError(f"granularity {granularity!r} is not supported; use one of {GRANULARITIES}")
    if x.numel() == 0:
        raise LeanmlError("cannot compute qparams for an empty tensor; pass at least one element")
    if group_size is not None and granularity != "group":
        raise LeanmlError(f"group_size {group_size} needs granularity 'group', not {granularity!r}")
    if granularity == "tensor":
        return compute_qparams(x.min(), x.max(), bits, symmetric)
    if granularity == "channel":
        ax = _check_axis(axis, x.dim())
        xmin, xmax = _channel_minmax(x, ax)
        return compute_qparams(xmin, xmax, bits, symmetric, axis=ax)
    if x.dim() != 2:
        raise LeanmlError(f"per-group qparams need a 2-D weight, got shape {tuple(x.shape)}")
    gs = group_size if group_size is not None else x.shape[1]
    check_group_size(gs, x.shape[1])
    xg = x.reshape(x.shape[0], x.shape[1] // gs, gs)
    return compute_qparams(xg.amin(-1), xg.amax(-1), bits, symmetric, axis=1, group_size=gs)


def default_clip_ratios(steps: int = 80, min_ratio: float = 0.2) -> list[float]:
    """Shrink ratios ``1.0, ..., min_ratio`` (descending, ``steps + 1`` values) for MSE clip search."""
    return [1.0 - i * (1.0 - min_ratio) / steps for i in range(steps + 1)]


CLIP_CHUNK_ELEMENTS = 1 << 20  # rows of the MSE clip search at a time (~12 MB of buffers; fastest measured)


def mse_clip_range(
    x2d: torch.Tensor,
    bits: int,
    symmetric: bool,
    ratios: Sequence[float] | None = None,
    xmin: torch.Tensor | None = None,
    xmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise clip range ``(r * xmin, r * xmax)`` with r from ``ratios`` minimising the row's squared
    fake-quantization error. Ties keep the earlier (larger, for the default grid) ratio.

    ``xmin``/``xmax`` default to the row min/max; pass them when ``x2d`` is a subsample of the data.
    Rows are searched in chunks of about :data:`CLIP_CHUNK_ELEMENTS` elements (each row on its own, so
    the result does not depend on the chunking), which bounds the search's temporaries for a large weight.
    """
    if x2d.dim() != 2:
        raise LeanmlError(f"mse_clip_range needs a 2-D tensor (rows, samples), got {tuple(x2d.shape)}")
    xmin = (x2d.amin(1) if xmin is None else xmin).clamp(max=0)
    xmax = (x2d.amax(1) if xmax is None else xmax).clamp(min=0)
    grid = default_clip_ratios() if ratios is None else list(ratios)
    step = max(1, CLIP_CHUNK_ELEMENTS // max(1, x2d.shape[1]))
    parts = [
        _clip_search(x2d[i : i + step], bits, symmetric, grid, xmin[i : i + step], xmax[i : i + step])
        for i in range(0, x2d.shape[0], step)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _clip_search(x2d, bits, symmetric, grid, xmin, xmax) -> tuple[torch.Tensor, torch.Tensor]:
    """The search of :func:`mse_clip_range` on one chunk of rows. Each candidate's fake quantization
    runs in place in one buffer (no temporaries per candidate); the arithmetic is that of
    :func:`compute_qparams` and :func:`fake_quantize`, op for op, so the errors are the same."""
    qmin, qmax = qrange(bits, symmetric)
    best_err = torch.full_like(xmin, math.inf, dtype=torch.float64)
    best_min, best_max = xmin.clone(), xmax.clone()
    dtype = _float_dtype(x2d, xmin)
    x = x2d.to(dtype)
    buf = torch.empty_like(x)
    for r in grid:
        lo, hi = r * xmin, r * xmax
        qp = compute_qparams(lo[:, None], hi[:, None], bits, symmetric)
        scale, zero = qp.scale.to(dtype), qp.zero_point.to(dtype)
        torch.div(x, scale, out=buf)
        buf.add_(zero).round_().clamp_(qmin, qmax).sub_(zero).mul_(scale)
        deq = buf if buf.dtype == x2d.dtype else buf.to(x2d.dtype)  # a half-precision input: fake_quantize's cast
        deq.sub_(x2d)
        err = deq.double().square_().sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min, best_max = torch.where(better, lo, best_min), torch.where(better, hi, best_max)
    return best_min, best_max


def cast_float(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round ``x`` to fp16 or bf16 (round-to-nearest-even) and return it in ``x``'s dtype.

    IEEE semantics are kept: values beyond the fp16 range (65504) become inf.
    """
    if fmt not in FLOAT_FORMATS:
        raise LeanmlError(f"float format {fmt!r} is not supported; use one of {tuple(FLOAT_FORMATS)}")
    return x.to(FLOAT_FORMATS[fmt]).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Power-of-two (log2) quantization
# ----------------------------------------------------------------------------------------------------


def log2_quantize(x: torch.Tensor, bits: int, max_exponent: int | None = None) -> tuple[torch.Tensor, int]:
    """Sign + exponent quantization (Miyashita et al. 2016, "LogQuant").

    One bit is the sign; the other ``bits - 1`` give ``m = 2**(bits-1) - 1`` non-zero magnitudes
    ``2**e`` for ``e`` in ``[max_exponent - m + 1, max_exponent]`` plus an exact zero. The exponent is
    ``round(log2|x|)`` (rounded in the log domain), clamped above at ``max_exponent``; values whose rounded
    exponent falls below the smallest level become 0. ``max_exponent`` defaults to
    ``round(log2(max|x|))``. Returns int32 codes ``sign * magnitude_index`` in ``[-m, m]`` (0 means zero)
    and the ``max_exponent`` needed by :func:`log2_dequantize`.
    """
    check_bits(bits)
    m = 2 ** (bits - 1) - 1
    if max_exponent is None:
        amax = x.detach().abs().max().double()
        max_exponent = int(torch.round(torch.log2(amax)).item()) if amax > 0 else 0
    e_min = max_exponent - m + 1
    e = torch.round(torch.log2(x.detach().abs().double()))
    mag = (e - e_min + 1).clamp(max=m)
    mag = torch.where(mag >= 1, mag, torch.zeros_like(mag))
    return (torch.sign(x.detach()).double() * mag).to(CODE_DTYPE), max_exponent


def log2_dequantize(codes: torch.Tensor, bits: int, max_exponent: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values ``sign(code) * 2**(max_exponent - m + |code|)`` (0 for code 0)."""
    check_bits(bits)
    m = 2 ** (bits - 1) - 1
    mag = codes.abs().to(torch.float64)
    val = torch.exp2(mag + (max_exponent - m))
    return torch.where(codes == 0, torch.zeros_like(val), torch.sign(codes).double() * val).to(dtype)


# ----------------------------------------------------------------------------------------------------
# NF4 (4-bit NormalFloat)
# ----------------------------------------------------------------------------------------------------


def nf4_levels(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023), computed from normal quantiles.

    Positive half: 8 quantiles of N(0, 1) at probabilities evenly spaced from ``offset`` down to 0.5
    (the 0.5 end, i.e. 0, dropped); negative half: 7 such quantiles, mirrored. ``offset`` is the mean of
    ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``, which keeps the extreme quantile finite. With the exact zero
    added, the 16 values are normalised to ``[-1, 1]``.
    """
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64))[:-1]
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64))[:-1]
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.abs().max()).to(dtype)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise LeanmlError(f"block_size {block_size!r} is not a positive integer")
    if x.numel() % block_size:
        raise LeanmlError(f"block_size {block_size} does not divide {x.numel()} (the number of elements)")
    return x.reshape(-1, block_size)


def nf4_quantize(x: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax NF4: returns int32 codes (0..15, shape of x) and the per-block absmax.

    Each element maps to the nearest NF4 level of ``x / absmax(block)``; exact midpoints go to the lower
    level. Blocks are consecutive elements of the flattened tensor.
    """
    xb = _blocks(x.detach(), block_size).to(_float_dtype(x))
    absmax = xb.abs().amax(1)
    levels = nf4_levels(xb.dtype)
    mids = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(xb / _guard_scale(absmax)[:, None], mids)
    return codes.to(CODE_DTYPE).reshape(x.shape), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """``level[code] * absmax(block)`` in ``absmax``'s dtype, shape of ``codes``."""
    cb = _blocks(codes, block_size).long()
    return (nf4_levels(absmax.dtype)[cb] * absmax[:, None]).reshape(codes.shape)


# ----------------------------------------------------------------------------------------------------
# k-means codebook (weight clustering)
# ----------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    x = x.detach().to(_float_dtype(x))
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(_check_axis(axis, x.dim()), 0).reshape(x.shape[axis], -1).contiguous()


def _assign(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest (sorted) centroid per element; 1-D nearest = interval between midpoints."""
    mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, rows)


def _lloyd_step(rows: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Means of the cells; an empty cell's centroid moves to the row's worst-represented value."""
    sums = torch.zeros_like(centroids).scatter_add_(1, codes, rows)
    counts = torch.zeros_like(centroids).scatter_add_(1, codes, torch.ones_like(rows))
    new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    err = (centroids.gather(1, codes) - rows).pow(2)
    worst = err.max(1)
    empty = counts == 0
    first_empty = empty & (empty.cumsum(1) == 1) & (worst.values > 0)[:, None]
    far = rows.gather(1, worst.indices[:, None]).expand_as(new)
    return torch.where(first_empty, far, new).sort(dim=1).values


def _lloyd(rows: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        new = _lloyd_step(rows, centroids, _assign(rows, centroids))
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def _row_sse(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (centroids.gather(1, _assign(rows, centroids)) - rows).pow(2).sum(1)


def kmeans_quantize(x: torch.Tensor, bits: int, axis: int | None = None, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd) codebook quantization with ``2**bits`` centroids (weight clustering).

    ``axis=None``: one codebook for the tensor, shape ``(k,)``; ``axis=a``: one codebook per slice along
    ``a`` (e.g. 0 = per output channel), shape ``(x.shape[a], k)``. Lloyd runs from two deterministic
    inits - the data quantiles ``(i + 0.5) / k`` and ``k`` evenly spaced values from min to max (the
    "linear" init of Han et al. 2016) - and each row keeps the result with the lower squared error.
    Centroids are kept sorted; an empty cluster is re-seeded at the value with the largest error; at most
    ``iters`` iterations.
    Lloyd is a local method: the result is a fixed point, not always the global optimum.
    Returns int32 codes (shape of x) and the codebook (float32 or float64).
    """
    check_bits(bits, 1, MAX_BITS)
    if x.numel() == 0:
        raise LeanmlError("cannot build a k-means codebook for an empty tensor")
    rows = _rows(x, axis)
    k, n = 2**bits, rows.shape[1]
    idx = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)
    by_quantile = _lloyd(rows, rows.sort(dim=1).values[:, idx], iters)
    steps = torch.linspace(0, 1, k, dtype=rows.dtype)[None, :]
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    by_linear = _lloyd(rows, lo + (hi - lo) * steps, iters)
    better = (_row_sse(rows, by_linear) < _row_sse(rows, by_quantile))[:, None]
    centroids = torch.where(better, by_linear, by_quantile)
    codes = _assign(rows, centroids).to(CODE_DTYPE)
    if axis is None:
        return codes.reshape(x.shape), centroids[0]
    moved = x.movedim(axis, 0).shape
    return codes.reshape(moved).movedim(0, axis), centroids


def kmeans_dequantize(codes: torch.Tensor, codebook: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Look codes up in a per-tensor ``(k,)`` or per-slice ``(channels, k)`` codebook."""
    if axis is None:
        return codebook[codes.long()]
    ax = _check_axis(axis, codes.dim())
    moved = codes.movedim(ax, 0)
    flat = moved.reshape(moved.shape[0], -1).long()
    return codebook.gather(1, flat).reshape(moved.shape).movedim(0, ax)


# ----------------------------------------------------------------------------------------------------
# Straight-through estimator
# ----------------------------------------------------------------------------------------------------


class FakeQuantSTE(torch.autograd.Function):
    """Fake quantization whose backward is the straight-through estimator.

    The gradient passes unchanged where ``x`` lies inside the clipping range
    ``[(qmin - z) * s, (qmax - z) * s]`` (i.e. ``qmin <= x / s + z <= qmax`` before rounding) and is 0
    outside. ``scale``/``zero_point`` get no gradient. Use ``FakeQuantSTE.apply(x, qparams)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, qp: QParams) -> torch.Tensor:  # type: ignore[override]
        t = _scaled(x, qp)
        ctx.save_for_backward((t >= qp.qmin) & (t <= qp.qmax))
        return dequantize(torch.round(t).clamp(qp.qmin, qp.qmax), qp, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None


def fake_quantize_ste(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Differentiable :func:`fake_quantize` with a straight-through gradient."""
    return FakeQuantSTE.apply(x, qp)
