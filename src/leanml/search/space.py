"""The search space: discrete choices built from the registered techniques' configs, per task.

A point of the space is a dict of choice → option (strings, so Optuna stores them as categoricals);
:meth:`Space.recipe` turns it into a :class:`~leanml.recipe.Recipe` of technique configs, and the runtime
choice says where the result is served and measured.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..accelerate.runtimes import RUNTIMES
from ..config import TechniqueConfig, WeightOnly
from ..distill.config import Distill
from ..errors import LeanmlError
from ..prune.config import StructuredPrune
from ..recipe import BUILTIN_RECIPES, Recipe
from ..targeting import default_ignore

SEARCH_RUNTIMES = ("onnxruntime", "torch")  # torch-compile is a runtime, but not one the search serves from


UPGRADE_SHARES = ("0.1", "0.2", "0.35", "0.5", "0.75")  # shares of a causal LM's layers kept at 8 bits, by sensitivity


def _w4(group: int, method: str, **kw) -> WeightOnly:
    extra = {"act_order": True, "mse_clip": True, "outlier_factor": 8.0, "refine_scales": True} if method != "rtn" else {}
    return WeightOnly(bits=4, group_size=group, method=method, calib_windows=32, head_bits=8, **extra, **kw)


@dataclass
class Space:
    """Choices (name → options, the first option of each is "do nothing" where that exists) and seeds."""

    task: str
    choices: dict[str, list[str]]
    seeds: list[dict[str, str]] = field(default_factory=list)
    sensitive: list[str] = field(default_factory=list)  # layers, most sensitive first (the "+8b:" options upgrade a share)
    n_layers: int = 1  # of the transformer, for removing whole layers
    roles: dict[str, list[str]] = field(default_factory=dict)  # layer patterns by role (the "+fp:" options keep them float)

    def points(self) -> list[dict[str, str]]:
        """Every valid point of the space."""
        names = list(self.choices)
        every = (dict(zip(names, combo, strict=True)) for combo in itertools.product(*self.choices.values()))
        return [p for p in every if self.valid(p)]

    @staticmethod
    def valid(point: dict[str, str]) -> bool:
        """Distillation recovers a structurally changed model, so it needs a structural step before it."""
        structural = any(point.get(k, "0") != "0" for k in ("ffn", "heads", "filters", "layers"))
        return point.get("distill", "0") == "0" or structural

    def label(self, point: dict[str, str]) -> str:
        parts = [f"{k} {v}" for k, v in point.items() if k != "runtime" and v not in ("none", "0")]
        return (" + ".join(parts) or "original") + f" on {point['runtime']}"

    def recipe(self, point: dict[str, str]) -> Recipe:
        """The recipe of ``point``: structural steps first (prune → distill), quantization last."""
        steps: list[TechniqueConfig] = []
        ffn = float(point.get("ffn", "0"))
        if ffn:
            steps.append(StructuredPrune(unit="neurons", ratio=ffn, criterion="activation", calib_windows=16))
        heads = float(point.get("heads", "0"))
        if heads:
            steps.append(StructuredPrune(unit="heads", ratio=heads, criterion="activation", calib_windows=16))
        filters = float(point.get("filters", "0"))
        if filters:
            steps.append(StructuredPrune(unit="filters", ratio=filters, criterion="activation", calib_windows=16))
        layers = int(point.get("layers", "0"))
        steps_ = int(point.get("distill", "0"))
        if steps_:
            student = f"drop-layers:{layers}:influence" if layers else None
            if student is None and not steps:
                raise LeanmlError("distillation recovers a compressed model; this point compresses nothing before it")
            loss = "kd+hidden" if self.task in ("causal-lm", "sentence-embedding") else "kd+task"
            steps.append(
                Distill(
                    student=student,
                    loss=loss,
                    steps=steps_,
                    batch_size=32 if self.task != "causal-lm" else 4,
                    lr=2e-4 if self.task != "generic" else 1e-3,
                    warmup=0.05,
                    seed=0,
                )
            )
        elif layers:
            steps.append(StructuredPrune(unit="layers", ratio=layers / self.n_layers, criterion="activation", calib_windows=16))
        quant = point.get("quant", "none")
        if quant != "none":
            steps.extend(self._quant(quant))
        return Recipe(name=self.label(point).replace(" on ", " @ "), steps=steps)

    def _quant(self, name: str) -> list[TechniqueConfig]:
        if name in BUILTIN_RECIPES:
            return list(BUILTIN_RECIPES[name])
        if name == "w4-g128-rtn":
            return [_w4(128, "rtn", symmetric=False)]
        if name == "w4-g64-gptq":
            return [_w4(64, "gptq")]
        if "+8b:" in name:  # a share of the layers, most sensitive first, upgraded to 8 bits; the rest at 4
            head, share = name.split("+8b:")
            base = self._quant(head)[0]
            n = round(float(share) * len(self.sensitive))
            return [base.model_copy(update={"upgrade": list(self.sensitive[: max(1, n)])})] if self.sensitive else [base]
        if "+fp:" in name:  # int8 everywhere but the layers of the named roles, which stay float
            head, roles = name.split("+fp:")
            base = self._quant(head)[0]
            keep = [p for role in roles.split("+") for p in self.roles.get(role, [])]
            if not keep:
                raise LeanmlError(f"quantization option {name!r} names roles this model has no layers for")
            ignore = default_ignore(self.task) if base.ignore is None else base.ignore
            return [base.model_copy(update={"ignore": [*ignore, *keep]})]
        raise LeanmlError(f"unknown quantization option {name!r}")


FLOAT_ROLES = ("ffn-down", "attention", "attention+ffn-down")  # encoder int8 mixes: these layers stay float


def encoder_roles(module) -> dict[str, list[str]]:
    """Layer patterns of an encoder by role, from its family's layout, that hold in any number of layers
    (``re:`` patterns with the layer index as ``\\d+``, so they still match after layers are removed)."""
    import re

    from ..prune.transformer import detect_layout

    layout = detect_layout(module)
    if layout is None or not layout.blocks:
        return {}
    block = layout.blocks[0]
    stem = block.name[: -len(str(block.index))]  # "encoder.layer."

    def pattern(layer: str) -> str:
        return "re:^" + re.escape(stem) + r"\d+" + re.escape(layer[len(block.name) :]) + "$"

    return {"ffn-down": [pattern(block.ffn_cols)], "attention": [pattern(n) for n in block.attn_layers]}


def _groups_fit(module, group: int) -> bool:
    """Whether ``group`` divides the inputs of every linear layer (a grouped option that cannot apply is left
    out of the space, instead of failing as a trial); FFN cuts that break it fail as their own trials."""
    widths = {m.in_features for m in module.modules() if isinstance(m, torch.nn.Linear)}
    return bool(widths) and all(w % group == 0 for w in widths)


def check_search_runtime(runtime: str) -> None:
    if runtime != "auto" and runtime not in RUNTIMES:
        raise LeanmlError(f"runtime {runtime!r} is not one of auto, {', '.join(RUNTIMES)}")


def build_space(
    handle, runtime: str = "auto", allow_distill: bool = False, n_layers: int | None = None, sensitive: list[str] | None = None
) -> Space:
    """The space for ``handle``'s task. ``runtime`` 'auto' searches ONNX Runtime and torch eager."""
    check_search_runtime(runtime)
    runtimes = list(SEARCH_RUNTIMES) if runtime == "auto" else [runtime]
    task = handle.task
    hf = getattr(handle.module, "config", None) is not None
    roles: dict[str, list[str]] = {}
    if task == "causal-lm":
        # every "w4-g64+8b:" mix is assembled from one calibrated 4-bit pass (see leanml.search.study)
        # (GPTQ alone: AWQ folds scales into neighbouring layers, so a layer re-quantized from its original
        # weights would no longer fit them); "w4-g64" (AWQ + GPTQ) is there too, at the full cost of its pass
        mixes = [f"w4-g64-gptq+8b:{s}" for s in UPGRADE_SHARES] if sensitive else []
        grouped = [q for q, g in (("w4-g64-gptq", 64), ("w4-g64", 64), ("w4-g128-rtn", 128)) if _groups_fit(handle.module, g)]
        mixes = mixes if "w4-g64-gptq" in grouped else []
        choices = {"quant": ["w8", *grouped[:1], *mixes, *grouped[1:], "none"], "ffn": ["0", "0.125"]}
        seeds = [{"quant": q, "ffn": "0"} for q in ["w8", *grouped[:1], *mixes[1::2], *mixes[0::2]]]
    elif hf:  # encoders and classifiers from Hugging Face
        roles = encoder_roles(handle.module)
        # int8 with the layers whose activations int8 hurts most kept float (the FFN's down projection reads
        # the GELU output; attention), for budgets that all-int8 cannot be shown to meet
        mixes = [f"int8-dynamic+fp:{r}" for r in FLOAT_ROLES] if roles else []
        choices = {
            "quant": ["int8-dynamic", *mixes, "none"],
            "ffn": ["0", "0.25", "0.5", "0.75"],
            "heads": ["0", "0.5"],
            "layers": ["0", "1", "2", "3"],
        }
        seeds = [
            {"quant": "int8-dynamic", "ffn": "0", "heads": "0", "layers": "0"},
            {"quant": "int8-dynamic", "ffn": "0.5", "heads": "0", "layers": "0"},
            {"quant": "int8-dynamic", "ffn": "0.5", "heads": "0", "layers": "2"},
            *({"quant": m, "ffn": "0", "heads": "0", "layers": "0"} for m in mixes),
        ]
    else:  # plain nn.Modules: conv filters of CNNs, hidden features of MLPs
        unit = "filters" if any(isinstance(m, torch.nn.Conv2d) for m in handle.module.modules()) else "ffn"
        choices = {"quant": ["int8-static", "int8-dynamic", "none"], unit: ["0", "0.25", "0.5"]}
        seeds = [{"quant": "int8-static", unit: "0"}, {"quant": "int8-static", unit: "0.5"}]
    if allow_distill:
        steps = {"causal-lm": 100, "generic": 300}.get(task if task == "causal-lm" or hf else "generic", 300)
        choices["distill"] = ["0", str(steps)]
        seeds = [dict(s, distill="0") for s in seeds]
        if any(k in choices for k in ("layers", "filters", "ffn")) and task != "causal-lm":
            seeds.append(dict(seeds[-1], distill=str(steps)))
    choices["runtime"] = runtimes
    seeds = [dict(s, runtime=runtimes[0]) for s in seeds]
    return Space(
        task=task,
        choices=choices,
        seeds=seeds,
        sensitive=list(sensitive or []),
        n_layers=n_layers or 1,
        roles=roles,
    )
