"""Mixed precision: per-layer sensitivity, then a bit allocation under an average-bits budget.

Sensitivity of layer ``l`` at ``b`` bits is the quality change when only that layer is quantized
(round-to-nearest, the config's group size): the mean KL divergence of the model's outputs from the
original's on a few calibration inputs (label-free). The allocation picks one width per layer to
minimise the summed sensitivity subject to Σ bits·weights ≤ avg_bits · Σ weights (a multiple-choice
knapsack, solved exactly by dynamic programming over the budget).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LeanmlError
from ..models.handle import output_tensor
from ..progress import progress
from ..targeting import get_module
from .gptq import rtn_quantize_weight

FLOAT_BITS = 16  # a candidate of 16 keeps the layer in float; its stored cost is counted as 32 bits


def storage_bits(bits: int) -> int:
    return 32 if bits >= FLOAT_BITS else bits


@torch.no_grad()
def layer_sensitivity(handle, names: list[str], batches: list, candidates: list[int], group_size: int | None) -> dict:
    """``{layer: {bits: mean KL}}`` when only that layer is quantized to ``bits`` (RTN)."""
    ref = [output_tensor(handle.call(b)).float().log_softmax(-1) for b in batches]
    table: dict[str, dict[int, float]] = {}
    for name in progress(names, "layer sensitivity"):
        layer = get_module(handle.module, name)
        original = layer.weight.data.clone()
        table[name] = {}
        for bits in candidates:
            if bits >= FLOAT_BITS:
                table[name][bits] = 0.0
                continue
            gs = group_size if group_size and layer.in_features % group_size == 0 else None
            layer.weight.data = rtn_quantize_weight(original, bits, gs, False).weight.to(original.dtype)
            kl = 0.0
            for b, p in zip(batches, ref, strict=True):
                q = output_tensor(handle.call(b)).float().log_softmax(-1)
                kl += float(F.kl_div(q, p, log_target=True, reduction="sum")) / (p.numel() / p.shape[-1])
            table[name][bits] = kl / len(batches)
            layer.weight.data = original
    return table


def allocate_bits(
    sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], avg_bits: float, max_units: int = 200_000
) -> dict[str, int]:
    """One width per layer minimising Σ sensitivity under Σ storage_bits·size ≤ avg_bits·Σ size.

    Solved exactly by dynamic programming over the budget in units of the sizes' greatest common
    divisor; when that grid would exceed ``max_units`` cells, sizes are rounded up to a coarser unit
    (so the budget is never exceeded and the result is optimal on that grid).
    """
    names = list(sensitivity)
    total = sum(sizes.values())
    budget = avg_bits * total
    cheapest = sum(min(storage_bits(b) for b in sensitivity[n]) * sizes[n] for n in names)
    if cheapest > budget + 1e-9:
        smallest = min(min(s) for s in sensitivity.values())
        raise LeanmlError(f"avg_bits {avg_bits} is below what the candidates allow (at least {smallest} bits per weight)")
    unit = math.gcd(*sizes.values())
    unit = max(unit, math.ceil(budget / max_units))
    units = {n: math.ceil(sizes[n] / unit) for n in names}
    capacity = int(budget // unit)
    inf = float("inf")
    best = np.full(capacity + 1, inf)
    best[0] = 0.0
    picks = []
    for n in names:
        options = sorted(sensitivity[n].items())
        new = np.full(capacity + 1, inf)
        pick = np.zeros(capacity + 1, dtype=np.int64)
        for k, (bits, sens) in enumerate(options):
            cost = storage_bits(bits) * units[n]
            if cost > capacity:
                continue
            cand = np.full(capacity + 1, inf)
            cand[cost:] = best[: capacity + 1 - cost] + sens
            better = cand < new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append((n, options, pick))
    c = int(np.argmin(best))
    if not np.isfinite(best[c]):
        raise LeanmlError(f"avg_bits {avg_bits} leaves no feasible width for every layer")
    choice = {}
    for n, options, pick in reversed(picks):
        bits = options[int(pick[c])][0]
        choice[n] = bits
        c -= storage_bits(bits) * units[n]
    return choice
