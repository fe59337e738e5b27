"""The registry: technique config type → the function that applies it. Explicit, in one place.

It also says, where that is known without running anything, which model tasks a step applies to
(:func:`applicable_tasks`), so that :func:`leanml.recipe.validate_recipe` refuses a step before any
measurement or calibration instead of failing minutes into the run.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import TechniqueConfig
from .errors import LeanmlError

Handler = Callable[..., object]

# config class -> "module:function" of its handler (a plain function of (handle, config, data)); the
# modules are imported on first use, and they do not import this table back
HANDLERS: dict[str, str] = {
    "WeightOnly": "leanml.quantize.api:apply_weight_only",
    "MixedPrecision": "leanml.quantize.api:apply_mixed_precision",
    "QAT": "leanml.quantize.api:apply_qat",
    "Int8Dynamic": "leanml.quantize.api:apply_int8_dynamic",
    "Int8Static": "leanml.quantize.api:apply_int8_static",
    "SmoothQuant": "leanml.quantize.api:apply_smoothquant",
    "FloatCast": "leanml.quantize.api:apply_float",
    "Codebook": "leanml.quantize.api:apply_codebook",
    "Prune": "leanml.prune.api:apply_prune",
    "GradualPrune": "leanml.prune.api:apply_gradual_prune",
    "Finetune": "leanml.prune.finetune:apply_finetune",
    "StructuredPrune": "leanml.prune.structured:apply_structured_prune",
    "Distill": "leanml.distill.api:apply_distill",
}

_ALL_BUT_ENCODERS = ("causal-lm", "sequence-classification", "image-classification", "generic")

# kind -> (the step's config -> (tasks it applies to, why) or None for every task). These mirror checks
# the handlers make only after calibrating or building batches.
_TASK_RULES: dict[str, Callable[[TechniqueConfig], tuple[tuple[str, ...], str] | None]] = {
    # QAT without distillation trains on the next-token loss of the batches' input_ids
    "qat": lambda c: None if c.distill else (("causal-lm",), "distill: false trains on the next-token loss"),
    # a text encoder's training texts carry no labels, so a task loss has nothing to fit
    "finetune": lambda c: (_ALL_BUT_ENCODERS, f"loss {c.loss!r} needs labels or next tokens") if "task" in c.loss else None,
    "distill": lambda c: (
        (("causal-lm",), "cache_teacher keeps a causal LM's per-token logits")
        if c.cache_teacher
        else (_ALL_BUT_ENCODERS, "loss term 'task' needs labels or next tokens")
        if "task" in c.terms
        else None
    ),
}


def handler_for(config: TechniqueConfig) -> Handler:
    """The function that applies ``config`` (see :data:`HANDLERS`)."""
    import importlib

    if not isinstance(config, TechniqueConfig):
        raise LeanmlError(f"a recipe step must be a technique config, got {type(config).__name__}")
    target = HANDLERS.get(type(config).__name__)
    if target is None:
        raise LeanmlError(f"no handler registered for technique {config.kind!r}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def applicable_tasks(config: TechniqueConfig) -> tuple[tuple[str, ...], str] | None:
    """The model tasks ``config`` applies to and the reason, where the registry knows a restriction;
    None when it applies to every task."""
    rule = _TASK_RULES.get(config.kind)
    return rule(config) if rule is not None else None


def check_task(config: TechniqueConfig, task: str, where: str = "step") -> None:
    """A one-line error when ``config`` is known not to apply to a model of ``task``."""
    known = applicable_tasks(config)
    if known is not None and task not in known[0]:
        tasks, why = known
        raise LeanmlError(f"{where} ({config.kind}) does not apply to a {task} model: {why}; it applies to {', '.join(tasks)}")
