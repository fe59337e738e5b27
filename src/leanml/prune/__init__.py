"""Pruning: pure math (importance criteria, masks, SparseGPT), the sparse layer, configs, and the
handlers that apply each config to a model.

The package is also the verb: ``leanml.prune(handle, config, data)`` calls :func:`api.prune` (the
subpackage and the function share one name, so the module itself is made callable, as for
``leanml.quantize``). Importing it registers the ``prune``, ``gradual-prune`` and ``prune-structured`` configs with
:func:`leanml.config.config_from_dict` and their handlers (:mod:`leanml.prune.api`,
:mod:`leanml.prune.structured`) with :mod:`leanml.registry`.
"""

from __future__ import annotations

import sys
import types

from . import api, structured  # noqa: F401  (register the handlers)
from .config import GradualPrune, Prune, StructuredPrune, register_config
from .criteria import activation_importance, gradient_importance, input_norms, magnitude, taylor, wanda
from .dependency import ChannelGroup, Member, channel_groups
from .finetune import Finetune
from .masks import cubic_schedule, global_masks, nm_mask, row_mask, select_masks, unstructured_mask
from .modules import SparseLinear
from .sparsegpt import PrunedWeight, sparsegpt_prune
from .structured import apply_structured_prune
from .surgery import count_params, keep_channels, keep_columns, keep_rows
from .transformer import Layout, detect_layout, drop_layers, prune_ffn, prune_heads
from .units import lowest_units, unit_activation, unit_magnitude, unit_sum, unit_taylor, units_to_remove

__all__ = [
    "ChannelGroup",
    "Finetune",
    "GradualPrune",
    "Layout",
    "Member",
    "Prune",
    "PrunedWeight",
    "SparseLinear",
    "StructuredPrune",
    "activation_importance",
    "apply_structured_prune",
    "channel_groups",
    "count_params",
    "cubic_schedule",
    "detect_layout",
    "drop_layers",
    "global_masks",
    "gradient_importance",
    "input_norms",
    "keep_channels",
    "keep_columns",
    "keep_rows",
    "lowest_units",
    "magnitude",
    "nm_mask",
    "prune_ffn",
    "prune_heads",
    "register_config",
    "row_mask",
    "select_masks",
    "sparsegpt_prune",
    "taylor",
    "unit_activation",
    "unit_magnitude",
    "unit_sum",
    "unit_taylor",
    "units_to_remove",
    "unstructured_mask",
    "wanda",
]


class _CallableModule(types.ModuleType):
    def __call__(self, handle, config, data=None):
        """Apply one pruning config to ``handle`` in place and return it."""
        from .api import prune

        return prune(handle, config, data)


sys.modules[__name__].__class__ = _CallableModule
