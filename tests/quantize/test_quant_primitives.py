"""Affine primitives against a slow pure-Python elementwise reference (bit-exact in float64)."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

from leanml.errors import LeanmlError
from leanml.quantize.primitives import (
    QParams,
    cast_float,
    compute_qparams,
    default_clip_ratios,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    mse_clip_range,
    qparams_for,
    quantize,
)

TINY = sys.float_info.min


def ref_params(xmin: float, xmax: float, bits: int, sym: bool) -> tuple[float, float, int, int]:
    """The documented formulas, written out with Python floats."""
    xmin, xmax = min(xmin, 0.0), max(xmax, 0.0)
    if sym:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = max(-xmin, xmax) / qmax
        return (s if s > TINY else 1.0), 0.0, qmin, qmax
    qmin, qmax = 0, 2**bits - 1
    s = (xmax - xmin) / (qmax - qmin)
    s = s if s > TINY else 1.0
    return s, float(min(max(qmin - round(xmin / s), qmin), qmax)), qmin, qmax


def ref_code(v: float, s: float, z: float, qmin: int, qmax: int) -> int:
    return int(min(max(round(v / s + z), qmin), qmax))


def ref_quantize(x: np.ndarray, bits: int, sym: bool, key) -> tuple[np.ndarray, np.ndarray]:
    """Group elements by ``key(index)``, compute each group's params from its own min/max, quantize."""
    groups: dict = {}
    for idx in itertools.product(*map(range, x.shape)):
        groups.setdefault(key(idx), []).append(idx)
    codes, deq = np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape)
    for members in groups.values():
        vals = [float(x[i]) for i in members]
        s, z, qmin, qmax = ref_params(min(vals), max(vals), bits, sym)
        for i in members:
            codes[i] = ref_code(float(x[i]), s, z, qmin, qmax)
            deq[i] = (codes[i] - z) * s
    return codes, deq


def sample(shape=(6, 12), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    x[0, 3] = 0.0
    x[1] = 0.0  # an all-zero row: the zero-range guard must keep the scale at 1.0
    x[2] = x[2].abs() + 0.5  # an all-positive row: the range is widened to include 0
    return x


CASES = [
    ("tensor", {}, lambda i: 0),
    ("channel", {"axis": 0}, lambda i: i[0]),
    ("channel", {"axis": 1}, lambda i: i[1]),
    ("channel", {"axis": -1}, lambda i: i[1]),
    ("group", {"group_size": 4}, lambda i: (i[0], i[1] // 4)),
    ("group", {"group_size": 3}, lambda i: (i[0], i[1] // 3)),
]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bit_exact_against_reference(bits: int, sym: bool, case: int) -> None:
    granularity, kwargs, key = CASES[case]
    x = sample()
    qp = qparams_for(x, bits, sym, granularity, **kwargs)
    codes, deq = ref_quantize(x.numpy(), bits, sym, key)
    q = quantize(x, qp)
    assert q.dtype == torch.int32
    assert torch.equal(q.long(), torch.from_numpy(codes))
    assert torch.equal(dequantize(q, qp), torch.from_numpy(deq))
    assert torch.equal(fake_quantize(x, qp), torch.from_numpy(deq))


def test_channel_axis_of_3d_tensor() -> None:
    x = sample((3, 4, 5), seed=1)
    qp = qparams_for(x, 4, False, "channel", axis=1)
    assert qp.scale.shape == (1, 4, 1) and qp.axis == 1
    codes, _ = ref_quantize(x.numpy(), 4, False, lambda i: i[1])
    assert torch.equal(quantize(x, qp).long(), torch.from_numpy(codes))


def test_float32_per_tensor_matches_numpy_float32_reference() -> None:
    x = sample().float()
    for bits, sym in itertools.product((3, 8), (False, True)):
        qp = qparams_for(x, bits, sym)
        assert qp.scale.dtype == torch.float32
        xs, s, z = x.numpy(), qp.scale.numpy(), qp.zero_point.numpy()
        expect = np.clip(np.round(xs / s + z), qp.qmin, qp.qmax)  # float32 numpy arithmetic
        assert torch.equal(quantize(x, qp).double(), torch.from_numpy(expect.astype(np.float64)))
        # scale itself from the float32 formula
        lo, hi = min(xs.min(), np.float32(0)), max(xs.max(), np.float32(0))
        expect_s = max(-lo, hi) / np.float32(qp.qmax) if sym else (hi - lo) / np.float32(qp.qmax - qp.qmin)
        assert s == expect_s


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("granularity,kwargs", [("tensor", {}), ("channel", {"axis": 0}), ("group", {"group_size": 4})])
def test_round_trip_error_at_most_half_scale(bits: int, sym: bool, granularity: str, kwargs: dict) -> None:
    x = sample()
    qp = qparams_for(x, bits, sym, granularity, **kwargs)
    scale = qp.scale.repeat_interleave(4, -1) if granularity == "group" else qp.scale
    err = (fake_quantize(x, qp) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-12)).all())


def test_symmetric_convention_and_zero_range() -> None:
    qp = compute_qparams(torch.tensor(-2.0, dtype=torch.float64), 1.0, 4, True)
    assert (qp.qmin, qp.qmax) == (-8, 7) and float(qp.scale) == 2.0 / 7 and float(qp.zero_point) == 0.0
    assert compute_qparams(-2.0, 1.0, 4, True).scale.dtype == torch.float32  # python floats: float32
    q = quantize(torch.tensor([-2.0, 2.0, -3.0]), qp)
    assert q.tolist() == [-7, 7, -8]  # +-absmax exact; -8 only for clipped inputs
    zero = compute_qparams(0.0, 0.0, 8, False)
    assert float(zero.scale) == 1.0 and float(zero.zero_point) == 0.0
    assert float(compute_qparams(0.0, 0.0, 8, True).scale) == 1.0


@pytest.mark.parametrize("bits", [1, 9, 0, 2.0])
def test_bad_bits_raise(bits) -> None:
    with pytest.raises(LeanmlError, match=f"bits {bits!r} .*from 2 to 8"):
        qparams_for(sample(), bits, False)
    with pytest.raises(LeanmlError, match=f"bits {bits!r}"):
        compute_qparams(-1.0, 1.0, bits, True)


def test_bad_group_and_axis_raise() -> None:
    w = torch.randn(4, 100)
    with pytest.raises(LeanmlError, match=r"group_size 48 does not divide 100 \(the size of axis 1\)"):
        qparams_for(w, 4, False, "group", group_size=48)
    with pytest.raises(LeanmlError, match="group_size 0"):
        qparams_for(w, 4, False, "group", group_size=0)
    with pytest.raises(LeanmlError, match="2-D"):
        qparams_for(torch.randn(2, 3, 4), 4, False, "group", group_size=2)
    with pytest.raises(LeanmlError, match="axis 2"):
        qparams_for(w, 4, False, "channel", axis=2)
    with pytest.raises(LeanmlError, match="granularity 'row'"):
        qparams_for(w, 4, False, "row")
    qp = qparams_for(w, 4, False, "group", group_size=10)
    with pytest.raises(LeanmlError, match="does not match per-group qparams"):
        quantize(torch.randn(4, 90), qp)
    with pytest.raises(LeanmlError, match="finite"):
        compute_qparams(float("-inf"), 1.0, 4, False)


def test_cast_float_fp16_matches_numpy() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1000
    expect = x.numpy().astype(np.float16).astype(np.float32)
    assert torch.equal(cast_float(x, "fp16"), torch.from_numpy(expect))
    assert cast_float(x, "fp16").dtype == torch.float32


def test_cast_float_bf16_matches_bit_rounding() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 1e3
    bits = x.numpy().view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)  # round to nearest even
    assert torch.equal(cast_float(x, "bf16"), torch.from_numpy(rounded.view(np.float32)))
    with pytest.raises(LeanmlError, match="float format 'fp8'"):
        cast_float(x, "fp8")


def test_ste_gradient_is_one_inside_zero_outside() -> None:
    qp = compute_qparams(-1.0, 1.0, 4, True)  # clipping range [-8/7, 1]
    x = torch.linspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    y = fake_quantize_ste(x, qp)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), qp))
    y.backward(torch.full_like(y, 3.0))
    lo, hi = (qp.qmin - 0.0) * float(qp.scale), qp.qmax * float(qp.scale)
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert torch.equal(x.grad, 3.0 * inside.double())
    assert inside.any() and (~inside).any()


def test_ste_per_group() -> None:
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    qp = qparams_for(w.detach() * 0.5, 3, False, "group", group_size=4)  # range too small: some clipping
    fake_quantize_ste(w, qp).sum().backward()
    t = w.detach() / qp.scale.repeat_interleave(4, 1) + qp.zero_point.repeat_interleave(4, 1)
    assert torch.equal(w.grad, ((t >= 0) & (t <= 7)).double())


def test_mse_clip_range_picks_best_ratio_per_row() -> None:
    torch.manual_seed(3)
    x = torch.distributions.StudentT(2.0).sample((4, 500)).double()
    ratios = [1.0, 0.8, 0.6, 0.4, 0.2]
    lo, hi = mse_clip_range(x, 3, True, ratios)
    for r in range(4):
        errs = []
        for ratio in ratios:
            qp = compute_qparams(ratio * x[r].min(), ratio * x[r].max(), 3, True)
            errs.append(float((fake_quantize(x[r], qp) - x[r]).pow(2).sum()))
        best = ratios[int(np.argmin(errs))]
        assert float(hi[r]) == pytest.approx(best * float(x[r].max().clamp(min=0)), rel=1e-12)


def test_qparams_dataclass_fields() -> None:
    qp = qparams_for(torch.randn(4, 8), 4, False, "group", group_size=4)
    assert isinstance(qp, QParams) and qp.group_size == 4 and qp.axis == 1 and qp.scale.shape == (4, 2)


def test_mse_clip_range_in_row_chunks_equals_one_pass(monkeypatch) -> None:
    """Rows are searched a chunk at a time (bounded temporaries); each row's answer is the same."""
    import leanml.quantize.primitives as prim

    torch.manual_seed(4)
    x = torch.distributions.StudentT(2.0).sample((37, 64))
    whole = mse_clip_range(x, 4, False)
    monkeypatch.setattr(prim, "CLIP_CHUNK_ELEMENTS", 5 * 64)  # 5 rows a chunk: 8 chunks, the last short
    chunked = mse_clip_range(x, 4, False)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clip_range_equals_fake_quantize_search(symmetric, dtype) -> None:
    """The in-place search picks exactly the ranges a plain search over fake_quantize picks."""
    torch.manual_seed(5)
    x = torch.distributions.StudentT(3.0).sample((300, 32)).to(dtype)
    ratios = default_clip_ratios(20)
    lo, hi = mse_clip_range(x, 3, symmetric, ratios)
    xmin, xmax = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    errs = []
    for r in ratios:
        qp = compute_qparams(r * xmin[:, None], r * xmax[:, None], 3, symmetric)
        errs.append((fake_quantize(x, qp) - x).double().pow(2).sum(1))
    best = torch.stack(errs).argmin(0)  # first minimum: ties keep the larger ratio
    rows = torch.arange(x.shape[0])
    assert torch.equal(lo, torch.stack([r * xmin for r in ratios])[best, rows])
    assert torch.equal(hi, torch.stack([r * xmax for r in ratios])[best, rows])


@pytest.mark.parametrize("mse_clip", [False, True])
def test_rtn_in_row_chunks_equals_one_pass(monkeypatch, mse_clip) -> None:
    """rtn_quantize_weight rounds a large weight a few rows at a time; every output is the same."""
    import leanml.quantize.gptq as gptq

    torch.manual_seed(6)
    w = torch.randn(37, 128)
    whole = gptq.rtn_quantize_weight(w, 4, 32, False, mse_clip=mse_clip)
    monkeypatch.setattr(gptq, "RTN_CHUNK_ELEMENTS", 5 * 128)  # 5 rows a chunk, the last one short
    chunked = gptq.rtn_quantize_weight(w, 4, 32, False, mse_clip=mse_clip)
    for field in ("weight", "codes", "scales", "zero_points", "g_idx"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field)), field
