"""Search: the cheapest recipe × runtime within a quality budget (:func:`optimize`), Pareto fronts, budgets."""

from .budget import Budget, parse_drop, parse_duration
from .pareto import pareto_front
from .study import OptimizeResult, optimize

__all__ = ["Budget", "OptimizeResult", "optimize", "parse_drop", "parse_duration", "pareto_front"]
