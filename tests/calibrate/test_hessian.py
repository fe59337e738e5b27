"""HessianAccumulator against one-shot computations."""

from __future__ import annotations

import pytest
import torch

from leanml.calibrate.hessian import HessianAccumulator, outlier_row_weights
from leanml.errors import LeanmlError


def make_batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, 16, generator=g) * 2 + 0.5 for b, t in [(2, 7), (1, 13), (3, 5), (4, 1)]]


def test_batches_equal_one_shot_float64() -> None:
    batches = make_batches()
    acc = HessianAccumulator()
    for b in batches:
        acc.add(b)
    X = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    n = X.shape[0]
    assert acc.n == n and acc.rows == n and acc.in_features == 16
    torch.testing.assert_close(acc.hessian, 2.0 / n * X.T @ X, rtol=0, atol=1e-10)
    torch.testing.assert_close(acc.mean_abs, X.abs().mean(0), rtol=0, atol=1e-12)
    assert torch.equal(acc.max_abs, X.abs().amax(0))


def test_float32_accumulator() -> None:
    batches = make_batches(1)
    acc = HessianAccumulator(16, dtype=torch.float32)
    for b in batches:
        acc.add(b)
    X = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), 2.0 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-4)


def test_take_hessian_is_the_hessian_without_a_copy() -> None:
    acc = HessianAccumulator(16, dtype=torch.float32)
    for b in make_batches(2):
        acc.add(b)
    expect = acc.hessian
    taken = acc.take_hessian()
    assert torch.equal(taken, expect) and taken.data_ptr() == acc.take_hessian().data_ptr()
    assert torch.equal(acc.hessian, expect) and acc.hessian.data_ptr() != taken.data_ptr()
    with pytest.raises(LeanmlError, match="was taken"):
        acc.add(make_batches(3)[0])


def test_token_weights_zero_rows_drop_out() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 8, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 10, generator=g) > 0.3).double()
    acc = HessianAccumulator()
    acc.add(x, token_weights=mask)
    kept = x.reshape(-1, 8)[mask.flatten() > 0]
    assert acc.n == kept.shape[0]
    torch.testing.assert_close(acc.hessian, 2.0 / kept.shape[0] * kept.T @ kept, rtol=0, atol=1e-12)
    torch.testing.assert_close(acc.mean_abs, kept.abs().mean(0), rtol=0, atol=1e-12)
    assert torch.equal(acc.max_abs, kept.abs().amax(0))


def test_outlier_mode_down_weights_planted_row() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    x[5] = 1000.0 * x[5] / x[5].norm()  # an "attention sink" row, 380x the median norm
    plain, robust = HessianAccumulator(), HessianAccumulator(outlier_factor=4.0)
    plain.add(x)
    robust.add(x)
    norms = x.norm(dim=1)
    limit = 4.0 * norms.median()
    clean = torch.cat([x[:5], x[6:]])
    expect = 2.0 / 64 * (clean.T @ clean + (limit / norms[5]) ** 2 * torch.outer(x[5], x[5]))
    torch.testing.assert_close(robust.hessian, expect, rtol=0, atol=1e-10)
    sink = 2.0 / 64 * torch.outer(x[5], x[5])
    # share of the planted row in trace(H): observed 0.9995 plain, 0.186 with outlier_factor=4
    assert float(sink.trace() / plain.hessian.trace()) > 0.9
    robust_share = (limit / norms[5]) ** 2 * sink.trace() / robust.hessian.trace()
    assert float(robust_share) < 0.3
    assert robust.n == 64 and torch.equal(robust.max_abs, plain.max_abs)  # stats see raw values


def test_outlier_weights_rule() -> None:
    w = outlier_row_weights(torch.tensor([1.0, 1.0, 2.0, 10.0, 0.5]), 4.0)  # median 1 -> limit 4
    assert w.tolist() == pytest.approx([1, 1, 1, 0.16, 1])
    assert outlier_row_weights(torch.zeros(3), 4.0).tolist() == [1, 1, 1]
    acc = HessianAccumulator(outlier_factor=4.0)
    x = torch.randn(10, 4, dtype=torch.float64)
    acc.add(x)
    torch.testing.assert_close(acc.hessian, 2.0 / 10 * x.T @ x)  # no outliers: unchanged


def test_errors() -> None:
    acc = HessianAccumulator(8)
    with pytest.raises(LeanmlError, match="no input rows"):
        _ = acc.hessian
    with pytest.raises(LeanmlError, match="input has 5 features; this accumulator expects 8"):
        acc.add(torch.randn(3, 5))
    acc.add(torch.randn(3, 8))
    with pytest.raises(LeanmlError, match="token_weights has 4 values"):
        acc.add(torch.randn(3, 8), token_weights=torch.ones(4))
    with pytest.raises(LeanmlError, match="outlier_factor 0.5"):
        HessianAccumulator(outlier_factor=0.5)
    with pytest.raises(LeanmlError, match="dtype"):
        HessianAccumulator(dtype=torch.float16)
