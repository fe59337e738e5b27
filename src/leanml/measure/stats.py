"""Summary statistics of repeated timings."""

from __future__ import annotations

import math


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics
    (the same definition as ``numpy.percentile``'s default)."""
    if not samples:
        raise ValueError("percentile of no samples")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: list[float]) -> dict:
    """p50, p95, mean, sample standard deviation, min, max and count of ``samples``."""
    n = len(samples)
    mean = sum(samples) / n
    var = sum((x - mean) ** 2 for x in samples) / (n - 1) if n > 1 else 0.0
    return {
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "mean": mean,
        "std": math.sqrt(var),
        "min": min(samples),
        "max": max(samples),
        "n": n,
    }
