"""The quality budget (how much worse the chosen model may be) and the objectives a search minimises."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import LeanmlError

DROP_TYPES = ("relative", "absolute")

# objective name → (label, how to read it from a Measurement dict)
OBJECTIVES: dict[str, tuple[str, object]] = {
    "usd": ("$ per million {item}s", lambda m: m["usd_per_million"]),
    "latency": ("latency p50 ms", lambda m: m["latency_ms"]["p50"]),
    "size": ("bytes on disk", lambda m: m["disk_bytes"]),
    "energy": ("joules per {item}", lambda m: m["energy_j_per_item"]),
    "memory": ("peak memory bytes", lambda m: serving_peak(m)),
}


def serving_peak(measurement: dict) -> float:
    """Peak resident memory of serving the model: of a process that serves only it when that was
    measured (``serving_memory``), else of the measuring process."""
    serving = measurement.get("serving_memory") or {}
    return float(serving.get("peak_bytes") or measurement["peak_memory_bytes"])


LOWER_IS_BETTER = {"perplexity", "loss", "error", "wer", "mse"}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` means a better model (perplexity and losses: no)."""
    return metric.lower() not in LOWER_IS_BETTER


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise LeanmlError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return name


def objective_value(name: str, measurement: dict) -> float:
    return float(OBJECTIVES[check_objective(name)][1](measurement))


def objective_label(name: str, item: str = "item") -> str:
    return OBJECTIVES[check_objective(name)][0].format(item=item)


@dataclass(frozen=True)
class Budget:
    """At most ``max_drop`` worse than the original: a fraction of its value (``relative``) or metric units (``absolute``)."""

    max_drop: float
    drop_type: str = "relative"

    def __post_init__(self) -> None:
        if self.drop_type not in DROP_TYPES:
            raise LeanmlError(f"drop type {self.drop_type!r} is not one of {', '.join(DROP_TYPES)}")
        if not (isinstance(self.max_drop, (int, float)) and math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise LeanmlError(f"max drop {self.max_drop!r} must be a number >= 0 (e.g. 1% or 0.01)")

    def drop(self, base: float, value: float, higher_better: bool) -> float:
        """How much worse ``value`` is than ``base`` (positive = worse), in this budget's units."""
        worse = (base - value) if higher_better else (value - base)
        return worse / abs(base) if self.drop_type == "relative" else worse

    def meets(self, base: float, value: float, higher_better: bool) -> bool:
        return self.drop(base, value, higher_better) <= self.max_drop + 1e-12

    def threshold(self, base: float, higher_better: bool) -> float:
        """The worst metric value the budget allows."""
        allowed = self.max_drop * abs(base) if self.drop_type == "relative" else self.max_drop
        return base - allowed if higher_better else base + allowed

    def text(self, metric: str, higher_better: bool) -> str:
        way = "decrease" if higher_better else "increase"
        amount = f"{self.max_drop:.4g}" if self.drop_type == "absolute" else f"{self.max_drop * 100:.4g}%"
        return f"at most {amount} {self.drop_type} {way} in {metric}"


def parse_drop(text: str | float) -> float:
    """``'5%'`` → 0.05, ``'0.01'`` → 0.01; refuses negatives and non-numbers with a one-line error."""
    raw = str(text).strip()
    scale = 0.01 if raw.endswith("%") else 1.0
    try:
        value = float(raw.rstrip("%")) * scale
    except ValueError:
        raise LeanmlError(f"max drop {text!r} is not a number or a percentage (e.g. 1% or 0.01)") from None
    if not math.isfinite(value) or value < 0:
        raise LeanmlError(f"max drop {text!r} must be >= 0 (e.g. 1% or 0.01)")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float | None) -> float | None:
    """``'20m'``, ``'90s'``, ``'1h30m'`` or plain seconds → seconds (None stays None)."""
    if text is None:
        return None
    raw = str(text).strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", raw)
        if not raw or parts is None:
            raise LeanmlError(f"time budget {text!r} is not a duration (e.g. 90s, 20m, 1h30m)") from None
        seconds = sum(float(v) * u for v, u in zip(parts.groups(), (3600, 60, 1), strict=True) if v)
    if not math.isfinite(seconds) or seconds <= 0:
        raise LeanmlError(f"time budget {text!r} must be positive (e.g. 90s, 20m, 1h30m)")
    return seconds


_MEMORY_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str | float | None) -> float | None:
    """``'1.5GB'``, ``'800MiB'`` or plain bytes → bytes (None stays None)."""
    if text is None:
        return None
    raw = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", raw)
    if m is None or m.group(2) not in _MEMORY_UNITS:
        raise LeanmlError(f"memory {text!r} is not an amount of memory (e.g. 1.5GB, 800MB, 2GiB)")
    value = float(m.group(1)) * _MEMORY_UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise LeanmlError(f"memory {text!r} must be positive (e.g. 1.5GB)")
    return value
