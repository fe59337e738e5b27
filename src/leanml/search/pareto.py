"""Pareto fronts over objectives that are all minimised."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (every objective minimised), in input order.

    Two objectives: one sort and a sweep, O(n log n). More: pairwise comparison against the front so far.
    Duplicated points are all kept (neither dominates the other).
    """
    pts = [tuple(float(v) for v in p) for p in points]
    if not pts:
        return []
    if len(pts[0]) == 2:
        order = sorted(range(len(pts)), key=lambda i: pts[i])
        front, best_y, last = [], float("inf"), None
        for i in order:
            x, y = pts[i]
            if y < best_y or (last is not None and pts[i] == last):
                front.append(i)
                if y < best_y:
                    best_y, last = y, pts[i]
        return sorted(front)
    front: list[int] = []
    for i, p in enumerate(pts):
        if any(dominates(pts[j], p) for j in range(len(pts)) if j != i):
            continue
        front.append(i)
    return front
