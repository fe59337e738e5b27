"""Paired bootstrap intervals of a quality drop, against closed-form references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from leanml.errors import LeanmlError
from leanml.search import Budget
from leanml.search.noise import drop_interval, metric_of


def _abs_drop(higher_better: bool):
    return lambda b, c: Budget(0.0, "absolute").drop(b, c, higher_better)


def test_accuracy_interval_matches_the_normal_approximation_of_a_paired_difference():
    rng = np.random.default_rng(0)
    n = 4000
    base = rng.random(n) < 0.8
    flip = rng.random(n) < 0.06  # the candidate disagrees on 6% of the items, in both directions
    cand = np.where(flip, ~base, base)
    b = {"kind": "accuracy", "correct": base.astype(int).tolist()}
    c = {"kind": "accuracy", "correct": cand.astype(int).tolist()}
    iv = drop_interval(b, c, _abs_drop(True), n_boot=2000, seed=1)
    d = base.astype(float) - cand.astype(float)  # per-item drop; its mean is the accuracy drop
    half = 1.6449 * d.std(ddof=1) / math.sqrt(n)  # 90% two-sided normal interval of a mean
    assert iv["drop"] == pytest.approx(d.mean())
    assert iv["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)  # bootstrap vs normal: within 15% of the half-width
    assert iv["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert iv["unit"] == "items" and iv["n_units"] == n


def test_perplexity_interval_matches_the_delta_method():
    rng = np.random.default_rng(2)
    n = 400
    tokens = np.full(n, 511.0)
    nll_b = rng.normal(3.3, 0.3, n) * tokens
    nll_c = nll_b + rng.normal(0.02, 0.01, n) * tokens  # the candidate is a little worse on every window
    b = {"kind": "perplexity", "nll": nll_b.tolist(), "tokens": tokens.tolist()}
    c = {"kind": "perplexity", "nll": nll_c.tolist(), "tokens": tokens.tolist()}
    rel = lambda base, cand: Budget(0.0, "relative").drop(base, cand, False)  # noqa: E731
    iv = drop_interval(b, c, rel, n_boot=2000, seed=3)
    ppl_b, ppl_c = math.exp(nll_b.sum() / tokens.sum()), math.exp(nll_c.sum() / tokens.sum())
    assert metric_of(b) == pytest.approx(ppl_b) and iv["drop"] == pytest.approx(ppl_c / ppl_b - 1)
    # relative drop = exp(mean per-window NLL difference per token) - 1; delta method on that mean
    per = (nll_c - nll_b) / tokens
    half = 1.6449 * per.std(ddof=1) / math.sqrt(n) * (ppl_c / ppl_b)
    assert iv["low"] == pytest.approx(iv["drop"] - half, abs=0.15 * half)
    assert iv["high"] == pytest.approx(iv["drop"] + half, abs=0.15 * half)


def test_spearman_over_texts_and_pairs():
    rng = np.random.default_rng(4)
    n_texts = 30
    pairs = [[i, j] for i in range(n_texts) for j in range(i + 1, n_texts)]
    scores = rng.random(len(pairs))
    cos_b = scores + rng.normal(0, 0.3, len(pairs))
    b = {"kind": "spearman", "cos": cos_b.tolist(), "scores": scores.tolist(), "pairs": pairs}
    assert metric_of(b) == pytest.approx(spearmanr(cos_b, scores).statistic)
    same = drop_interval(b, b, _abs_drop(True), n_boot=200)
    assert same["unit"] == "texts" and same["drop"] == same["low"] == same["high"] == 0.0  # identical models: no noise
    worse = dict(b, cos=(cos_b + rng.normal(0, 0.3, len(pairs))).tolist())
    iv = drop_interval(b, worse, _abs_drop(True), n_boot=300)
    assert iv["low"] < iv["drop"] < iv["high"] and iv["drop"] > 0

    chain = [[2 * k, 2 * k + 1] for k in range(40)]  # each text in one pair: pairs are the units
    c = {"kind": "spearman", "cos": rng.random(40).tolist(), "scores": rng.random(40).tolist(), "pairs": chain}
    assert drop_interval(c, c, _abs_drop(True), n_boot=50)["unit"] == "pairs"


def test_different_units_are_refused():
    a = {"kind": "accuracy", "correct": [1, 0, 1]}
    with pytest.raises(LeanmlError, match="different windows, items or pairs"):
        drop_interval(a, {"kind": "accuracy", "correct": [1, 0]}, _abs_drop(True))
    with pytest.raises(LeanmlError, match="between 0 and 1"):
        drop_interval(a, a, _abs_drop(True), level=1.5)
