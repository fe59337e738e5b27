"""leanml: make AI models cheaper to run, and prove it with measurements."""

__version__ = "0.1.0"

from . import (
    distill,  # noqa: E402  (callable: leanml.distill(teacher, config, data))
    prune,  # noqa: E402  (callable: leanml.prune(handle, config, data))
    quantize,  # noqa: E402  (callable: leanml.quantize(handle, config, data))
)
from .data import load_data  # noqa: E402
from .errors import LeanmlError  # noqa: E402
from .measure import Measurement, profile  # noqa: E402
from .models import ModelHandle, load_model  # noqa: E402

load = load_model


def compress(model, recipe, data=None, **kwargs):
    """Apply a recipe, measure before and after, and optionally save to ``out`` (see :mod:`leanml.pipeline`)."""
    from .pipeline import compress as _compress

    return _compress(model, recipe, data=data, **kwargs)


def export(model, fmt: str, path, **kwargs) -> dict:
    """Write a model (handle or loadable path) as ``onnx``, ``safetensors`` or ``gguf`` (see :mod:`leanml.export.formats`)."""
    from .export.formats import export as _export

    handle = model if isinstance(model, ModelHandle) else load_model(model)
    return _export(handle, fmt, path, **kwargs)


def optimize(model, data, budget="1%", objective: str = "usd", **kwargs):
    """The cheapest model within a quality budget, searched across techniques and runtimes (see :mod:`leanml.search`)."""
    from .search import optimize as _optimize

    return _optimize(model, data, budget=budget, objective=objective, **kwargs)


def runtime(model, name: str = "onnxruntime", **kwargs) -> ModelHandle:
    """The model prepared to run on ``name`` (torch, torch-compile, onnxruntime); see :mod:`leanml.accelerate.runtimes`."""
    from .accelerate.runtimes import prepare

    handle = model if isinstance(model, ModelHandle) else load_model(model)
    return prepare(handle, name, **kwargs)


__all__ = [
    "LeanmlError",
    "Measurement",
    "ModelHandle",
    "__version__",
    "compress",
    "distill",
    "export",
    "load",
    "load_data",
    "load_model",
    "optimize",
    "profile",
    "prune",
    "quantize",
    "runtime",
]
