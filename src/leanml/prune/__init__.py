"""Pruning: pure math (importance criteria, masks, SparseGPT), the sparse layer, configs, and the
handlers that apply each config to a model.

The package is also the verb: ``leanml.prune(handle, config, data)`` calls :func:`api.prune` (the
subpackage and the function share one name, so the module itself is made callable, as for
``leanml.quantize``). Importing it registers the ``prune`` and ``gradual-prune`` configs with
:func:`leanml.config.config_from_dict` and their handlers (:mod:`leanml.prune.api`) with
:mod:`leanml.registry`.
"""

from __future__ import annotations

import sys
import types

from . import api  # noqa: F401  (registers the handlers)
from .config import GradualPrune, Prune, register_config
from .criteria import activation_importance, gradient_importance, input_norms, magnitude, taylor, wanda
from .masks import cubic_schedule, global_masks, nm_mask, row_mask, select_masks, unstructured_mask
from .modules import SparseLinear
from .sparsegpt import PrunedWeight, sparsegpt_prune

__all__ = ["GradualPrune", "Prune", "PrunedWeight", "SparseLinear", "activation_importance", "cubic_schedule",
           "global_masks", "gradient_importance", "input_norms", "magnitude", "nm_mask", "register_config",
           "row_mask", "select_masks", "sparsegpt_prune", "taylor", "unstructured_mask", "wanda"]


class _CallableModule(types.ModuleType):
    def __call__(self, handle, config, data=None):
        """Apply one pruning config to ``handle`` in place and return it."""
        from .api import prune

        return prune(handle, config, data)


sys.modules[__name__].__class__ = _CallableModule
