"""AWQ scale search and SmoothQuant scales / exact-invariance helpers."""

from __future__ import annotations

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.quantize.awq import (
    apply_input_scale,
    awq_grid_losses,
    awq_scales,
    awq_search_scale,
    fold_scale_into_producer,
    remove_input_scale,
    scale_inputs,
    smoothquant_scales,
)
from leanml.quantize.gptq import rtn_quantize_weight


def outlier_layer(seed: int = 0):
    """W (16, 64) and X (256, 64) whose channels 3, 17, 40 are 20x larger (salient channels)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 64, generator=g)
    X[:, [3, 17, 40]] *= 20.0
    return torch.randn(16, 64, generator=g), X


def q3(w: torch.Tensor) -> torch.Tensor:
    return rtn_quantize_weight(w, 3, 16).weight


def loss(W: torch.Tensor, X: torch.Tensor, s: torch.Tensor) -> float:
    """Direct ||X Wᵀ - (X/s) Q(W s)ᵀ||² in float64."""
    Xd, Wd, sd = X.double(), W.double(), s.double()
    return float((Xd @ Wd.T - (Xd / sd) @ q3(W * s).double().T).pow(2).sum())


def test_awq_scales_beat_no_scaling() -> None:
    W, X = outlier_layer()
    s = awq_search_scale(W, X, q3)
    assert s.shape == (64,)
    unscaled = loss(W, X, torch.ones(64))
    # observed: best alpha 0.55, loss ratio 0.19
    assert loss(W, X, s) <= unscaled
    assert loss(W, X, s) < 0.7 * unscaled
    assert float(s[[3, 17, 40]].min()) > float(s.max()) * 0.9  # salient channels get the largest scales


def test_awq_grid_losses_and_normalisation() -> None:
    W, X = outlier_layer(1)
    alphas = [0.0, 0.25, 0.5, 1.0]
    losses = awq_grid_losses(W, X, q3, alphas)
    for a, got in zip(alphas, losses.tolist(), strict=True):
        assert got == pytest.approx(loss(W, X, awq_scales(X.abs().mean(0), a)), rel=1e-4)
    assert torch.equal(awq_scales(X.abs().mean(0), 0.0), torch.ones(64))
    s = awq_scales(X.abs().mean(0), 0.7)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    m = X.abs().mean(0)  # passing the statistic gives the same result as letting it be computed
    assert torch.equal(awq_search_scale(W, X, q3, act_mean_abs=m), awq_search_scale(W, X, q3))
    with pytest.raises(LeanmlError, match="alpha 1.5"):
        awq_scales(m, 1.5)
    with pytest.raises(LeanmlError, match="n_grid 0"):
        awq_search_scale(W, X, q3, n_grid=0)
    with pytest.raises(LeanmlError, match="need W"):
        awq_grid_losses(W, X[:, :10], q3, [0.0])


def test_input_scale_invariance() -> None:
    W, X = outlier_layer(2)
    s = smoothquant_scales(X.abs().amax(0), W.abs().amax(0), 0.5)
    ref = X @ W.T
    out = scale_inputs(X, s) @ apply_input_scale(W, s).T
    # observed max relative deviation 6.4e-8 (float32)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    torch.testing.assert_close(remove_input_scale(apply_input_scale(W, s), s), W, rtol=2e-7, atol=0)
    p2 = torch.exp2(torch.randint(-4, 5, (64,)).float())  # powers of two: exactly invertible
    assert torch.equal(remove_input_scale(apply_input_scale(W, p2), p2), W)
    assert torch.equal(scale_inputs(X, p2) @ apply_input_scale(W, p2).T, ref)


def test_fold_scale_into_producer() -> None:
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(10, 8, generator=g)
    P, b = torch.randn(64, 8, generator=g), torch.randn(64, generator=g)  # producer: X = Z Pᵀ + b
    s = torch.rand(64, generator=g) + 0.5
    Pf, bf = fold_scale_into_producer(P, b, s)
    torch.testing.assert_close(Z @ Pf.T + bf, (Z @ P.T + b) / s, rtol=1e-5, atol=1e-6)
    gamma = torch.rand(64, generator=g)  # a norm's weight and no bias
    gf, none = fold_scale_into_producer(gamma, None, s)
    assert none is None and torch.allclose(gf * s, gamma, rtol=1e-6)


def test_smoothquant_scales_hand_computed() -> None:
    act, wt = torch.tensor([4.0, 1.0, 9.0, 0.0]), torch.tensor([1.0, 4.0, 1.0, 2.0])
    s = smoothquant_scales(act, wt, 0.5)
    assert s.tolist() == pytest.approx([2.0, 0.5, 3.0, 1.0])  # dead channel (act 0) -> 1
    # alpha=0.5 balances the maxima: max|X_j / s_j| == max|W_j * s_j| == sqrt(act_j * w_j)
    assert (act[:3] / s[:3]).tolist() == pytest.approx((wt[:3] * s[:3]).tolist())
    assert smoothquant_scales(act, wt, 1.0)[:3].tolist() == pytest.approx([4.0, 1.0, 9.0])
    assert smoothquant_scales(act, wt, 0.0)[:3].tolist() == pytest.approx([1.0, 0.25, 1.0])
    with pytest.raises(LeanmlError, match="alpha -0.1"):
        smoothquant_scales(act, wt, -0.1)
    with pytest.raises(LeanmlError, match="must be 1-D"):
        smoothquant_scales(act, wt[:3], 0.5)
    with pytest.raises(LeanmlError, match=">= 0"):
        smoothquant_scales(-act, wt, 0.5)
    with pytest.raises(LeanmlError, match="s has shape"):
        apply_input_scale(torch.ones(2, 3), torch.ones(4))
