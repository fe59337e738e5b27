"""`Recipe`: an ordered list of technique configs, with a YAML round trip and built-in names."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from .config import Int8Dynamic, Int8Static, SmoothQuant, TechniqueConfig, WeightOnly, config_from_dict
from .errors import LeanmlError
from .prune.config import Prune, StructuredPrune

RECIPE_VERSION = 1


class Recipe(BaseModel):
    """Techniques applied in order (e.g. prune, then quantize)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    steps: list[TechniqueConfig]
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "steps": [s.model_dump(exclude_defaults=False) for s in self.steps]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, name: str = "custom") -> Recipe:
        if not isinstance(data, dict) or "steps" not in data:
            raise LeanmlError("a recipe must be a mapping with a 'steps' list")
        steps = data["steps"]
        if not isinstance(steps, list) or not steps:
            raise LeanmlError("recipe field 'steps' must be a non-empty list of techniques")
        extra = set(data) - {"name", "steps", "version"}
        if extra:
            raise LeanmlError(f"unknown recipe field(s) {sorted(extra)}; accepted: name, steps, version")
        return cls(name=str(data.get("name", name)), steps=[config_from_dict(s) for s in steps])

    @classmethod
    def from_yaml(cls, text: str, name: str = "custom") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise LeanmlError(f"recipe is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, name=name)


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


def load_recipe(spec: str | os.PathLike | Recipe | TechniqueConfig | list) -> Recipe:
    """A recipe from a built-in name, a YAML path, a config, a list of configs, or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, TechniqueConfig):
        return Recipe(steps=[spec])
    if isinstance(spec, list):
        return Recipe(steps=[s if isinstance(s, TechniqueConfig) else config_from_dict(s) for s in spec])
    text = str(spec)
    if text in BUILTIN_RECIPES:
        return Recipe(name=text, steps=list(BUILTIN_RECIPES[text]))
    path = Path(text).expanduser()
    if not path.is_file():
        raise LeanmlError(f"recipe {text!r} is neither a built-in name ({', '.join(BUILTIN_RECIPES)}) nor a YAML file")
    return Recipe.from_yaml(path.read_text(), name=path.stem)
