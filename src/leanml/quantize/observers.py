"""Range observers for calibration: call ``observe(x)`` on batches, then ``qparams(bits, symmetric)``.

Memory stays bounded: min/max observers keep running extrema, percentile and MSE observers keep a
uniform random subsample of at most ``max_samples`` values (exact while fewer were seen), and the KL
observer keeps a fixed-size histogram of ``|x|``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from leanml.errors import LeanmlError
from leanml.quantize.primitives import QParams, check_bits, compute_qparams, mse_clip_range


class Observer(ABC):
    """Base class: subclasses implement ``observe`` and ``_range(bits, symmetric)``."""

    @abstractmethod
    def observe(self, x: torch.Tensor) -> None:
        """Update the statistics with the values of ``x``."""

    @abstractmethod
    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) range to quantize with."""

    def qparams(self, bits: int = 8, symmetric: bool = False) -> QParams:
        """QParams for the observed range (see :func:`compute_qparams` for the conventions)."""
        check_bits(bits)
        xmin, xmax = self._range(bits, symmetric)
        return compute_qparams(xmin, xmax, bits, symmetric, axis=getattr(self, "axis", None))


def _samples(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        raise LeanmlError("observe() got an empty tensor; pass at least one value")
    return x.detach()


def _not_empty(value: object) -> None:
    if value is None:
        raise LeanmlError("the observer has seen no data; call observe(x) before qparams()")


class MinMaxObserver(Observer):
    """Running min and max, per tensor (``axis=None``) or per channel along ``axis``."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _samples(x).to(torch.promote_types(x.dtype, torch.float32))
        if self.axis is None:
            return x.min(), x.max()
        if not -x.dim() <= self.axis < x.dim():
            raise LeanmlError(f"axis {self.axis} is out of range for a {x.dim()}-D tensor")
        dims = [d for d in range(x.dim()) if d != self.axis % x.dim()]
        if not dims:
            return x.clone(), x.clone()
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)

    def _check_shape(self, lo: torch.Tensor) -> None:
        if self.min is not None and self.min.shape != lo.shape:
            raise LeanmlError(f"per-channel stats of shape {tuple(lo.shape)} do not match the earlier {tuple(self.min.shape)}")

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self._check_shape(lo)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)

    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _not_empty(self.min)
        return self.min, self.max


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of batch min/max: ``run = run + momentum * (batch - run)``.

    ``momentum`` is the weight of the newest batch (BatchNorm convention); the first batch initialises.
    """

    def __init__(self, momentum: float = 0.1, axis: int | None = None):
        if not 0.0 < momentum <= 1.0:
            raise LeanmlError(f"momentum {momentum!r} is out of range; use a value in (0, 1]")
        super().__init__(axis)
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self._check_shape(lo)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min = self.min + self.momentum * (lo - self.min)
            self.max = self.max + self.momentum * (hi - self.max)


class _ReservoirObserver(Observer):
    """Keeps a uniform sample (without replacement) of at most ``max_samples`` observed values.

    Every value gets a random key; the values with the smallest keys are kept (reservoir sampling), so
    the sample is exact while fewer than ``max_samples`` values have been observed. Also tracks the true
    min/max.
    """

    def __init__(self, max_samples: int = 1 << 20, seed: int = 0):
        if max_samples < 1 or max_samples > 1 << 24:
            raise LeanmlError(f"max_samples {max_samples} is out of range; use 1..{1 << 24}")
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self.values: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        flat = _samples(x).flatten().to(torch.promote_types(x.dtype, torch.float32))
        keys = torch.rand(flat.numel(), generator=self._gen)
        lo, hi = flat.min(), flat.max()
        if self.values is None:
            self.values, self._keys, self.min, self.max = flat.clone(), keys, lo, hi
        else:
            dtype = torch.promote_types(self.values.dtype, flat.dtype)
            self.values = torch.cat([self.values.to(dtype), flat.to(dtype)])
            self._keys = torch.cat([self._keys, keys])
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        if self.values.numel() > self.max_samples:
            keep = torch.topk(self._keys, self.max_samples, largest=False).indices
            self.values, self._keys = self.values[keep], self._keys[keep]


class PercentileObserver(_ReservoirObserver):
    """Clip range at a percentile (linear interpolation, like ``numpy.percentile``).

    Asymmetric: ``[P(100 - p), P(p)]`` of x; symmetric: ``±P(p)`` of ``|x|``.
    """

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 20, seed: int = 0):
        if not 0.0 < percentile <= 100.0:
            raise LeanmlError(f"percentile {percentile!r} is out of range; use a value in (0, 100]")
        super().__init__(max_samples, seed)
        self.percentile = percentile

    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _not_empty(self.values)
        v = self.values.double()
        p = self.percentile / 100.0
        if symmetric:
            a = torch.quantile(v.abs(), p)
            return -a, a
        return torch.quantile(v, 1.0 - p), torch.quantile(v, p)


class MSEObserver(_ReservoirObserver):
    """Clip range ``r * [min, max]`` with the shrink ratio r (from ``ratios``, default 1.0 down to 0.2 in
    steps of 0.01) minimising the fake-quantization MSE on the kept samples."""

    def __init__(self, ratios: Sequence[float] | None = None, max_samples: int = 1 << 20, seed: int = 0):
        super().__init__(max_samples, seed)
        self.ratios = ratios

    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _not_empty(self.values)
        lo, hi = mse_clip_range(self.values[None, :], bits, symmetric, self.ratios, self.min.reshape(1), self.max.reshape(1))
        return lo[0], hi[0]


def _merge_expand(counts: np.ndarray, support: np.ndarray, n_levels: int) -> np.ndarray:
    """Merge ``counts`` into ``n_levels`` near-equal chunks of bins and spread each chunk's total evenly
    over the chunk's bins in ``support`` (other bins get 0)."""
    starts = (np.arange(n_levels) * len(counts)) // n_levels
    inside = support.astype(np.float64)
    mass = np.add.reduceat(counts, starts)
    width = np.add.reduceat(inside, starts)
    per_bin = np.where(width > 0, mass / np.maximum(width, 1.0), 0.0)
    return np.repeat(per_bin, np.diff(np.append(starts, len(counts)))) * inside


def _kl(p: np.ndarray, q: np.ndarray, floor: float = 1e-10) -> float:
    """KL(P || Q) of two count vectors, each normalised; Q's zeros on P's support become ``floor``."""
    m = p > 0
    pn = p[m] / p.sum()
    qn = q / q.sum() if q.sum() > 0 else np.zeros_like(q)
    qn = np.maximum(qn[m], floor)
    return float(np.sum(pn * np.log(pn / qn)))


def kl_threshold_index(hist: np.ndarray, n_levels: int, stride: int = 1) -> int:
    """Number of leading bins ``i`` to keep, by TensorRT entropy calibration (Migacz 2017).

    For each candidate ``i``: the reference P is ``hist[:i]`` with the clipped tail ``sum(hist[i:])``
    folded into its last bin; the candidate Q is ``hist[:i]`` (without the tail) merged into
    ``n_levels`` chunks, each chunk's count spread evenly over the chunk's bins where P is non-empty.
    Returns the ``i`` minimising KL(P || Q) (smallest ``i`` on ties), so both the clipping (tail mass
    piled on the last bin) and the rounding (merged bins) are penalised. Where Q is 0 on P's support,
    Q is floored at 1e-10 (after normalisation).
    """
    hist = np.asarray(hist, dtype=np.float64)
    if n_levels < 2 or n_levels > len(hist):
        raise LeanmlError(f"n_levels {n_levels} is out of range for {len(hist)} histogram bins")
    tail = np.append(np.cumsum(hist[::-1])[::-1], 0.0)
    best_i, best_kl = len(hist), np.inf
    for i in range(n_levels, len(hist) + 1, stride):
        p = hist[:i].copy()
        p[-1] += tail[i]
        if p.sum() <= 0:
            continue
        kl = _kl(p, _merge_expand(hist[:i], p > 0, n_levels))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


class KLObserver(Observer):
    """Entropy (KL) calibration over a histogram of ``|x|`` with ``bins`` bins (a power of two).

    The histogram spans ``[0, bins * width)`` (initially just above the first batch's max|x|); when a
    batch reaches past it, the width doubles (possibly several times) and old bins are merged in pairs,
    which is exact (up to rounding of values within an ulp of a bin edge), so memory is fixed. The threshold T is the
    upper edge of the best ``kl_threshold_index`` with ``2**(bits-1)`` levels; the range is ``±T``
    (symmetric) or ``[max(min, -T), min(max, T)]`` (asymmetric).
    """

    def __init__(self, bins: int = 2048, stride: int = 1):
        if bins < 2 or bins & (bins - 1):
            raise LeanmlError(f"bins {bins} is not supported; use a power of two >= 2 (e.g. 2048)")
        self.bins, self.stride = bins, stride
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.width = 0.0
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def _grow(self, amax: float) -> None:
        if self.width == 0.0:  # nothing but zeros seen so far: all mass is in bin 0 at any width
            self.width = amax * (1.0 + 2.0**-40) / self.bins  # max|x| strictly inside the last bin
            return
        factor = 1
        while amax >= self.width * factor * self.bins:
            factor *= 2
        if factor == 1:
            return
        merged = self.hist.reshape(-1, min(factor, self.bins)).sum(1)  # old bin b -> new bin b // factor
        self.hist = torch.cat([merged, torch.zeros(self.bins - merged.numel(), dtype=torch.float64)])
        self.width *= factor

    def observe(self, x: torch.Tensor) -> None:
        x = _samples(x).double()
        lo, hi = x.min(), x.max()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        a = x.abs().flatten()
        amax = float(a.max())
        if amax > 0:
            self._grow(amax)
        if self.width == 0.0:
            self.hist[0] += a.numel()
            return
        idx = torch.floor(a / self.width).long().clamp(max=self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins).double()

    def threshold(self, bits: int = 8) -> float:
        """The clipping threshold T for ``|x|``."""
        _not_empty(self.min)
        check_bits(bits)
        if self.width == 0.0:
            return 0.0
        i = kl_threshold_index(self.hist.numpy(), 2 ** (bits - 1), self.stride)
        return i * self.width

    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor(self.threshold(bits), dtype=torch.float64)
        if symmetric:
            return -t, t
        return torch.maximum(self.min, -t), torch.minimum(self.max, t)
