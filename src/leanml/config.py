"""Technique configs: validated, versioned data that round-trips through JSON and YAML.

Every config has a ``kind`` (its name in a recipe) and layer targeting: ``targets`` (module names or
``re:`` regular expressions; empty = every eligible layer) and ``ignore`` (same syntax; ``None`` = the
technique's default, which for causal LMs ignores the embeddings and ``lm_head``).

Constructing a config with a bad value raises a one-line :class:`~leanml.errors.LeanmlError` (a
``ValueError``) naming the config, the field, the value and what is accepted, never pydantic's
multi-line ``ValidationError``. Float fields refuse nan and ±inf; ``re:`` patterns must compile.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import LeanmlError
from .targeting import check_pattern

CONFIG_VERSION = 1
_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "not_finite", "finite_number"}


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened to about ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _annotation_types(annotation: Any) -> set[type]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_annotation_types(a) for a in typing.get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


def accepted_values(cls: type[BaseModel], field: str) -> str | None:
    """What a numeric field accepts, from its annotation and bounds (e.g. ``a finite number > 0 and < 1``)."""
    info = cls.model_fields.get(field)
    if info is None:
        return None
    kinds = _annotation_types(info.annotation)
    if float in kinds:
        noun = "a finite number"
    elif int in kinds:
        noun = "an integer"
    else:
        return None
    bounds = [f"{op} {getattr(m, attr)!r}" for m in info.metadata for kind, attr, op in _BOUNDS if isinstance(m, kind)]
    text = noun + (" " + " and ".join(bounds) if bounds else "")
    return text + (" or null" if type(None) in kinds else "")


def validation_message(cls: type[BaseModel], exc: ValidationError) -> str:
    """One line from the first error of ``exc``: the config, the field, the bad value, what is accepted."""
    name = cls.__name__
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc)
    msg = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if not loc:
        return f"{name}: {msg}"
    value = show(err.get("input"))
    if kind == "extra_forbidden":
        fields = ", ".join(cls.model_fields)
        return f"{name} has no field {field!r} (given {value}); accepted fields: {fields}"
    if kind == "missing":
        return f"{name} field {field!r} is required"
    if kind == "frozen_instance":
        return f"{name} is frozen, so {field!r} cannot be set; make a new one with model_copy(update={{{field!r}: {value}}})"
    accepted = accepted_values(cls, loc[0]) if len(loc) == 1 and kind in _RANGE_ERRORS else None
    if kind == "not_finite":
        return f"{name} field {field!r} = {value} {msg}; accepted: {accepted or 'a finite number'}"
    tail = f" (accepted: {accepted})" if accepted else ""
    return f"{name} field {field!r} = {value} is not accepted: {msg}{tail}"


def _float_field(cls: type[BaseModel], field: str | None) -> bool:
    info = cls.model_fields.get(field or "")
    return info is not None and float in _annotation_types(info.annotation)


class TechniqueConfig(BaseModel):
    """Base of every technique config.

    A bad value raises a one-line :class:`LeanmlError` (see the module docstring) instead of
    pydantic's ``ValidationError``; so does assigning to a field (configs are frozen).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    version: int = CONFIG_VERSION
    targets: list[str] = Field(default_factory=list)
    ignore: list[str] | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise LeanmlError(validation_message(type(self), exc)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            inner = exc.errors()[0].get("ctx", {}).get("error")
            if isinstance(inner, LeanmlError):  # raised by __init__ and wrapped by pydantic
                raise inner from None
            raise LeanmlError(validation_message(cls, exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise LeanmlError(validation_message(type(self), exc)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        number = value
        if isinstance(value, str) and _float_field(cls, info.field_name):
            try:
                number = float(value)
            except ValueError:
                return value
        if isinstance(number, float) and not math.isfinite(number):
            raise PydanticCustomError("not_finite", "is not a number" if math.isnan(number) else "is not finite")
        return value

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        for pattern in value or []:
            check_pattern(pattern, info.field_name)
        return value


def kind_of(config_type: type[TechniqueConfig]) -> str:
    """The ``kind`` a config type has in a recipe."""
    return config_type.model_fields["kind"].default


class WeightOnly(TechniqueConfig):
    """Weight-only integer quantization of linear layers (activations stay float).

    ``method``: ``rtn`` (round to nearest), ``gptq`` (Hessian-based error compensation), ``awq``
    (activation-aware scales + RTN) or ``awq+gptq``. ``group_size`` None means one range per output
    channel. ``outlier_factor`` down-weights tokens whose input norm exceeds that many times the median
    in the Hessian (attention sinks); ``mse_clip`` searches each group's clipping range;
    ``refine_scales`` refits group scales by least squares for the chosen codes. ``head_bits`` also
    quantizes a causal LM's output head (and the input embedding tied to it) by round to nearest,
    symmetric per output channel, at that width; it is ignored for other tasks. ``upgrade`` names
    targeted layers (names or patterns, like ``targets``) that end at ``upgrade_bits`` instead: round
    to nearest, symmetric per output channel, from their original weights (so only with ``rtn`` or
    ``gptq``, which change nothing but the layer they quantize). The calibrated pass treats
    them like every other layer, so the other layers' results do not depend on which are upgraded
    (a search assembles such mixes from one pass).
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
    upgrade: list[str] = Field(default_factory=list)
    upgrade_bits: int = Field(8, ge=2, le=8)

    @model_validator(mode="after")
    def _upgrade_needs_a_local_method(self):
        if self.upgrade and self.method in ("awq", "awq+gptq"):
            raise ValueError(
                f"upgrade needs a method that changes only the layer it quantizes (rtn or gptq); {self.method} "
                "folds its scales into the neighbouring layers, so a layer re-quantized from its original weights "
                "would no longer match them"
            )
        return self


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
    group_size: int | None = Field(64, ge=1)
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
    group_size: int | None = Field(64, ge=1)
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


def _register_all() -> None:
    # The pruning, fine-tuning and distillation configs register themselves into CONFIG_TYPES when
    # imported; importing them here makes every kind known however leanml was imported.
    from .distill import config as _distill  # noqa: F401
    from .prune import config as _prune  # noqa: F401
    from .prune import finetune as _finetune  # noqa: F401


def accepted_kinds() -> str:
    """The technique kinds a recipe step may name, comma-separated."""
    _register_all()
    return ", ".join(CONFIG_TYPES)


def config_from_dict(data: dict) -> TechniqueConfig:
    """Build the config a dict describes; a one-line error names the bad field."""
    if not isinstance(data, dict):
        raise LeanmlError(
            f"a recipe step must be a mapping with a 'kind', got {type(data).__name__} {show(data)}; "
            f"accepted kinds: {accepted_kinds()}"
        )
    if "kind" not in data:
        raise LeanmlError(
            f"a recipe step has no 'kind' (fields given: {show(sorted(map(str, data)))}); accepted kinds: {accepted_kinds()}"
        )
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise LeanmlError(f"recipe step field name {show(bad_keys[0])} is not a string; write field names as words")
    kind = data["kind"]
    _register_all()
    if not isinstance(kind, str) or kind not in CONFIG_TYPES:
        raise LeanmlError(f"unknown technique {show(kind)}; accepted kinds: {accepted_kinds()}")
    return CONFIG_TYPES[kind](**data)


def coerce_config(config: Any, accepted: tuple[type[TechniqueConfig], ...], verb: str) -> TechniqueConfig:
    """``config`` as one of the ``accepted`` config types: a config object, or a dict with a ``kind``
    (built by :func:`config_from_dict`). Anything else is a one-line error naming what was received
    and what ``verb`` (e.g. ``leanml.quantize``) accepts."""
    kinds = ", ".join(kind_of(c) for c in accepted)
    names = ", ".join(c.__name__ for c in accepted)
    if isinstance(config, dict):
        if "kind" not in config:
            raise LeanmlError(f"{verb} got a config dict without a 'kind'; accepted kinds: {kinds}")
        config = config_from_dict(config)
    if isinstance(config, TechniqueConfig):
        if isinstance(config, accepted):
            return config
        raise LeanmlError(
            f"{verb} does not apply a {type(config).__name__} config (kind {config.kind!r}); accepted kinds: {kinds}"
        )
    raise LeanmlError(
        f"{verb} takes a config object ({names}) or a dict with a 'kind' ({kinds}), got {type(config).__name__} {show(config)}"
    )
