"""The ``Distill`` config (``kind: distill`` in a recipe)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..prune.config import _LeanmlConfig, register_config

LOSS_TERMS = ("kd", "task", "hidden", "relation", "attention")


class Distill(_LeanmlConfig):
    """Knowledge distillation from a teacher into a student.

    ``student``: a spec (see :mod:`leanml.distill.students`; e.g. ``drop-layers:0.5``), or None for the
    model as it is (in a recipe after a pruning step the teacher is then the model before the recipe).

    ``loss``: terms joined by ``+``:

    * ``kd`` - output distillation: for a causal LM the token-level KL (``kl``: ``forward``
      KL(teacher ‖ student) or ``reverse``), over the full vocabulary or the teacher's ``top_k``; for a
      classifier Hinton's ``alpha·CE + (1−alpha)·T²·KL`` when labels exist; for a text encoder the
      scale-free MSE of the token states plus ``1 − cos`` of the pooled embeddings;
    * ``task`` - the plain task loss (next-token cross-entropy, or cross-entropy to labels) weighted by
      ``alpha`` when combined with ``kd`` (``1 - alpha`` goes to ``kd``);
    * ``hidden`` - feature distillation of intermediate hidden states (``hidden_kind`` ``mse`` or
      ``cosine``), student layer i paired with the teacher layer it was built from (``layer_map:
      sources``) or by a ``uniform`` spread; a learned projection bridges different widths;
    * ``relation`` - RKD distance + angle over the batch's pooled embeddings (Park et al. 2019);
    * ``attention`` - KL between paired layers' attention maps (needs eager attention).

    ``hidden_weight``, ``relation_weight``, ``attention_weight`` scale those terms. Training: ``steps``
    optimizer steps of ``batch_size`` items (split into ``grad_accum`` micro-batches, and across the
    processes of a ``torchrun`` job), AdamW at ``lr`` with ``warmup`` (fraction) then cosine decay,
    clipping at ``clip``, seeded. ``window`` tokens per item for causal LMs; text encoders train on
    chunks of about ``chunk_words`` words. ``cache_teacher`` runs the teacher once over the training
    batches before training and keeps its top-``top_k`` logits (``kd`` only). ``select_fraction`` < 1
    trains on that fraction of the training items after removing exact and near duplicates, chosen by
    ``select_by`` (``hard``: highest teacher loss, ``easy``, ``random``, ``curriculum``: the hard set
    ordered easy to hard). ``checkpoint_every`` writes a resumable checkpoint every that many steps.
    """

    kind: Literal["distill"] = "distill"
    student: str | None = None
    loss: str = "kd"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    kl: Literal["forward", "reverse"] = "forward"
    top_k: int | None = Field(None, ge=1)
    hidden_kind: Literal["mse", "cosine"] = "mse"
    layer_map: Literal["sources", "uniform", "last"] = "sources"
    hidden_weight: float = Field(1.0, ge=0)
    relation_weight: float = Field(1.0, ge=0)
    attention_weight: float = Field(1.0, ge=0)
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0, lt=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    window: int = Field(256, ge=8)
    chunk_words: int = Field(48, ge=4)
    warmup: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, lt=2**32)
    cache_teacher: bool = False
    select_fraction: float = Field(1.0, gt=0, le=1)
    select_by: Literal["hard", "easy", "random", "curriculum"] = "hard"
    dedup: bool = True
    checkpoint_every: int | None = Field(None, ge=1)
    calib_windows: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _consistent(self):
        terms = self.terms
        bad = [t for t in terms if t not in LOSS_TERMS]
        if bad or not terms or len(set(terms)) != len(terms):
            raise ValueError(
                f"loss {self.loss!r} is not accepted; join distinct terms of {', '.join(LOSS_TERMS)} with '+' (e.g. kd+hidden)"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if "relation" in terms and self.batch_size // self.grad_accum < 3:
            raise ValueError(
                f"loss term 'relation' compares items within a micro-batch; batch_size {self.batch_size} / "
                f"grad_accum {self.grad_accum} must give at least 3"
            )
        if self.cache_teacher and terms != ["kd"] and set(terms) != {"kd", "task"}:
            raise ValueError("cache_teacher keeps only the teacher's logits; use it with loss kd or kd+task")
        if self.cache_teacher and self.top_k is None:
            raise ValueError("cache_teacher needs top_k (how many teacher logits to keep per token, e.g. 64)")
        if self.student is not None:
            from .students import parse_student

            parse_student(self.student)
        return self

    @property
    def terms(self) -> list[str]:
        return [t for t in self.loss.replace(" ", "").split("+") if t]

    @property
    def needs_teacher(self) -> bool:
        return self.terms != ["task"]


register_config(Distill)

__all__ = ["LOSS_TERMS", "Distill"]
