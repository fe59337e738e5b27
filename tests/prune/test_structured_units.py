"""Unit-level importance and selection against hand computation on small tensors."""

from __future__ import annotations

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.prune.criteria import activation_importance, taylor
from leanml.prune.structured import _MeanAbs
from leanml.prune.units import (
    lowest_units,
    unit_activation,
    unit_magnitude,
    unit_sum,
    unit_taylor,
    units_to_remove,
)

# A producer with 2 units of 2 rows each (chunk 2), and a consumer reading them as 2 columns.
ROWS = torch.tensor([[1.0, -2.0], [0.0, 3.0], [-1.0, 1.0], [2.0, 0.0]])  # (4, 2): unit 0 = rows 0-1, unit 1 = rows 2-3
COLS = torch.tensor([[0.5, -4.0], [1.5, 1.0]])  # (2, 2): unit j = column j


def test_unit_sum_chunks_along_an_axis():
    assert torch.equal(unit_sum(ROWS, 0, 2), torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.equal(unit_sum(ROWS, 0, 4), torch.tensor([-1.0, 3.0, 0.0, 2.0], dtype=torch.float64))
    assert torch.equal(unit_sum(COLS, 1, 2), torch.tensor([2.0, -3.0], dtype=torch.float64))
    with pytest.raises(LeanmlError, match="equal chunks"):
        unit_sum(ROWS, 0, 3)


def test_unit_magnitude_l1_and_l2_over_every_slice():
    # unit 0: rows 0-1 -> |1|+|-2|+|0|+|3| = 6, column 0 -> 0.5 + 1.5 = 2   => 8
    # unit 1: rows 2-3 -> 1+1+2+0 = 4,          column 1 -> 4 + 1 = 5      => 9
    l1 = unit_magnitude([(ROWS, 0), (COLS, 1)], 2, p=1)
    assert torch.equal(l1, torch.tensor([8.0, 9.0], dtype=torch.float64))
    # squares: unit 0 -> 1+4+0+9 + 0.25+2.25 = 16.5 ; unit 1 -> 1+1+4+0 + 16+1 = 23
    l2 = unit_magnitude([(ROWS, 0), (COLS, 1)], 2, p=2)
    assert torch.allclose(l2, torch.tensor([16.5, 23.0], dtype=torch.float64).sqrt())


def test_unit_taylor_sums_weight_times_gradient():
    g_rows = torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.5, 0.0], [1.0, 3.0]])
    g_cols = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    # |w*g| rows: [[1,2],[0,3],[0.5,0],[2,0]] ; cols: [[1,2],[1.5,0]]
    # unit 0: 1+2+0+3 + 1+1.5 = 8.5 ; unit 1: 0.5+0+2+0 + 2+0 = 4.5
    scores = unit_taylor([(taylor(ROWS, g_rows), 0), (taylor(COLS, g_cols), 1)], 2)
    assert torch.equal(scores, torch.tensor([8.5, 4.5], dtype=torch.float64))
    with pytest.raises(LeanmlError, match=">= 0"):
        unit_taylor([(-torch.ones(2, 2), 0)], 2)


def test_unit_activation_is_the_mean_over_a_units_features():
    acts = torch.tensor([[[1.0, -1.0, 2.0, 0.0]], [[3.0, 1.0, -2.0, 4.0]]])  # (2, 1, 4): 2 units of 2 features
    per_feature = activation_importance(acts)  # [2, 1, 2, 2]
    assert torch.equal(per_feature, torch.tensor([2.0, 1.0, 2.0, 2.0]))
    assert torch.equal(unit_activation([per_feature], 2), torch.tensor([1.5, 2.0], dtype=torch.float64))
    # two readers of the same units: averaged
    assert torch.equal(
        unit_activation([per_feature, torch.tensor([0.5, 0.5])], 2), torch.tensor([1.0, 1.25], dtype=torch.float64)
    )
    with pytest.raises(LeanmlError, match="equal units"):
        unit_activation([per_feature], 3)


def test_streaming_mean_abs_matches_activation_importance():
    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 3, 4), torch.randn(1, 5, 3, 4)]  # conv-like, channels on axis 1
    acc = _MeanAbs(1)
    for b in batches:
        acc.update(b)
    expected = activation_importance([b.movedim(1, -1) for b in batches])
    assert torch.allclose(acc.value().float(), expected, atol=1e-6)


def test_lowest_units_removes_the_lowest_with_stable_ties():
    s = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    assert lowest_units(s, 2) == ([1, 3], [0, 2, 4])
    assert lowest_units(s, 0) == ([], [0, 1, 2, 3, 4])
    with pytest.raises(LeanmlError, match="at least one must stay"):
        lowest_units(s, 5)


def test_units_to_remove_rounds_half_up_and_never_removes_everything():
    assert units_to_remove(0.25, 10, "x") == 3  # 2.5 -> 3
    assert units_to_remove(0.5, 16, "x") == 8
    assert units_to_remove(0.0, 4, "x") == 0
    with pytest.raises(LeanmlError, match="all 1 units of layer 'conv'") as info:
        units_to_remove(0.5, 1, "layer 'conv'")
    assert "\n" not in str(info.value)
