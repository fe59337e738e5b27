"""leanml: make AI models cheaper to run, and prove it with measurements."""

__version__ = "0.1.0"

from .data import load_data  # noqa: E402
from .errors import LeanmlError  # noqa: E402
from .measure import Measurement, profile  # noqa: E402
from .models import ModelHandle, load_model  # noqa: E402

load = load_model

__all__ = ["LeanmlError", "Measurement", "ModelHandle", "__version__", "load", "load_data", "load_model", "profile"]
