"""Technique configs: validated, versioned data that round-trips through JSON and YAML.

Every config has a ``kind`` (its name in a recipe) and layer targeting: ``targets`` (module names or
``re:`` regular expressions; empty = every eligible layer) and ``ignore`` (same syntax; ``None`` = the
technique's default, which for causal LMs ignores the embeddings and ``lm_head``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import LeanmlError

CONFIG_VERSION = 1


class TechniqueConfig(BaseModel):
    """Base of every technique config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    version: int = CONFIG_VERSION
    targets: list[str] = Field(default_factory=list)
    ignore: list[str] | None = None


class WeightOnly(TechniqueConfig):
    """Weight-only integer quantization of linear layers (activations stay float).

    ``method``: ``rtn`` (round to nearest), ``gptq`` (Hessian-based error compensation), ``awq``
    (activation-aware scales + RTN) or ``awq+gptq``. ``group_size`` None means one range per output
    channel. ``outlier_factor`` down-weights tokens whose input norm exceeds that many times the median
    in the Hessian (attention sinks); ``mse_clip`` searches each group's clipping range;
    ``refine_scales`` refits group scales by least squares for the chosen codes. ``head_bits`` also
    quantizes a causal LM's output head (and the input embedding tied to it) by round to nearest,
    symmetric per output channel, at that width; it is ignored for other tasks.
    """

    kind: Literal["weight-only"] = "weight-only"
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(64, ge=1)
    symmetric: bool = False
    method: Literal["rtn", "gptq", "awq", "awq+gptq"] = "gptq"
    act_order: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    mse_clip: bool = True
    outlier_factor: float | None = Field(None, gt=1)
    static_groups: bool = False
    refine_scales: bool = False
    awq_grid: int = Field(20, ge=1)
    calib_windows: int = Field(64, ge=1)
    window: int = Field(512, ge=8)
    head_bits: int | None = Field(None, ge=2, le=8)


class Int8Dynamic(TechniqueConfig):
    """int8 weights (symmetric, per output channel) and int8 activations quantized at run time per token."""

    kind: Literal["int8-dynamic"] = "int8-dynamic"
    per_token: bool = True


class Int8Static(TechniqueConfig):
    """int8 weights per output channel and activations per tensor with ranges calibrated ahead of time."""

    kind: Literal["int8-static"] = "int8-static"
    observer: Literal["minmax", "ema", "percentile", "mse", "kl"] = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)
    symmetric_activations: bool = False
    calib_batches: int = Field(16, ge=1)


class SmoothQuant(TechniqueConfig):
    """W8A8 with SmoothQuant: activation outliers migrated into the weights with strength ``alpha``."""

    kind: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(0.5, ge=0, le=1)
    outlier_factor: float | None = Field(None, gt=1)
    activations: Literal["dynamic", "static"] = "dynamic"
    observer: Literal["minmax", "ema", "percentile", "mse", "kl"] = "minmax"
    calib_windows: int = Field(16, ge=1)


class FloatCast(TechniqueConfig):
    """Cast weights to fp16 or bf16 (stored and run in that precision where the runtime can)."""

    kind: Literal["float"] = "float"
    dtype: Literal["fp16", "bf16"] = "fp16"


class Codebook(TechniqueConfig):
    """Non-linear weight quantization: k-means clustering (2^bits centroids), NF4 or power-of-two levels."""

    kind: Literal["codebook"] = "codebook"
    method: Literal["kmeans", "nf4", "log2"] = "kmeans"
    bits: int = Field(4, ge=2, le=8)
    per_channel: bool = True
    block_size: int = Field(64, ge=1)


class MixedPrecision(TechniqueConfig):
    """Per-layer bit widths from a sensitivity analysis, under an average-bits budget."""

    kind: Literal["mixed-precision"] = "mixed-precision"
    candidates: list[int] = Field(default_factory=lambda: [8, 4, 3])
    avg_bits: float = Field(4.0, gt=1, le=16)
    group_size: int | None = 64
    method: Literal["rtn", "gptq"] = "gptq"
    sensitivity_windows: int = Field(4, ge=1)
    calib_windows: int = Field(64, ge=1)

    @field_validator("candidates")
    @classmethod
    def _bits_in_range(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in range(2, 9) and b != 16]
        if bad or not v:
            raise ValueError(f"candidates {v} must be bit widths in 2..8 (or 16 to keep a layer in float)")
        return sorted(set(v), reverse=True)


class QAT(TechniqueConfig):
    """Quantization-aware training: fine-tune with fake-quantized weights (straight-through estimator)."""

    kind: Literal["qat"] = "qat"
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = 64
    symmetric: bool = False
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-5, gt=0)
    batch_windows: int = Field(1, ge=1)
    window: int = Field(512, ge=8)
    distill: bool = True
    init: Literal["rtn", "gptq"] = "rtn"


CONFIG_TYPES: dict[str, type[TechniqueConfig]] = {
    c.model_fields["kind"].default: c
    for c in (WeightOnly, Int8Dynamic, Int8Static, SmoothQuant, FloatCast, Codebook, MixedPrecision, QAT)
}


def config_from_dict(data: dict) -> TechniqueConfig:
    """Build the config a dict describes; a one-line error names the bad field."""
    if not isinstance(data, dict):
        raise LeanmlError(f"a recipe step must be a mapping with a 'kind', got {data!r}")
    kind = data.get("kind")
    if kind not in CONFIG_TYPES:
        raise LeanmlError(f"unknown technique {kind!r}; accepted: {', '.join(CONFIG_TYPES)}")
    try:
        return CONFIG_TYPES[kind](**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or kind
        value = err.get("input")
        raise LeanmlError(f"{kind}: field {field!r} = {value!r} is not accepted: {err['msg']}") from None
