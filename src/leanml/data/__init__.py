"""Calibration and evaluation data with explicit, seeded splits."""

from .datasets import Dataset, SimilarityPairs, TensorData, TextCorpus, TextRecords, seeded_split
from .sources import BUILTIN_DATA, load_data

__all__ = [
    "BUILTIN_DATA",
    "Dataset",
    "SimilarityPairs",
    "TensorData",
    "TextCorpus",
    "TextRecords",
    "load_data",
    "seeded_split",
]
