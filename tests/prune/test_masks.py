"""Masks: exact counts, deterministic ties, N:M groups, a global threshold, the cubic schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.prune.masks import (
    cubic_schedule,
    global_masks,
    n_removed,
    nm_mask,
    row_mask,
    select_masks,
    unstructured_mask,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99])
def test_unstructured_removes_exactly_round_sparsity_n(sparsity):
    scores = torch.rand(7, 13, generator=torch.Generator().manual_seed(1))
    mask = unstructured_mask(scores, sparsity)
    k = int(sparsity * 91 + 0.5)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int((~mask).sum()) == k == n_removed(sparsity, 91)
    if 0 < k < 91:  # the removed are exactly the k smallest
        assert scores[~mask].max() <= scores[mask].min()


def test_unstructured_ties_are_broken_by_position():
    scores = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = unstructured_mask(scores, 0.5)  # remove 3 of 6: the three zeros
    assert torch.equal(mask, scores > 0)
    ties = torch.ones(2, 3)
    assert torch.equal(unstructured_mask(ties, 0.5), torch.tensor([[False, False, False], [True, True, True]]))
    assert torch.equal(unstructured_mask(ties, 0.5), unstructured_mask(ties, 0.5))


def test_row_mask_same_count_in_every_row():
    scores = torch.rand(6, 10, generator=torch.Generator().manual_seed(2))
    mask = row_mask(scores, 0.3)
    assert torch.equal((~mask).sum(1), torch.full((6,), 3))
    for r in range(6):
        assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 4), (1, 2)])
def test_nm_mask_exactly_n_per_group(n, m):
    scores = torch.randn(5, 4 * m, generator=torch.Generator().manual_seed(n * 10 + m))
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(5, -1, m)
    assert torch.equal(groups.sum(-1), torch.full((5, 4), n))
    sg = scores.reshape(5, -1, m)
    kept_min = torch.where(groups, sg, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, sg).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_mask_ties_and_zero_weights_still_keep_n():
    mask = nm_mask(torch.zeros(2, 8), 2, 4)
    assert torch.equal(mask.reshape(2, 2, 4).sum(-1), torch.full((2, 2), 2))
    assert torch.equal(mask[0, :4], torch.tensor([True, True, False, False]))  # earlier columns win ties


def test_nm_mask_rejects_bad_patterns():
    with pytest.raises(LeanmlError, match="0 < n < m"):
        nm_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(LeanmlError, match="divisible by 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_global_masks_match_brute_force():
    gen = torch.Generator().manual_seed(3)
    scores = {
        "a": torch.rand(4, 5, generator=gen),
        "b": torch.rand(3, 2, generator=gen) * 0.5,
        "c": torch.rand(6, generator=gen) * 2,
    }
    for sparsity in (0.2, 0.5, 0.8):
        masks = global_masks(scores, sparsity)
        flat = [(float(v), name, i) for name, t in scores.items() for i, v in enumerate(t.reshape(-1).tolist())]
        k = round(sparsity * len(flat) + 1e-9)
        removed = {(name, i) for _, name, i in sorted(flat)[:k]}
        for name, t in scores.items():
            expected = torch.tensor([(name, i) not in removed for i in range(t.numel())]).reshape(t.shape)
            assert torch.equal(masks[name], expected), (sparsity, name)
        assert sum(int((~mk).sum()) for mk in masks.values()) == k


def test_select_masks_dispatch_and_errors():
    s = {"x": torch.rand(4, 8, generator=torch.Generator().manual_seed(4))}
    assert torch.equal(select_masks(s, "layer", 0.5)["x"], unstructured_mask(s["x"], 0.5))
    assert torch.equal(select_masks(s, "row", 0.5)["x"], row_mask(s["x"], 0.5))
    assert torch.equal(select_masks(s, "nm", n=2, m=4)["x"], nm_mask(s["x"], 2, 4))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(LeanmlError, match="out of range"):
            unstructured_mask(s["x"], bad)
    with pytest.raises(LeanmlError, match="nan"):
        unstructured_mask(torch.tensor([1.0, float("nan")]), 0.5)


def test_cubic_schedule_matches_zhu_gupta():
    # s_t = s_f + (s_i - s_f) (1 - t / (n Δt))^3, Zhu & Gupta 2017, eq. (1), with t0 = 0
    for total, s_f, s_i in itertools.product((1, 4, 10), (0.5, 0.9), (0.0, 0.2)):
        for t in range(total + 1):
            expected = s_f + (s_i - s_f) * (1 - t / total) ** 3
            assert cubic_schedule(t, total, s_f, s_i) == pytest.approx(expected, abs=1e-12)
    assert [round(cubic_schedule(t, 4, 0.8), 6) for t in range(5)] == [0.0, 0.4625, 0.7, 0.7875, 0.8]
    assert cubic_schedule(9, 4, 0.8) == pytest.approx(0.8) and cubic_schedule(-1, 4, 0.8) == 0.0
    with pytest.raises(LeanmlError):
        cubic_schedule(1, 0, 0.5)
    with pytest.raises(LeanmlError, match="above"):
        cubic_schedule(1, 4, 0.3, initial=0.5)


def test_outlier_ratio_by_hand():
    from leanml.prune.masks import outlier_ratio

    s = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 33.0]])  # mean 5; 33 > 2 * 5 only
    assert outlier_ratio(s, 2.0) == pytest.approx(1 / 8)
    assert outlier_ratio(s, 7.0) == 0.0


def test_owl_sparsities_keep_the_overall_target_and_spare_outlier_layers():
    from leanml.prune.masks import owl_sparsities

    ratios = {"a": 0.01, "b": 0.05, "c": 0.03}
    sizes = {"a": 1000, "b": 3000, "c": 2000}
    sp = owl_sparsities(ratios, sizes, 0.5, 0.08)
    overall = sum(sp[k] * sizes[k] for k in sp) / sum(sizes.values())
    assert overall == pytest.approx(0.5, abs=1e-12)
    assert sp["b"] < sp["c"] < sp["a"]  # most outliers -> least sparse
    assert max(sp.values()) - min(sp.values()) == pytest.approx(0.16)
    assert owl_sparsities(ratios, sizes, 0.5, 0.0) == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.5})
    with pytest.raises(LeanmlError, match="lambda"):
        owl_sparsities(ratios, sizes, 0.5, 1.5)
