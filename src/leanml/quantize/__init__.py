"""Quantization: pure math (primitives, observers, GPTQ, AWQ/SmoothQuant), quantized layers, and
the handlers that apply each config to a model.

The package is also the verb: ``leanml.quantize(handle, config, data)`` calls :func:`api.quantize`
(the subpackage and the function share one name, so the module itself is made callable).
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, handle, config, data=None):
        """Apply one quantization config (or a dict with its ``kind``) to ``handle`` in place and return it."""
        from .api import quantize

        return quantize(handle, config, data)


sys.modules[__name__].__class__ = _CallableModule
