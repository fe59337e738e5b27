"""`Recipe`: an ordered list of technique configs, with a YAML round trip and built-in names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .config import (
    CONFIG_TYPES,
    Int8Dynamic,
    Int8Static,
    SmoothQuant,
    TechniqueConfig,
    WeightOnly,
    accepted_kinds,
    config_from_dict,
    show,
    validation_message,
)
from .errors import LeanmlError
from .models.handle import ModelHandle
from .prune.config import Prune, StructuredPrune

RECIPE_VERSION = 1


class Recipe(BaseModel):
    """Techniques applied in order (e.g. prune, then quantize)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    steps: list[TechniqueConfig]
    version: int = RECIPE_VERSION

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise LeanmlError(validation_message(type(self), exc)) from None

    @field_validator("steps", mode="before")
    @classmethod
    def _step_configs(cls, steps: Any) -> Any:
        # step dicts become their config types (not the bare TechniqueConfig base, which has no handler)
        return [step_config(s, i) for i, s in enumerate(steps, 1)] if isinstance(steps, list) else steps

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "steps": [s.model_dump(exclude_defaults=False) for s in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, name: str = "custom", source: str = "recipe") -> Recipe:
        """The recipe ``data`` describes: a mapping with ``steps`` (and optionally ``name``,
        ``version``) or a bare list of steps. Errors are one line, prefixed by ``source`` (e.g.
        ``recipe 'r.yaml'``) and naming the step (counted from 1)."""
        if isinstance(data, list):
            data = {"steps": data}
        if data is None:
            raise LeanmlError(f"{source} is empty; write a mapping with a 'steps' list (e.g. steps: [{{kind: weight-only}}])")
        if not isinstance(data, dict):
            raise LeanmlError(
                f"{source} must be a mapping with a 'steps' list (or a list of steps), got {type(data).__name__} {show(data)}"
            )
        extra = [k for k in data if k not in ("name", "steps", "version")]
        if extra:
            raise LeanmlError(f"{source} has unknown field(s) {show(sorted(map(str, extra)))}; accepted: name, steps, version")
        if "steps" not in data:
            raise LeanmlError(
                f"{source} has no 'steps'; write a 'steps' list of techniques (e.g. steps: [{{kind: weight-only}}])"
            )
        steps = data["steps"]
        if not isinstance(steps, list) or not steps:
            raise LeanmlError(f"{source} field 'steps' must be a non-empty list of techniques, got {show(steps)}")
        version = data.get("version", RECIPE_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= RECIPE_VERSION:
            raise LeanmlError(f"{source} version {show(version)} is not accepted; accepted: 1 to {RECIPE_VERSION}")
        label = data.get("name", name)
        if not isinstance(label, (str, int, float)) or isinstance(label, bool):
            raise LeanmlError(f"{source} name {show(label)} is not accepted; use a short text")
        return cls(name=str(label), steps=[step_config(s, i, source) for i, s in enumerate(steps, 1)])

    @classmethod
    def from_yaml(cls, text: str, name: str = "custom", source: str = "recipe") -> Recipe:
        return cls.from_dict(parse_yaml(text, source), name=name, source=source)


def step_config(step: Any, index: int, source: str = "recipe") -> TechniqueConfig:
    """Step ``index`` (from 1) of a recipe as a config; one-line errors say which step is wrong."""
    where = f"{source} step {index}"
    if isinstance(step, TechniqueConfig):
        return step
    if not isinstance(step, dict):
        raise LeanmlError(f"{where} is a {type(step).__name__} ({show(step)}), not a mapping; write e.g. '- kind: weight-only'")
    if "kind" not in step:
        raise LeanmlError(f"{where} has no 'kind'; accepted kinds: {accepted_kinds()}")
    kind, kinds = step["kind"], accepted_kinds()  # (accepted_kinds registers every kind)
    if not isinstance(kind, str) or kind not in CONFIG_TYPES:
        raise LeanmlError(f"{where}: unknown technique {show(kind)}; accepted kinds: {kinds}")
    try:
        return config_from_dict(step)
    except LeanmlError as exc:
        raise LeanmlError(f"{where} ({kind}): {exc}") from None


def parse_yaml(text: str, source: str = "recipe") -> Any:
    """``yaml.safe_load(text)``; a syntax error names ``source`` and the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        context = exc.context_mark
        if exc.problem and exc.context and context is not None and context is not mark:
            problem += f" ({exc.context} started at line {context.line + 1}, column {context.column + 1})"
        raise LeanmlError(f"{source} is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:  # a ReaderError: a character YAML does not allow
        position = getattr(exc, "position", None)
        where = ""
        if isinstance(position, int):
            line, column = text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)
            where = f" at line {line}, column {column}"
        reason = str(exc).splitlines()[0]  # e.g. unacceptable character #x0000: special characters are not allowed
        raise LeanmlError(f"{source} is not valid YAML{where}: {reason}") from None
    except RecursionError:
        raise LeanmlError(f"{source} is nested too deeply to be a recipe") from None


BUILTIN_RECIPES: dict[str, list[TechniqueConfig]] = {
    "w8": [WeightOnly(bits=8, group_size=None, symmetric=True, method="rtn", mse_clip=False, head_bits=8)],
    "w4-g64": [
        WeightOnly(
            bits=4,
            group_size=64,
            method="awq+gptq",
            act_order=True,
            mse_clip=True,
            outlier_factor=8.0,
            refine_scales=True,
            calib_windows=32,
            head_bits=8,
        )
    ],
    "w3-g64": [
        WeightOnly(
            bits=3,
            group_size=64,
            method="awq+gptq",
            act_order=True,
            mse_clip=True,
            outlier_factor=8.0,
            refine_scales=True,
            calib_windows=32,
        )
    ],
    "w8a8": [SmoothQuant(alpha=0.5, activations="dynamic")],
    "int8-static": [Int8Static(observer="minmax")],
    "int8-dynamic": [Int8Dynamic()],
    "sparse-50": [Prune(method="sparsegpt", sparsity=0.5, dense_targets=True, outlier_factor=8.0)],
    "sparse-2of4": [Prune(method="sparsegpt", pattern="2:4", dense_targets=True, outlier_factor=8.0)],
    "ffn-25": [StructuredPrune(unit="neurons", ratio=0.25, criterion="activation", calib_windows=16)],
    "filters-50": [StructuredPrune(unit="filters", ratio=0.5, criterion="activation", calib_windows=16)],
}


def load_recipe(spec: str | os.PathLike | Recipe | TechniqueConfig | list | dict) -> Recipe:
    """A recipe from a built-in name, a YAML path, a config, a list of configs (or step dicts), a
    mapping with ``steps``, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, TechniqueConfig):
        return Recipe(steps=[spec])
    if isinstance(spec, (list, dict)):
        return Recipe.from_dict(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise LeanmlError(
            f"recipe {show(spec)} ({type(spec).__name__}) is not accepted; give a built-in name "
            f"({', '.join(BUILTIN_RECIPES)}), a YAML file, a config, a list of configs or a Recipe"
        )
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text in BUILTIN_RECIPES:
        return Recipe(name=text, steps=list(BUILTIN_RECIPES[text]))
    path = Path(text).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise LeanmlError(f"recipe {text!r} is neither a built-in name ({', '.join(BUILTIN_RECIPES)}) nor a YAML file")
    source = f"recipe {text!r}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LeanmlError(f"{source} cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LeanmlError(
            f"{source} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, offset {exc.start}); save it as UTF-8 YAML"
        ) from None
    return Recipe.from_yaml(content, name=path.stem, source=source)


# ----------------------------------------------------------------------------------------------------
# Checking a recipe against a model before anything is measured or calibrated
# ----------------------------------------------------------------------------------------------------

# steps that replace the targeted layers by modules that are no longer nn.Linear / nn.Conv2d, so a
# later step cannot select them again
_REPLACES_LAYERS = ("weight-only", "mixed-precision", "qat", "int8-dynamic", "int8-static", "smoothquant", "float", "codebook")


def validate_recipe(handle: ModelHandle, recipe: Any) -> Recipe:
    """Check ``recipe`` against the loaded model of ``handle`` without changing it and without data:
    what every step's handler would refuse before calibrating. Returns the recipe (as a
    :class:`Recipe`); raises a one-line :class:`LeanmlError` naming the step otherwise.

    Checked, step by step, as the handlers do: the step applies to the model's task where the
    registry knows (:func:`leanml.registry.applicable_tasks`) and needs a PyTorch model; its
    ``targets``/``ignore`` patterns each match a layer of the types it transforms (the error names
    the pattern and a few layers that exist) and leave at least one; ``group_size`` divides the
    inputs of every targeted layer (weight-only, mixed-precision, qat: the quantizer's own check),
    ``m`` of an N:M pattern and the NF4 ``block_size`` likewise; structured pruning's unit fits the
    model's layout and its ratio leaves units. Later steps are checked against the layers earlier
    steps leave selectable (a quantized layer is not a Linear any more); widths are not checked after
    a step that changes them (structured pruning, distillation into a new student).
    """
    from torch import nn

    from .registry import check_task

    recipe = load_recipe(recipe)
    if not isinstance(handle, ModelHandle):
        raise LeanmlError(f"validate_recipe takes a ModelHandle (from leanml.load_model), got {type(handle).__name__}")
    state = {"gone": set(), "reshaped": False}
    for index, step in enumerate(recipe.steps, 1):
        where = f"recipe {recipe.name!r} step {index}"
        check_task(step, handle.task, where)
        model = handle.module
        if not handle.is_torch or not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
            raise LeanmlError(
                f"{where} ({step.kind}) needs an eager PyTorch model; {handle.name!r} runs on "
                f"{handle.runtime if not handle.is_torch else type(model).__name__}"
            )
        try:
            _validate_step(handle, step, state)
        except LeanmlError as exc:
            raise LeanmlError(f"{where} ({step.kind}): {exc}") from None
    return recipe


def _validate_step(handle: ModelHandle, step: TechniqueConfig, state: dict) -> None:
    from torch import nn

    from .quantize.api import _check_groups, _output_heads
    from .targeting import get_module, select_layers

    model, task, gone, reshaped = handle.module, handle.task, state["gone"], state["reshaped"]
    kind = step.kind
    if kind in ("distill", "finetune"):  # they train the model as a whole; targets are not theirs
        if kind == "distill" and step.student is not None:
            state["reshaped"] = True
        return
    if kind == "prune-structured":
        _validate_structured(handle, step, gone, reshaped)
        state["reshaped"] = True
        return
    types = (nn.Linear, nn.Conv2d) if kind == "int8-static" else (nn.Linear,)
    names = select_layers(model, types, step.targets, step.ignore, task, exclude=gone)
    if not reshaped:
        if kind in ("weight-only", "mixed-precision", "qat"):
            _check_groups(model, names, step.group_size)
        elif kind == "codebook" and step.method == "nf4":
            for name in names:
                width = get_module(model, name).in_features
                if width % step.block_size:
                    raise LeanmlError(f"block_size {step.block_size} does not divide the {width} inputs of {name!r}")
        elif kind == "prune" and step.m is not None:
            from .prune.api import _check_nm_widths

            _check_nm_widths(model, names, step.m)
    if kind in _REPLACES_LAYERS:
        gone.update(names)
        if kind == "weight-only" and step.head_bits is not None and task == "causal-lm":
            gone.update(_output_heads(model))


def _plan_on_example(handle: ModelHandle, cfg: TechniqueConfig, producer_types: tuple) -> None:
    """The dependency analysis (torch.fx) of a plain network on its example inputs, before anything is
    measured or calibrated: a model none of whose channels can be removed is refused now. Skipped when the
    example inputs do not run (the data's inputs trace it later)."""
    import torch

    from .prune import structured as st
    from .prune.dependency import channel_groups
    from .prune.units import units_to_remove

    example = handle.example_inputs
    if example is None:
        return
    model = handle.module
    was_training = model.training
    model.eval()  # a run in training mode would move BatchNorm statistics: validation changes nothing
    try:
        with torch.no_grad():
            handle.call(example)
    except Exception:  # noqa: BLE001 - inputs guessed for the model that do not fit it
        return
    finally:
        model.train(was_training)
    plan, _ = st._plan_groups(handle, cfg, channel_groups(handle.module, example), producer_types)
    for g in plan:
        units_to_remove(cfg.ratio, g.channels, f"layer {g.producers[0]!r}")


def _validate_structured(handle: ModelHandle, cfg: TechniqueConfig, gone: set[str], reshaped: bool = False) -> None:
    """The checks of :func:`leanml.prune.structured.apply_structured_prune` that need no data."""
    from torch import nn

    from .prune import structured as st
    from .prune.units import units_to_remove
    from .targeting import get_module, select_layers

    model = handle.module
    layout = st.check_unit_layout(handle, cfg)
    if layout is None:  # filters or neurons of a plain network
        producer_types = st.CONV if cfg.unit == "filters" else (nn.Linear,)
        if not any(isinstance(m, producer_types) for m in model.modules()):
            what = "Conv" if cfg.unit == "filters" else "Linear"
            raise LeanmlError(f"unit {cfg.unit!r} does not apply to model {handle.name!r}: it has no {what} layers")
        select_layers(model, producer_types, cfg.targets, cfg.ignore, handle.task, exclude=gone)
        if not gone and not reshaped:  # the model as it is now is the model this step will prune
            _plan_on_example(handle, cfg, producer_types)
        return
    if cfg.unit == "neurons":
        st._check_blocks(handle, layout, cfg, lambda b: b.ffn_layers)
        units_to_remove(cfg.ratio, layout.intermediate, f"the FFN of {layout.blocks[0].name!r}")
    elif cfg.unit == "heads":
        st._check_blocks(handle, layout, cfg, lambda b: b.attn_layers)
        name0 = layout.blocks[0].name
        if cfg.gqa == "kv-groups" or layout.rep == 1:
            what = "key/value heads" if layout.rep > 1 else "attention heads"
            units_to_remove(cfg.ratio, layout.n_kv, f"the {what} of {name0!r}")
        else:
            units_to_remove(cfg.ratio, layout.rep, f"the {layout.rep} query heads of each key/value group of {name0!r}")
    else:
        by_name = {b.name for b in layout.blocks}
        block_type = type(get_module(model, layout.blocks[0].name))
        names = select_layers(model, (block_type,), cfg.targets, cfg.ignore, handle.task, what="transformer layer")
        cands = [n for n in names if n in by_name]
        if not cands:
            raise LeanmlError(f"targets/ignore select no layer of {layout.layers!r}")
        units_to_remove(cfg.ratio, len(cands), f"the {len(cands)} selected layers of {layout.layers!r}")
