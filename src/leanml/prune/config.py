"""Pruning configs (subclasses of :class:`leanml.config.TechniqueConfig`), registered into
:data:`leanml.config.CONFIG_TYPES` at import so that recipes can name them (``kind: prune``,
``kind: gradual-prune`` and ``kind: prune-structured``).

Like every config, constructing one with a bad value raises a one-line
:class:`~leanml.errors.LeanmlError` (a ``ValueError``) naming the field, the value and what is accepted.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from leanml.config import CONFIG_TYPES, TechniqueConfig
from leanml.errors import LeanmlError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def register_config(cls: type[TechniqueConfig]) -> type[TechniqueConfig]:
    """Make ``cls`` known to :func:`leanml.config.config_from_dict` under its ``kind`` (idempotent)."""
    kind = cls.model_fields["kind"].default
    existing = CONFIG_TYPES.get(kind)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise LeanmlError(f"technique kind {kind!r} is already registered by {existing.__qualname__}")
    CONFIG_TYPES[kind] = cls
    return cls


# Every TechniqueConfig now raises a one-line LeanmlError for a bad value; the name is kept for the
# configs defined on top of it elsewhere (fine-tuning, distillation).
_LeanmlConfig = TechniqueConfig


class Prune(_LeanmlConfig):
    """One-shot pruning of the targeted linear layers (weights set to zero, stored sparse).

    ``method``: ``magnitude`` (|w|), ``wanda`` (|w| · ||x_j||, Sun et al. 2023), ``sparsegpt`` (OBS
    reconstruction, Frantar & Alistarh 2023), ``taylor`` (|w · dL/dw|) or ``gradient`` (mean |dL/dw|).
    ``pattern``: ``unstructured`` with ``sparsity`` (default 0.5), or ``n:m`` with ``n``/``m`` (keep n of
    every m consecutive input weights; ``"2:4"`` is shorthand for ``pattern: n:m, n: 2, m: 4``; the
    sparsity is then 1 - n/m). ``scope`` (unstructured only) is the comparison group: ``layer`` (each
    layer gets exactly the sparsity), ``row`` (each output row does; Wanda's default), ``global`` (one
    threshold over every targeted layer; magnitude/taylor/gradient/wanda); None = ``row`` for Wanda,
    ``layer`` otherwise. ``calib_windows`` windows of ``window`` tokens calibrate wanda/sparsegpt (layer by
    layer) and give the gradients of taylor/gradient. ``damp`` and ``block_size`` are SparseGPT's;
    ``outlier_factor`` down-weights, in SparseGPT's Hessian, tokens whose input norm exceeds that many times
    the median (attention-sink tokens), as the weight-only GPTQ does. ``dense_targets`` (SparseGPT, layers
    inside the stack of blocks) makes each layer reconstruct the output the UNPRUNED model gives it, from
    the inputs the already-pruned layers before it now produce, instead of its own output on those
    perturbed inputs (the least-squares correction is folded into W before pruning). ``allocation: owl`` (unstructured,
    layer scope) gives layers with more outlier Wanda scores (> ``owl_m`` x mean) less sparsity, within
    ``target ± owl_lambda``, keeping the overall sparsity of the targeted layers at the target (OWL,
    Yin et al. 2024); ``uniform`` prunes every layer to the target.
    """

    kind: Literal["prune"] = "prune"
    method: Literal["magnitude", "wanda", "sparsegpt", "taylor", "gradient"] = "wanda"
    sparsity: float | None = Field(None, ge=0, lt=1)
    pattern: str = "unstructured"
    n: int | None = Field(None, ge=1)
    m: int | None = Field(None, ge=2)
    scope: Literal["layer", "row", "global"] | None = None
    calib_windows: int = Field(64, ge=1)
    window: int = Field(512, ge=8)
    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    outlier_factor: float | None = Field(None, gt=1)
    dense_targets: bool = False
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = Field(0.08, ge=0, lt=1)
    owl_m: float = Field(5.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        if isinstance(data, dict) and isinstance(data.get("pattern"), str):
            hit = _NM.match(data["pattern"])
            if hit:
                n, m = int(hit.group(1)), int(hit.group(2))
                for key, v in (("n", n), ("m", m)):
                    if data.get(key) is not None and data[key] != v:
                        raise ValueError(f"pattern {data['pattern']!r} contradicts {key}={data[key]!r}")
                data = {**data, "pattern": "n:m", "n": n, "m": m}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.pattern not in ("unstructured", "n:m"):
            raise ValueError(f"pattern {self.pattern!r} is not accepted; use 'unstructured', 'n:m' (with n and m) or e.g. '2:4'")
        if self.pattern == "n:m":
            if self.n is None or self.m is None:
                raise ValueError("pattern 'n:m' needs integers n and m (e.g. n: 2, m: 4)")
            if self.n >= self.m:
                raise ValueError(f"N:M pattern {self.n}:{self.m} needs n < m (keep n of every m, e.g. 2:4)")
            if self.sparsity is not None and abs(self.sparsity - (1 - self.n / self.m)) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.n}:{self.m} "
                    f"(which removes {1 - self.n / self.m:g}); leave sparsity out"
                )
            if self.scope not in (None, "layer"):
                raise ValueError(f"scope {self.scope!r} does not apply to an N:M pattern (its groups are fixed)")
        elif self.n is not None or self.m is not None:
            raise ValueError("n and m only apply to pattern 'n:m'")
        if self.allocation == "owl" and (self.pattern != "unstructured" or self.comparison not in ("layer", "row")):
            raise ValueError("allocation 'owl' applies to unstructured sparsity with scope layer or row")
        if self.allocation == "owl" and self.method not in ("wanda", "sparsegpt"):
            raise ValueError(f"allocation 'owl' needs activation statistics: use method wanda or sparsegpt, not {self.method!r}")
        if self.dense_targets and self.method != "sparsegpt":
            raise ValueError(f"dense_targets applies to method sparsegpt, not {self.method!r}")
        if self.method == "sparsegpt" and self.scope not in (None, "layer"):
            raise ValueError(f"sparsegpt chooses its masks per layer; scope {self.scope!r} is not supported")
        return self

    @property
    def target_sparsity(self) -> float:
        """The fraction of weights removed in each targeted layer (overall, for a global scope)."""
        if self.pattern == "n:m":
            return 1 - self.n / self.m
        return 0.5 if self.sparsity is None else self.sparsity

    @property
    def comparison(self) -> str:
        """The comparison group used: ``nm``, ``layer``, ``row`` or ``global``."""
        if self.pattern == "n:m":
            return "nm"
        if self.scope is None:
            return "row" if self.method == "wanda" else "layer"
        return self.scope


class GradualPrune(_LeanmlConfig):
    """Gradual pruning with fine-tuning (Zhu & Gupta 2017): over ``steps`` pruning steps the sparsity
    follows the cubic schedule from ``initial_sparsity`` to ``final_sparsity``; after each step the
    targeted weights are fine-tuned for ``finetune_steps_per_step`` optimizer steps (AdamW, ``lr``) with
    the masks fixed (pruned weights get no gradient and are re-zeroed after every step). The loss is the
    KL divergence to the original model's outputs (``distill``) or the task loss (next-token for a causal
    LM). ``method`` scores weights by magnitude, or by Taylor / gradient importance accumulated over the
    fine-tuning batches since the previous step. ``calib_windows`` windows of ``window`` tokens from the
    calibration split are cycled through.
    """

    kind: Literal["gradual-prune"] = "gradual-prune"
    method: Literal["magnitude", "taylor", "gradient"] = "magnitude"
    final_sparsity: float = Field(0.5, ge=0, lt=1)
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    steps: int = Field(4, ge=1)
    finetune_steps_per_step: int = Field(8, ge=0)
    lr: float = Field(1e-5, gt=0)
    scope: Literal["layer", "global"] = "layer"
    distill: bool = True
    calib_windows: int = Field(16, ge=1)
    window: int = Field(512, ge=8)
    seed: int = Field(0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _order(self):
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} is above final_sparsity {self.final_sparsity}")
        return self


class StructuredPrune(_LeanmlConfig):
    """Structured pruning: whole units are physically removed, so the model gets smaller and faster
    on any runtime (no sparse kernel needed).

    ``unit``:

    * ``filters`` - output channels of the Conv layers of a plain ``nn.Module`` (traced with
      ``torch.fx``; BatchNorm follows its conv, the next conv's input channels and a following Linear's
      input features shrink; channels joined by a residual ``+`` form one coupled group);
    * ``neurons`` - FFN neurons of a Hugging Face transformer (llama ``gate_proj``/``up_proj`` rows and
      ``down_proj`` columns; BERT ``intermediate.dense`` rows and ``output.dense`` columns), or the hidden
      features of the Linear layers of a plain ``nn.Module`` (traced like filters);
    * ``heads`` - attention heads of a Hugging Face transformer; with grouped-query attention ``gqa``
      chooses what a unit is: ``kv-groups`` removes a key/value head together with all of its query
      heads, ``queries`` keeps every key/value head and removes the same number of query heads from each
      group;
    * ``layers`` - whole decoder/encoder layers.

    ``ratio`` is the fraction of units removed from each channel group or layer (of the layers, for
    ``layers``), rounded half up; removing every unit of a layer is an error. ``criterion`` ranks units
    (lowest removed first): ``l1``/``l2`` norm of all weights removed with the unit, ``taylor`` (sum over
    those weights of ``|w * dL/dw|`` on ``calib_windows`` calibration batches), ``activation`` (mean
    ``|a|`` of what the unit feeds into the next layers; for ``layers``, the block influence
    ``1 - cos(input, output)``). ``coupled``: ``prune`` removes residual-coupled channel groups with the
    same indices in every member, ``skip`` leaves them whole. ``targets``/``ignore`` choose the Conv
    layers (filters), Linear layers (neurons, heads) or transformer layers (layers) considered; for
    neurons and heads of a Hugging Face model they must select every layer, since its config holds one
    width for all of them. Weight magnitude needs no data but can mislead on LLMs (on SmolLM2-135M, 25%
    of FFN neurons by l2 leave a perplexity above 10^5, by activation about 62 from 33), so the
    ``ffn-25`` recipe ranks by activation.
    """

    kind: Literal["prune-structured"] = "prune-structured"
    unit: Literal["filters", "neurons", "heads", "layers"] = "neurons"
    ratio: float = Field(0.25, ge=0, lt=1)
    criterion: Literal["l1", "l2", "taylor", "activation"] = "l2"
    gqa: Literal["kv-groups", "queries"] = "kv-groups"
    coupled: Literal["prune", "skip"] = "prune"
    calib_windows: int = Field(16, ge=1)
    window: int = Field(512, ge=8)


for _cls in (Prune, GradualPrune, StructuredPrune):
    register_config(_cls)
