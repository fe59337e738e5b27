"""Measuring cost (size, FLOPs, speed, memory, energy, dollars) and quality."""

from .hardware import DEFAULT_HARDWARE, HardwareProfile, get_profile, list_profiles
from .profile import profile
from .quality import cosine_spearman, evaluate, fidelity, perplexity
from .record import Measurement
from .stats import percentile, summarize

__all__ = [
    "DEFAULT_HARDWARE",
    "HardwareProfile",
    "Measurement",
    "cosine_spearman",
    "evaluate",
    "fidelity",
    "get_profile",
    "list_profiles",
    "percentile",
    "perplexity",
    "profile",
    "summarize",
]
