"""Loading models into :class:`ModelHandle` objects."""

from .handle import TASKS, ModelHandle, mean_pool, output_tensor
from .loaders import BUILTIN, check_finite, load_model

__all__ = ["BUILTIN", "TASKS", "ModelHandle", "check_finite", "load_model", "mean_pool", "output_tensor"]
