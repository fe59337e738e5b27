import numpy as np
import pytest

from leanml.measure.stats import percentile, summarize


def test_percentiles_of_known_samples():
    samples = [10.0, 1.0, 4.0, 3.0, 2.0]  # sorted: 1 2 3 4 10
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 95) == pytest.approx(4 + 0.8 * 6)  # position 3.8 → between 4 and 10
    assert percentile(samples, 0) == 1.0 and percentile(samples, 100) == 10.0


@pytest.mark.parametrize("q", [1, 25, 50, 90, 95, 99])
def test_percentile_matches_numpy_linear(q):
    rng = np.random.default_rng(q)
    xs = rng.exponential(size=37).tolist()
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["p50"] == 2.5 and s["mean"] == 2.5 and s["n"] == 4
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert (s["min"], s["max"]) == (1.0, 4.0)
