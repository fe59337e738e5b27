"""GPTQ and RTN on a small linear layer with correlated calibration inputs."""

from __future__ import annotations

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.quantize.gptq import (
    QuantizedWeight,
    dequantize_groups,
    factor_hessian,
    gptq_quantize_weight,
    inverse_hessian_cholesky,
    obs_column_update,
    rtn_quantize_weight,
)
from leanml.quantize.primitives import fake_quantize, qparams_for


def layer(seed: int = 0, out: int = 32, inp: int = 64, n: int = 512):
    """W (out, in), correlated X = Z A with uneven channel scales, H = 2/n XᵀX (all float64)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, inp, generator=g, dtype=torch.float64)
    A = torch.randn(inp, inp, generator=g, dtype=torch.float64) / 8 + 0.2 * torch.eye(inp, dtype=torch.float64)
    X = (Z @ A) * torch.linspace(0.2, 3.0, inp, dtype=torch.float64)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return W, X, 2.0 / n * X.T @ X


def out_err(X: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor) -> float:
    return float((X @ (W - Wq.double()).T).pow(2).sum())


VARIANTS = [  # (group_size, act_order, static_groups)
    (None, False, None),
    (None, True, None),
    (16, False, None),
    (16, True, None),  # static groups (the default with act_order)
    (16, True, False),  # groups in processing order, g_idx layout
    (16, False, True),
]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gptq_output_error_below_rtn(bits: int, variant: tuple) -> None:
    gs, act_order, static = variant
    W, X, H = layer()
    r = gptq_quantize_weight(W.float(), H, bits, gs, act_order=act_order, static_groups=static)
    base = rtn_quantize_weight(W.float(), bits, gs)
    # observed gptq/rtn ratios: 0.29-0.42 with act_order, 0.68-0.72 without
    assert out_err(X, W, r.weight) <= 0.8 * out_err(X, W, base.weight)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_codes_dequantize_exactly_in_original_order(sym: bool, variant: tuple) -> None:
    gs, act_order, static = variant
    W, _, H = layer(1)
    for Win in (W.float(), W.to(torch.bfloat16)):
        r = gptq_quantize_weight(Win, H, 4, gs, sym, act_order, static_groups=static)
        assert isinstance(r, QuantizedWeight) and r.weight.dtype == Win.dtype and r.codes.dtype == torch.int32
        assert torch.equal(dequantize_groups(r.codes, r.scales, r.zero_points, r.g_idx).to(Win.dtype), r.weight)
        lo, hi = (-8, 7) if sym else (0, 15)
        assert int(r.codes.min()) >= lo and int(r.codes.max()) <= hi
        size = gs or 64
        assert r.scales.shape == (32, 64 // size) and torch.bincount(r.g_idx).tolist() == [size] * (64 // size)
        if act_order and gs is not None and static is False:
            assert torch.equal(r.g_idx[r.perm], torch.arange(64) // size)  # processing-order groups
        else:
            assert torch.equal(r.g_idx, torch.arange(64) // size)  # contiguous groups
        assert (r.perm is not None) == act_order


def reference_gptq(W, H, bits, gs, sym, act_order, static, damp=0.01):
    """Column-by-column GPTQ with a fresh dense inverse of the remaining Hessian at every step."""
    rows, cols = W.shape
    size = gs or cols
    dynamic = gs is not None and not static
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    Hd = H + damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    Wp, Hp = W[:, perm].clone(), Hd[perm][:, perm]
    up_front = qparams_for(W, bits, sym, "group", group_size=size)
    codes_p = torch.zeros(rows, cols, dtype=torch.long)
    for k in range(cols):
        if dynamic and k % size == 0:
            qp = qparams_for(Wp[:, k : k + size], bits, sym, "group", group_size=size)
            s, z = qp.scale[:, 0], qp.zero_point[:, 0]
        elif not dynamic:
            s, z = up_front.scale[:, perm[k] // size], up_front.zero_point[:, perm[k] // size]
        q = torch.round(Wp[:, k] / s + z).clamp(qp_min(bits, sym), qp_max(bits, sym))
        codes_p[:, k] = q.long()
        Hinv = torch.linalg.inv(Hp[k:, k:])
        Wp[:, k:] -= ((Wp[:, k] - (q - z) * s) / Hinv[0, 0])[:, None] * Hinv[0][None, :]
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    return codes


def qp_min(bits: int, sym: bool) -> int:
    return -(2 ** (bits - 1)) if sym else 0


def qp_max(bits: int, sym: bool) -> int:
    return 2 ** (bits - 1) - 1 if sym else 2**bits - 1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block_size", [8, 5, 128])
@pytest.mark.parametrize("sub_block", [1, 3, 16])
def test_lazy_blocks_match_dense_reference(variant: tuple, block_size: int, sub_block: int, monkeypatch) -> None:
    """Blocks and sub-blocks of any width (a sub-block of 3 straddles groups of 8 unless cut at their
    starts) give the codes of column-by-column GPTQ with a fresh inverse at every step."""
    import leanml.quantize.gptq as gptq

    monkeypatch.setattr(gptq, "GPTQ_SUB_BLOCK", sub_block)
    gs, act_order, static = variant
    W, _, H = layer(2, out=8, inp=32)
    sym = block_size == 5
    r = gptq_quantize_weight(W, H, 3, gs and 8, sym, act_order, block_size=block_size, static_groups=static)
    expect = reference_gptq(W, H, 3, gs and 8, sym, act_order, static if static is not None else act_order)
    assert torch.equal(r.codes.long(), expect)


def test_obs_update_matches_least_squares() -> None:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    U = inverse_hessian_cholesky(2.0 / 20 * X.T @ X, damp=0.0)
    q0, q1 = torch.round(W[:, 0] * 2) / 2, torch.round(W[:, 1] * 2) / 2
    W1 = obs_column_update(W, U, 0, q0)
    W2 = obs_column_update(W1, U, 1, q1)
    assert torch.allclose(W1[:, 0], q0, atol=1e-12) and torch.equal(W2[:, 0], W1[:, 0])
    for r in range(3):  # closed form: the best remaining columns with the fixed ones held at q
        target = X @ W[r]
        best1 = torch.linalg.lstsq(X[:, 1:], (target - X[:, 0] * q0[r])[:, None]).solution[:, 0]
        best2 = torch.linalg.lstsq(X[:, 2:], (target - X[:, :2] @ torch.stack([q0[r], q1[r]]))[:, None]).solution
        torch.testing.assert_close(W1[r, 1:], best1, rtol=0, atol=1e-10)
        torch.testing.assert_close(W2[r, 2:], best2[:, 0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [5, 70, 130, 300])
def test_inverse_hessian_cholesky_against_dense_inverse(n: int, monkeypatch) -> None:
    """U (one reversed Cholesky and a recursive triangular inverse) equals the upper Cholesky factor of
    the dense inverse of the damped Hessian, and U^T U inverts it."""
    import leanml.quantize.gptq as gptq

    monkeypatch.setattr(gptq, "TRIANGULAR_BASE", 16)  # recursion at these small sizes
    torch.manual_seed(n)
    X = torch.randn(n + 40, n, dtype=torch.float64) * torch.rand(n, dtype=torch.float64)
    H = 2.0 / (n + 40) * X.T @ X
    U = inverse_hessian_cholesky(H, damp=0.01)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    expect = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    torch.testing.assert_close(U, expect, rtol=1e-9, atol=1e-9 * float(expect.abs().max()))
    torch.testing.assert_close(U.T @ U @ Hd, torch.eye(n, dtype=H.dtype), rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_quantized_apart_with_one_factor_equal_the_whole(variant: tuple) -> None:
    """What a torchrun job relies on: given one shared factor, a run of rows gives those rows of the whole
    result (up to the last bit of a product whose kernel depends on the row count: a code may then flip
    on a rounding boundary), and the factor gives exactly what the Hessian itself gives."""
    gs, act_order, static = variant
    W, _, H = layer(7, out=12, inp=64)
    W = W.float()
    H[5, :] = H[:, 5] = 0.0  # a dead input
    kw = dict(bits=3, group_size=gs and 16, act_order=act_order, static_groups=static, mse_clip=True)
    whole = gptq_quantize_weight(W, H, **kw)
    f = factor_hessian(H, act_order, 0.01, torch.float32)
    again = gptq_quantize_weight(W, None, factor=f, **kw)
    assert torch.equal(again.codes, whole.codes) and torch.equal(again.weight, whole.weight)
    for a, b in [(0, 5), (5, 12)]:
        part = gptq_quantize_weight(W[a:b], None, factor=f, **kw)
        assert float((part.codes != whole.codes[a:b]).float().mean()) <= 0.01
        torch.testing.assert_close(part.scales, whole.scales[a:b], rtol=1e-5, atol=0)
        assert torch.equal(part.zero_points, whole.zero_points[a:b]) and torch.equal(part.g_idx, whole.g_idx)
    with pytest.raises(LeanmlError, match="was not made for this weight"):
        gptq_quantize_weight(W, None, factor=f, bits=3, act_order=not act_order)


def test_high_bits_nearly_exact() -> None:
    W, X, H = layer(4)
    ref = float((X @ W.T).pow(2).sum())
    for gs, act_order in [(None, False), (None, True), (16, True)]:
        r = gptq_quantize_weight(W, H, 8, gs, act_order=act_order)
        # relative output error, observed 2.2e-5 (per channel), 8.9e-6 (act_order), 5.3e-6 (groups of 16)
        assert out_err(X, W, r.weight) / ref < 1e-4


def test_weight_already_on_grid_is_kept() -> None:
    W, _, H = layer(5)
    on_grid = rtn_quantize_weight(W, 4, 16)
    for act_order in (False, True):
        r = gptq_quantize_weight(on_grid.weight, H, 4, 16, act_order=act_order)
        assert torch.equal(r.codes, on_grid.codes)
        torch.testing.assert_close(r.weight, on_grid.weight, rtol=0, atol=1e-12)


def test_dead_input_columns() -> None:
    W, X, _ = layer(6)
    X[:, [3, 40]] = 0.0
    H = 2.0 / X.shape[0] * X.T @ X
    for act_order in (False, True):
        r = gptq_quantize_weight(W, H, 4, 16, act_order=act_order, static_groups=False)
        assert torch.equal(r.weight[:, [3, 40]], torch.zeros(32, 2, dtype=W.dtype))
        if act_order:
            assert r.perm[-2:].tolist() == [3, 40]  # dead columns are processed last
        assert out_err(X, W, r.weight) <= out_err(X, W, rtn_quantize_weight(W, 4, 16).weight)


def test_rtn_equals_primitive_fake_quant() -> None:
    W, _, _ = layer(7)
    for gs, sym in [(16, False), (8, True)]:
        r = rtn_quantize_weight(W, 3, gs, sym)
        assert torch.equal(r.weight, fake_quantize(W, qparams_for(W, 3, sym, "group", group_size=gs)))
    r = rtn_quantize_weight(W, 4)
    assert torch.equal(r.weight, fake_quantize(W, qparams_for(W, 4, False, "channel", axis=0)))


def test_mse_clip_helps_rtn_and_works_in_gptq() -> None:
    W, X, H = layer(8)
    W = W**3  # heavy-tailed weights: clipping pays off
    wmse = lambda r: float((r.weight - W).pow(2).sum())  # noqa: E731
    plain, clipped = rtn_quantize_weight(W, 3, 16), rtn_quantize_weight(W, 3, 16, mse_clip=True)
    assert wmse(clipped) <= wmse(plain)  # per group by construction; observed ratio 0.93
    g = gptq_quantize_weight(W, H, 3, 16, mse_clip=True)
    assert torch.equal(dequantize_groups(g.codes, g.scales, g.zero_points, g.g_idx), g.weight)
    assert out_err(X, W, g.weight) <= out_err(X, W, clipped.weight)  # observed ratio 0.78


def test_errors() -> None:
    W, _, H = layer(9)
    with pytest.raises(LeanmlError, match=r"group_size 48 does not divide 64 \(the size of axis 1\)"):
        gptq_quantize_weight(W, H, 4, 48)
    with pytest.raises(LeanmlError, match="group_size 48 does not divide 64"):
        rtn_quantize_weight(W, 4, 48)
    with pytest.raises(LeanmlError, match="bits 9"):
        gptq_quantize_weight(W, H, 9)
    with pytest.raises(LeanmlError, match="Hessian shape"):
        gptq_quantize_weight(W, H[:10, :10], 4)
    with pytest.raises(LeanmlError, match="damp -1"):
        gptq_quantize_weight(W, H, 4, damp=-1)
    low_rank = torch.ones(64, 64, dtype=torch.float64)
    with pytest.raises(LeanmlError, match="not positive definite with damp 0"):
        gptq_quantize_weight(W, low_rank, 4, damp=0.0)
    with pytest.raises(LeanmlError, match="block_size 0"):
        gptq_quantize_weight(W, H, 4, block_size=0)
