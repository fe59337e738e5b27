"""Importance criteria against hand computation on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.prune.criteria import (
    activation_importance,
    gradient_importance,
    input_norms,
    input_norms_from_hessian,
    magnitude,
    taylor,
    wanda,
)

W = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])


def test_magnitude_p1_p2():
    assert torch.equal(magnitude(W), torch.tensor([[1.0, 2.0], [3.0, 0.5]]))
    assert torch.equal(magnitude(W, p=2), torch.tensor([[1.0, 4.0], [9.0, 0.25]]))
    with pytest.raises(LeanmlError, match="p=3"):
        magnitude(W, p=3)


def test_gradient_importance_is_mean_abs_over_batches():
    g1 = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    g2 = torch.tensor([[-3.0, 1.0], [0.0, -4.0]])
    expected = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert torch.equal(gradient_importance([g1, g2]), expected)
    assert torch.equal(gradient_importance(torch.stack([g1, g2])), expected)  # batch axis 0


def test_taylor_first_order():
    g = torch.tensor([[0.5, 1.0], [-1.0, 4.0]])
    assert torch.equal(taylor(W, g), torch.tensor([[0.5, 2.0], [3.0, 2.0]]))
    # per-batch gradients: mean of |w * g_b| (opposite signs do not cancel)
    assert torch.equal(taylor(W, [g, -g]), torch.tensor([[0.5, 2.0], [3.0, 2.0]]))
    assert torch.equal(taylor(W, [g, torch.zeros(2, 2)]), torch.tensor([[0.25, 1.0], [1.5, 1.0]]))
    with pytest.raises(LeanmlError, match="does not match"):
        taylor(W, torch.zeros(3, 2))


def test_activation_importance_mean_and_norm():
    a = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # (batch 1, tokens 2, features 2)
    assert torch.allclose(activation_importance(a), torch.tensor([2.0, 1.0]))
    assert torch.allclose(activation_importance(a, reduce="norm"), torch.tensor([10.0**0.5, 2.0]))
    b = torch.tensor([[0.0, 2.0]])  # a second batch with one token
    assert torch.allclose(activation_importance([a, b]), torch.tensor([4.0 / 3, 4.0 / 3]))
    assert torch.allclose(input_norms([a, b]), torch.tensor([10.0**0.5, 8.0**0.5]))


def test_wanda_score_and_norms_from_hessian():
    x = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # two tokens: ||x_0|| = 5, ||x_1|| = 1
    norms = input_norms(x)
    assert torch.allclose(norms, torch.tensor([5.0, 1.0]))
    assert torch.allclose(wanda(W, norms), torch.tensor([[5.0, 2.0], [15.0, 0.5]]))
    H = 2.0 / 2 * x.T @ x  # HessianAccumulator's 2/n XᵀX
    assert torch.allclose(input_norms_from_hessian(H, scale=2.0 / 2), norms)
    with pytest.raises(LeanmlError, match="do not match"):
        wanda(W, torch.ones(3))
