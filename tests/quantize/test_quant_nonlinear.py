"""Non-linear quantizers: NF4 levels/codes, k-means codebooks, power-of-two (log2)."""

from __future__ import annotations

import itertools

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.quantize.primitives import (
    fake_quantize,
    kmeans_dequantize,
    kmeans_quantize,
    log2_dequantize,
    log2_quantize,
    nf4_dequantize,
    nf4_levels,
    nf4_quantize,
    qparams_for,
)

# NF4 table as published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 lookup table).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_levels_match_published_table() -> None:
    levels = nf4_levels(torch.float64)
    assert levels.shape == (16,)
    # observed max deviation ~1.2e-7 (the published values are float32 roundings of the same formula)
    assert torch.allclose(levels, torch.tensor(PUBLISHED_NF4, dtype=torch.float64), rtol=0, atol=1e-4)
    assert float((levels - torch.tensor(PUBLISHED_NF4, dtype=torch.float64)).abs().max()) < 1e-6


def test_nf4_codes_are_nearest_level_per_block() -> None:
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    codes, absmax = nf4_quantize(x, block_size=64)
    assert codes.shape == x.shape and codes.dtype == torch.int32 and absmax.shape == (4,)
    blocks = x.reshape(4, 64)
    assert torch.equal(absmax, blocks.abs().amax(1))
    normed = blocks / absmax[:, None]
    brute = (normed[..., None] - nf4_levels()[None, None, :]).abs().argmin(-1)  # nearest by brute force
    assert torch.equal(codes.reshape(4, 64).long(), brute)
    deq = nf4_dequantize(codes, absmax, block_size=64)
    assert torch.equal(deq.reshape(4, 64), nf4_levels()[brute] * absmax[:, None])
    # every block's absmax element is reproduced exactly (level +-1)
    assert torch.equal(deq.abs().reshape(4, 64).amax(1), absmax)


def test_nf4_bad_block_size() -> None:
    with pytest.raises(LeanmlError, match=r"block_size 64 does not divide 100"):
        nf4_quantize(torch.randn(100), 64)


def test_nf4_all_zero_block() -> None:
    codes, absmax = nf4_quantize(torch.zeros(2, 64), 64)
    assert torch.equal(nf4_dequantize(codes, absmax, 64), torch.zeros(2, 64))


def optimal_1d_kmeans(values: list[float], k: int) -> tuple[float, list[float]]:
    """Exhaustive optimum: in 1-D the optimal clusters are contiguous runs of the sorted values."""
    v = sorted(values)
    best = (float("inf"), [])
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        bounds = (0, *cuts, len(v))
        segs = [v[a:b] for a, b in itertools.pairwise(bounds)]
        means = [sum(s) / len(s) for s in segs]
        sse = sum((x - m) ** 2 for s, m in zip(segs, means, strict=True) for x in s)
        best = min(best, (sse, means))
    return best


def sse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).pow(2).sum())


def test_kmeans_matches_exhaustive_optimum_on_tiny_case() -> None:
    vals = [0.0, 0.1, 0.35, 1.0, 1.2, 1.25, 1.9, 3.0, 3.3, 3.4, 4.0]
    x = torch.tensor(vals, dtype=torch.float64)
    codes, book = kmeans_quantize(x, bits=2)
    opt_sse, opt_means = optimal_1d_kmeans(vals, 4)
    assert torch.allclose(book, torch.tensor(opt_means, dtype=torch.float64), atol=1e-12)
    assert sse(kmeans_dequantize(codes, book), x) == pytest.approx(opt_sse, rel=1e-12)


def test_kmeans_per_channel_matches_exhaustive_optimum() -> None:
    rows = [[5.0, 5.5, 6.0, -1.0, -1.2, 9.0, 9.1], [0.1, 0.2, 0.25, 0.9, 1.0, 2.0, 2.2]]
    x = torch.tensor(rows, dtype=torch.float64).T  # channels on axis 1
    codes, book = kmeans_quantize(x, bits=1, axis=1)
    assert book.shape == (2, 2) and codes.shape == x.shape
    for c, vals in enumerate(rows):
        opt_sse, opt_means = optimal_1d_kmeans(vals, 2)
        assert torch.allclose(book[c], torch.tensor(opt_means, dtype=torch.float64), atol=1e-12)
        assert sse(kmeans_dequantize(codes, book, axis=1)[:, c], x[:, c]) == pytest.approx(opt_sse, rel=1e-12)


def test_kmeans_close_to_exhaustive_optimum_on_random_tiny_cases() -> None:
    g = torch.Generator().manual_seed(5)
    ratios = []
    for _ in range(40):
        vals = (torch.randn(9, generator=g, dtype=torch.float64) ** 3).tolist()
        x = torch.tensor(vals, dtype=torch.float64)
        codes, book = kmeans_quantize(x, bits=2)
        ratios.append(sse(kmeans_dequantize(codes, book), x) / optimal_1d_kmeans(vals, 4)[0])
    # Lloyd is local; observed: 31/40 cases at the global optimum, worst ratio 1.56
    assert sum(r < 1 + 1e-9 for r in ratios) >= 26
    assert max(ratios) < 3.0


def test_kmeans_is_a_lloyd_fixed_point() -> None:
    x = torch.randn(3, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes, book = kmeans_quantize(x, bits=3, axis=0)
    for c in range(3):
        nearest = (x[c][:, None] - book[c][None, :]).abs().argmin(1)
        assert torch.equal(codes[c].long(), nearest)
        for j in range(8):
            members = x[c][codes[c] == j]
            if members.numel():
                assert float(book[c, j]) == pytest.approx(float(members.mean()), abs=1e-12)


@pytest.mark.parametrize("bits", [2, 3])
def test_kmeans_beats_uniform_on_bimodal(bits: int) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(1000, generator=g) * 0.3 - 3, torch.randn(1000, generator=g) * 0.3 + 3])
    codes, book = kmeans_quantize(x, bits)
    km = sse(kmeans_dequantize(codes, book), x)
    uni = sse(fake_quantize(x, qparams_for(x, bits, False)), x)
    # observed km/uni: bits=2 0.143, bits=3 0.083
    assert km <= uni
    assert km < 0.5 * uni


def test_kmeans_per_channel_beats_uniform_per_channel() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 64, generator=g) ** 3  # heavy-tailed rows
    codes, book = kmeans_quantize(w, 2, axis=0)
    km = sse(kmeans_dequantize(codes, book, axis=0), w)
    uni = sse(fake_quantize(w, qparams_for(w, 2, False, "channel", axis=0)), w)
    assert km <= 0.7 * uni  # observed ratio 0.50


def test_kmeans_constant_and_bad_bits() -> None:
    codes, book = kmeans_quantize(torch.full((10,), 2.5), 2)
    assert torch.equal(kmeans_dequantize(codes, book), torch.full((10,), 2.5))
    with pytest.raises(LeanmlError, match="bits 9"):
        kmeans_quantize(torch.randn(10), 9)


def test_log2_hand_computed() -> None:
    # bits=3: sign + 2 bits -> magnitudes {1, 2, 4} for max_exponent=2, plus 0
    x = torch.tensor([0.0, 1.0, -2.0, 4.0, 0.3, 3.0, 5.0, -0.1, 100.0, 0.75, 1.45, -1.6])
    codes, e_max = log2_quantize(x, 3, max_exponent=2)
    # log2: 0.3->-1.74 (below 2^0: zero); 3->1.58 (rounds to 2: 4); 0.75->-0.42 (->0: 1);
    # 1.45->0.54 (->1: 2); 100 clamps to 4; 1.6->0.68 (->1: 2)
    assert e_max == 2
    assert codes.tolist() == [0, 1, -2, 3, 0, 3, 3, 0, 3, 1, 2, -2]
    assert log2_dequantize(codes, 3, 2).tolist() == [0, 1, -2, 4, 0, 4, 4, 0, 4, 1, 2, -2]


def test_log2_default_max_exponent_and_range() -> None:
    x = torch.tensor([0.5, -3.0, 1.0, 0.01])
    codes, e_max = log2_quantize(x, 4)  # max|x| = 3 -> log2 = 1.58 -> 2; 7 magnitudes 2^-4 .. 2^2
    assert e_max == 2
    assert log2_dequantize(codes, 4, e_max).tolist() == [0.5, -4.0, 1.0, 0.0]  # 0.01 -> 2^-7: below 2^-4
    assert int(codes.abs().max()) <= 7
    with pytest.raises(LeanmlError, match="bits 1"):
        log2_quantize(x, 1)
