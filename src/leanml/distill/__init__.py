"""Knowledge distillation: losses, students built from the teacher, the trainer, and data selection.

The package is also the verb: ``leanml.distill(teacher, Distill(...), data)`` calls :func:`api.distill`
and returns the trained student's handle. Importing it registers the ``distill`` config with
:func:`leanml.config.config_from_dict` and its recipe handler with :mod:`leanml.registry`.
"""

from __future__ import annotations

import sys
import types

from . import api  # noqa: F401  (registers the handler)
from .api import choose, deduplicate, text_chunks, training_items
from .config import LOSS_TERMS, Distill
from .losses import (
    FeatureProjection,
    attention_map_loss,
    feature_loss,
    hinton_kd,
    layer_map,
    rkd_angle,
    rkd_distance,
    token_kl,
)
from .select import dedup, exact_duplicates, jaccard, minhash_signatures, near_duplicates, select, teacher_scores
from .students import build_student, every_kth, parse_student
from .trainer import Items, batch_indices, init_distributed, train

__all__ = [
    "LOSS_TERMS",
    "Distill",
    "FeatureProjection",
    "Items",
    "attention_map_loss",
    "batch_indices",
    "build_student",
    "choose",
    "dedup",
    "deduplicate",
    "every_kth",
    "exact_duplicates",
    "feature_loss",
    "hinton_kd",
    "init_distributed",
    "jaccard",
    "layer_map",
    "minhash_signatures",
    "near_duplicates",
    "parse_student",
    "rkd_angle",
    "rkd_distance",
    "select",
    "teacher_scores",
    "text_chunks",
    "token_kl",
    "train",
    "training_items",
]


class _CallableModule(types.ModuleType):
    def __call__(self, teacher, config, data=None, **kwargs):
        """Distil ``teacher`` into a student per ``config``; returns the student's handle."""
        from .api import distill

        return distill(teacher, config, data, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
