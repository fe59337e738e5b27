"""How much of a quality difference is noise: paired bootstrap intervals on a candidate's quality drop.

The original and a candidate are scored on the same windows, items or pairs (``evaluate(...,
samples=True)`` keeps what each figure is made of). One bootstrap replicate draws the units with
replacement - the same draw for both models, so the interval is on the *difference*, not on two
independent figures - and recomputes both metrics and the drop. The interval is the percentile
interval of the replicated drops.

Units: perplexity resamples windows (the figure is total NLL over total tokens of the drawn windows);
accuracy resamples items; Spearman resamples texts when texts take part in several pairs (every pair
of 50 documents: a drawn multiset of texts scores every pair among them, counted as often as it is
drawn) and pairs otherwise (each text in one pair, as in STS-style files).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from ..errors import LeanmlError

N_BOOT = 1000
LEVEL = 0.90


def _metric(samples: dict, weights: np.ndarray | None = None) -> float:
    """The figure of ``samples``, each unit counted ``weights`` times (all once when None)."""
    kind = samples["kind"]
    if kind == "perplexity":
        nll, tok = np.asarray(samples["nll"], float), np.asarray(samples["tokens"], float)
        w = np.ones_like(nll) if weights is None else weights
        return math.exp(float((w * nll).sum() / (w * tok).sum()))
    if kind == "accuracy":
        c = np.asarray(samples["correct"], float)
        w = np.ones_like(c) if weights is None else weights
        return float((w * c).sum() / w.sum())
    if kind == "spearman":
        cos, scores = np.asarray(samples["cos"], float), np.asarray(samples["scores"], float)
        if weights is not None:
            reps = np.asarray(weights, int)
            cos, scores = np.repeat(cos, reps), np.repeat(scores, reps)
        return _spearman(cos, scores)
    raise LeanmlError(f"unknown kind of quality samples {kind!r}")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _units(samples: dict) -> tuple[str, int]:
    kind = samples["kind"]
    if kind == "perplexity":
        return "windows", len(samples["nll"])
    if kind == "accuracy":
        return "items", len(samples["correct"])
    pairs = samples["pairs"]
    n_texts = 1 + max(max(p) for p in pairs)
    return ("texts", n_texts) if 2 * len(pairs) > n_texts else ("pairs", len(pairs))


def _weights(samples: dict, unit: str, draw: np.ndarray, n: int) -> np.ndarray:
    """How many times each scoring unit (window, item, pair) counts in one replicate."""
    counts = np.bincount(draw, minlength=n).astype(float)
    if unit != "texts":
        return counts
    p = np.asarray(samples["pairs"], int)
    return counts[p[:, 0]] * counts[p[:, 1]]


def check_same_units(base: dict, cand: dict) -> None:
    if base["kind"] != cand["kind"]:
        raise LeanmlError(f"quality samples of kinds {base['kind']!r} and {cand['kind']!r} cannot be compared")
    if _units(base) != _units(cand) or (base["kind"] == "spearman" and base["pairs"] != cand["pairs"]):
        raise LeanmlError("the two models were scored on different windows, items or pairs")


def drop_interval(base: dict, cand: dict, drop, *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Paired bootstrap interval of ``drop(base_value, cand_value)`` (a function of the two figures,
    e.g. :meth:`leanml.search.budget.Budget.drop` with the metric's direction bound).

    Returns ``{"drop", "low", "high", "level", "n_boot", "unit", "n_units"}``; ``drop`` is the drop of
    the full samples. Replicates whose metric is undefined (a Spearman over constant values) are left out.
    """
    if not 0 < level < 1:
        raise LeanmlError(f"interval level {level!r} must be between 0 and 1")
    check_same_units(base, cand)
    unit, n = _units(base)
    point = drop(_metric(base), _metric(cand))
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(n_boot):
        w = _weights(base, unit, rng.integers(0, n, size=n), n)
        if w.sum() == 0:
            continue
        d = drop(_metric(base, w), _metric(cand, w))
        if math.isfinite(d):
            drops.append(d)
    if not drops:
        raise LeanmlError("no bootstrap replicate gave a finite quality drop")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(drops, [tail, 100 - tail])
    return {
        "drop": float(point),
        "low": float(low),
        "high": float(high),
        "level": level,
        "n_boot": len(drops),
        "unit": unit,
        "n_units": n,
    }


def metric_of(samples: dict) -> float:
    """The figure the samples make (the same value ``evaluate`` reports)."""
    return _metric(samples)
