"""The fidelity guard of a search: every candidate must stay close to the original on held-out,
label-free inputs of the calibration domain (the data's ``check`` split), whatever its score says.

A quality figure on a small selection set can improve by chance (an encoder that lost half its layers
untrained scored *higher* on 50 documents); agreement with the original on other inputs cannot be
gamed that way. The score is in [0, 1], 1 = the original's outputs:

* causal LMs: ``exp(-mean KL(original || candidate))`` per token (0.85 allows a mean KL of 0.16 nats);
* sentence encoders: the mean cosine similarity of the embeddings;
* classifiers and other models: the top-1 agreement of the outputs.
"""

from __future__ import annotations

import math

from ..errors import LeanmlError

DEFAULT_FLOORS = {"causal-lm": 0.85, "sentence-embedding": 0.95}
DEFAULT_FLOOR = 0.90  # classifiers and other tasks: top-1 agreement


def floor_for(task: str, min_fidelity: float | None = None) -> float:
    """The floor a candidate's fidelity score must reach: ``min_fidelity`` when given, else the task's default."""
    if min_fidelity is not None:
        if not (isinstance(min_fidelity, (int, float)) and 0 <= min_fidelity <= 1):
            raise LeanmlError(f"min fidelity {min_fidelity!r} must be a number between 0 and 1 (e.g. 0.95)")
        return float(min_fidelity)
    return DEFAULT_FLOORS.get(task, DEFAULT_FLOOR)


def score_name(task: str) -> str:
    if task == "causal-lm":
        return "exp(-KL) to the original"
    if task == "sentence-embedding":
        return "embedding cosine to the original"
    return "top-1 agreement with the original"


def fidelity_score(task: str, fid: dict | None) -> float | None:
    """The guard's score of a :func:`leanml.measure.quality.fidelity` result (None when it has none)."""
    if not fid:
        return None
    if task == "causal-lm" and fid.get("mean_kl") is not None:
        return math.exp(-max(0.0, float(fid["mean_kl"])))
    if task == "sentence-embedding" and fid.get("mean_cosine") is not None:
        return float(fid["mean_cosine"])
    if fid.get("top1_agreement") is not None:
        return float(fid["top1_agreement"])
    return None
