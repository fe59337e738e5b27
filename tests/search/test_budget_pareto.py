"""Budgets, objectives, durations and Pareto fronts."""

from __future__ import annotations

import random

import pytest

from leanml.errors import LeanmlError
from leanml.search import Budget, pareto_front, parse_drop, parse_duration
from leanml.search.budget import check_objective, higher_is_better, objective_value
from leanml.search.pareto import dominates


def brute_front(points):
    """Non-dominated points by definition: no other point is <= everywhere and < somewhere."""
    out = []
    for i, p in enumerate(points):
        if not any(
            all(q[k] <= p[k] for k in range(len(p))) and any(q[k] < p[k] for k in range(len(p)))
            for j, q in enumerate(points)
            if j != i
        ):
            out.append(i)
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_pareto_front_matches_brute_force_on_random_points(dims):
    rng = random.Random(dims)
    for trial in range(200):
        n = rng.randint(0, 40)
        # a coarse grid makes ties and duplicates common, where sweeps usually go wrong
        points = [tuple(rng.randint(0, 6) for _ in range(dims)) for _ in range(n)]
        assert pareto_front(points) == brute_front(points), (trial, points)


def test_pareto_front_keeps_duplicates_and_drops_dominated():
    pts = [(1, 5), (1, 5), (2, 5), (0, 9), (3, 1), (3, 2)]
    assert pareto_front(pts) == [0, 1, 3, 4]
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2))


def test_relative_budget_on_a_lower_is_better_metric():
    b = Budget(0.05, "relative")  # perplexity 20 may rise to 21
    assert not higher_is_better("perplexity")
    assert b.threshold(20.0, False) == pytest.approx(21.0)
    assert b.meets(20.0, 20.99, False) and not b.meets(20.0, 21.01, False)
    assert b.drop(20.0, 22.0, False) == pytest.approx(0.10)
    assert b.drop(20.0, 19.0, False) == pytest.approx(-0.05)  # better than the original: a negative drop


def test_absolute_budget_on_a_higher_is_better_metric():
    b = Budget(0.01, "absolute")  # Spearman 0.50 may fall to 0.49
    assert higher_is_better("spearman") and higher_is_better("accuracy")
    assert b.threshold(0.50, True) == pytest.approx(0.49)
    assert b.meets(0.50, 0.4901, True) and not b.meets(0.50, 0.4899, True)
    assert b.drop(0.50, 0.47, True) == pytest.approx(0.03)
    assert "0.01 absolute decrease in spearman" in b.text("spearman", True)
    assert Budget(0.01, "relative").threshold(0.5, True) == pytest.approx(0.495)


def test_parsing_drops_and_durations():
    assert parse_drop("5%") == pytest.approx(0.05) and parse_drop("0.01") == 0.01 and parse_drop(0) == 0
    assert parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration("45") == 45 and parse_duration(None) is None


@pytest.mark.parametrize(
    "bad, fn, words",
    [
        ("-1%", parse_drop, "max drop '-1%' must be >= 0"),
        ("lots", parse_drop, "max drop 'lots' is not a number"),
        ("0s", parse_duration, "must be positive"),
        ("soon", parse_duration, "time budget 'soon' is not a duration"),
        ("money", check_objective, "objective 'money' is not one of usd, latency, size, energy"),
    ],
)
def test_bad_input_gets_one_line_errors(bad, fn, words):
    with pytest.raises(LeanmlError, match=words) as info:
        fn(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(LeanmlError, match="drop type 'sideways'"):
        Budget(0.1, "sideways")
    with pytest.raises(LeanmlError, match="must be a number >= 0"):
        Budget(-0.1)


def test_objective_values_are_read_from_a_measurement():
    m = {"usd_per_million": 1.5, "latency_ms": {"p50": 3.0}, "disk_bytes": 100, "energy_j_per_item": 0.2}
    got = [objective_value(k, m) for k in ("usd", "latency", "size", "energy")]
    assert got == [1.5, 3.0, 100.0, 0.2]
