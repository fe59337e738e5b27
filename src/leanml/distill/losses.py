"""Distillation losses: pure functions on tensors (plus :class:`FeatureProjection`, a small learned map).

* :func:`hinton_kd` - soft targets at a temperature plus hard labels (Hinton, Vinyals & Dean 2015,
  "Distilling the Knowledge in a Neural Network");
* :func:`token_kl` - per-token forward or reverse KL for causal LMs, optionally over the teacher's
  top-k vocabulary or cached top-k teacher logits (reverse KL: Gu et al. 2024, "MiniLLM");
* :func:`feature_loss` / :class:`FeatureProjection` / :func:`layer_map` - hidden-state matching
  (Romero et al. 2015, "FitNets"; Jiao et al. 2020, "TinyBERT" for the uniform layer mapping);
* :func:`rkd_distance` / :func:`rkd_angle` - relational KD (Park et al. 2019, "Relational Knowledge Distillation");
* :func:`attention_map_loss` - KL between self-attention distributions (Wang et al. 2020, "MiniLM").

Every loss takes tensors of any float dtype, computes in float32 and returns a 0-d tensor that supports
autograd. Positions are all axes but the last (the class / vocabulary / feature axis); masks have the
shape of those leading axes (bool or 0/1) and the loss is averaged over the positions they keep (an
empty selection gives 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanml.errors import LeanmlError

_DIRECTIONS = ("forward", "reverse")
_FEATURE_KINDS = ("mse", "cosine")
_LAYER_STRATEGIES = ("uniform", "last")
_PROB_FLOOR = 1e-8


def _float(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise LeanmlError(f"{what} of type {kind} is not accepted; use a float tensor")
    return x.float()


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise LeanmlError(
            f"student {what} shape {tuple(student.shape)} does not match teacher {what} shape "
            f"{tuple(teacher.shape)}; use tensors of the same shape"
        )


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < float("inf"):
        raise LeanmlError(f"temperature {temperature!r} is not accepted; use a finite value > 0 (e.g. 4.0)")
    return float(temperature)


def _keep(mask: torch.Tensor | None, shape: torch.Size, what: str = "mask") -> torch.Tensor | None:
    """``mask`` as a bool tensor of ``shape`` (None stays None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LeanmlError(f"{what} shape {got} is not accepted; use a bool or 0/1 tensor of shape {tuple(shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the kept entries (0 when none is kept; masked entries get no gradient)."""
    if keep is None:
        return values.mean()
    keep = keep.to(values.device)
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp_min(1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis from log-probabilities; entries with p = 0 (log p = -inf) add 0, not nan."""
    low = torch.finfo(log_p.dtype).min
    log_p, log_q = log_p.clamp_min(low), log_q.clamp_min(low)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def hinton_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 4.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Hinton et al. 2015: ``alpha·CE(labels, s) + (1 − alpha)·T²·KL(softmax(t/T) ‖ softmax(s/T))``.

    This is the standard form: the soft term is weighted by T² so that its gradient scale does not depend
    on T (the gradient of the tempered KL shrinks like 1/T²). With ``labels=None`` only ``T²·KL`` is
    returned (``alpha`` is ignored). CE and KL are both averaged over positions (all axes but the last);
    positions whose label is ``ignore_index`` are left out of both.
    """
    s, t = _float(student_logits, "student logits"), _float(teacher_logits, "teacher logits")
    _same_shape(s, t, "logits")
    T = _check_temperature(temperature)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise LeanmlError(f"alpha {alpha!r} is not accepted; use a weight in [0, 1] (e.g. 0.5)")
    vocab = s.shape[-1]
    s, t = s.reshape(-1, vocab), t.reshape(-1, vocab)
    keep = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:-1] or labels.is_floating_point():
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise LeanmlError(
                f"labels shape {got} is not accepted; use an integer tensor of shape {tuple(student_logits.shape[:-1])}"
            )
        labels = labels.reshape(-1).long()
        keep = labels != ignore_index
    soft = T * T * _masked_mean(_kl(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)), keep)
    if labels is None:
        return soft
    hard = _masked_mean(F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="none"), keep)
    return alpha * hard + (1 - alpha) * soft


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    direction: str = "forward",
    temperature: float = 1.0,
    top_k: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level KL for causal LMs, times T², averaged over the positions ``mask`` keeps.

    ``forward`` is KL(p_t ‖ p_s) (mean-seeking, classic word-level KD); ``reverse`` is KL(p_s ‖ p_t)
    (mode-seeking, Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models").
    ``top_k`` keeps only the teacher's k most likely tokens: both distributions are renormalised over
    those k indices. ``teacher_logits`` may also be a cached ``(values, indices)`` pair of top-k teacher
    logits of shape ``[..., k]``; then top-k is implied and the student is gathered at ``indices``.
    """
    if direction not in _DIRECTIONS:
        raise LeanmlError(f"direction {direction!r} is not accepted; use one of {', '.join(_DIRECTIONS)}")
    T = _check_temperature(temperature)
    s = _float(student_logits, "student logits")
    vocab = s.shape[-1]
    if isinstance(teacher_logits, tuple | list):
        if len(teacher_logits) != 2:
            raise LeanmlError(f"a cached teacher of {len(teacher_logits)} tensors is not accepted; use (values, indices)")
        t, indices = _float(teacher_logits[0], "cached teacher values"), teacher_logits[1]
        if not isinstance(indices, torch.Tensor) or indices.shape != t.shape or indices.is_floating_point():
            raise LeanmlError(
                f"cached teacher indices {getattr(indices, 'shape', indices)!r} are not accepted; use an "
                f"integer tensor of the values' shape {tuple(t.shape)}"
            )
        if t.shape[:-1] != s.shape[:-1] or not 1 <= t.shape[-1] <= vocab:
            raise LeanmlError(
                f"cached teacher shape {tuple(t.shape)} does not fit student logits shape {tuple(s.shape)}; "
                f"use [..., k] with the student's leading shape and k <= {vocab}"
            )
        if top_k is not None and top_k != t.shape[-1]:
            raise LeanmlError(f"top_k {top_k!r} is not accepted with a cached top-{t.shape[-1]} teacher; leave it None")
        s = s.gather(-1, indices.long())
    else:
        t = _float(teacher_logits, "teacher logits")
        _same_shape(s, t, "logits")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
                raise LeanmlError(f"top_k {top_k!r} is not accepted; use an integer in [1, {vocab}] (the vocabulary size)")
            t, indices = t.topk(top_k, dim=-1)
            s = s.gather(-1, indices)
    keep = _keep(mask, s.shape[:-1])
    log_s, log_t = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    kl = _kl(log_t, log_s) if direction == "forward" else _kl(log_s, log_t)
    return T * T * _masked_mean(kl, keep)


class FeatureProjection(nn.Module):
    """A learned linear map from student width to teacher width (the FitNets "regressor", Romero et al. 2015).

    Equal widths start as the identity; otherwise the weight starts (semi-)orthogonal from a seeded
    generator, so norms are preserved when widening. The bias starts at zero.
    """

    def __init__(self, student_width: int, teacher_width: int, bias: bool = True, seed: int = 0):
        super().__init__()
        for name, width in (("student width", student_width), ("teacher width", teacher_width)):
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise LeanmlError(f"{name} {width!r} is not accepted; use an integer >= 1")
        self.linear = nn.Linear(student_width, teacher_width, bias=bias)
        with torch.no_grad():
            if student_width == teacher_width:
                self.linear.weight.copy_(torch.eye(teacher_width))
            else:
                nn.init.orthogonal_(self.linear.weight, generator=torch.Generator().manual_seed(seed))
            if bias:
                self.linear.bias.zero_()

    @classmethod
    def for_widths(cls, student_width: int, teacher_width: int, seed: int = 0) -> FeatureProjection:
        return cls(student_width, teacher_width, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def feature_loss(
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    kind: str = "mse",
    mask: torch.Tensor | None = None,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """Hidden-state matching: MSE (mean over kept positions and features) or mean ``1 − cos`` over kept positions.

    The last axis holds the features. ``projection`` (e.g. :class:`FeatureProjection`) is applied to the
    student states first; without one the widths must already match.
    """
    if kind not in _FEATURE_KINDS:
        raise LeanmlError(f"feature loss kind {kind!r} is not accepted; use one of {', '.join(_FEATURE_KINDS)}")
    s, t = _float(student_h, "student hidden states"), _float(teacher_h, "teacher hidden states")
    if projection is not None:
        param = next(projection.parameters(), None)
        s = projection(s if param is None else s.to(param.dtype)).float()
    if s.shape[-1] != t.shape[-1]:
        fix = "a projection that outputs the teacher width" if projection is not None else "a projection"
        raise LeanmlError(
            f"student width {s.shape[-1]} differs from teacher width {t.shape[-1]}; pass {fix} "
            f"(e.g. FeatureProjection.for_widths({student_h.shape[-1]}, {t.shape[-1]}))"
        )
    _same_shape(s, t, "hidden states")
    keep = _keep(mask, s.shape[:-1])
    per_position = (s - t).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    return _masked_mean(per_position, keep)


def layer_map(student_layers: int, teacher_layers: int, strategy: str = "uniform") -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` of hidden-state indices to match (index 0 is the embeddings,
    as in HF ``output_hidden_states``, so layers run 1..L).

    ``uniform`` maps student layer i to teacher layer ``round(i·T/S)`` (half up) for i = 1..S, as in
    TinyBERT (Jiao et al. 2020); ``last`` maps only the final layers (S, T).
    """
    if strategy not in _LAYER_STRATEGIES:
        raise LeanmlError(f"layer map strategy {strategy!r} is not accepted; use one of {', '.join(_LAYER_STRATEGIES)}")
    for name, n in (("student layers", student_layers), ("teacher layers", teacher_layers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LeanmlError(f"{name} {n!r} is not accepted; use an integer >= 1")
    if student_layers > teacher_layers:
        raise LeanmlError(
            f"a student deeper than its teacher ({student_layers} > {teacher_layers} layers) cannot be "
            f"layer-mapped; use a student with at most {teacher_layers} layers"
        )
    S, T = student_layers, teacher_layers
    if strategy == "last":
        return [(S, T)]
    return [(i, (2 * i * T + S) // (2 * S)) for i in range(1, S + 1)]


def _embeddings(student_emb: torch.Tensor, teacher_emb: torch.Tensor, least: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, t = _float(student_emb, "student embeddings"), _float(teacher_emb, "teacher embeddings")
    if s.dim() != 2 or t.dim() != 2 or s.shape[0] != t.shape[0]:
        raise LeanmlError(
            f"embedding shapes {tuple(s.shape)} and {tuple(t.shape)} are not accepted; use (N, D) "
            f"tensors with the same batch size N"
        )
    if s.shape[0] < least:
        raise LeanmlError(f"batch size {s.shape[0]} is not accepted for this relational loss; use at least {least}")
    return s, t


def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """Off-diagonal pairwise Euclidean distances, divided by their mean."""
    n = e.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    d = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1)[off].clamp_min(1e-12).sqrt()
    return d / d.mean().clamp_min(1e-12)


def rkd_distance(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD distance loss (Park et al. 2019): Huber (smooth-L1) between the pairwise distances of the student and
    the teacher embeddings (N, D), each normalised by its mean over off-diagonal pairs (so it is scale invariant).
    The widths may differ.
    """
    s, t = _embeddings(student_emb, teacher_emb, 2)
    return F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between e_i − e_j and e_k − e_j for every triplet of distinct (i, j, k)."""
    n = e.shape[0]
    u = F.normalize(e[:, None, :] - e[None, :, :], dim=-1, eps=1e-12)  # u[i, j] = unit(e_i - e_j)
    cos = torch.einsum("ijd,kjd->ijk", u, u)
    idx = torch.arange(n, device=e.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[None, :, None] != idx[None, None, :])
    distinct &= idx[:, None, None] != idx[None, None, :]
    return cos[distinct]


def rkd_angle(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """RKD angle loss (Park et al. 2019): smooth-L1 between student and teacher cosines of the angle at j formed by
    e_i − e_j and e_k − e_j, over all triplets of distinct indices of the batch (N, D); widths may differ.
    """
    s, t = _embeddings(student_emb, teacher_emb, 3)
    return F.smooth_l1_loss(_angles(s), _angles(t))


def attention_map_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions (B, heads, q, k), per query row, averaged over rows.

    Following MiniLM (Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation"), which matches the
    self-attention distributions with KL. When the head counts differ both maps are first averaged over heads.
    ``mask`` (B, q) keeps query rows (e.g. non-padding tokens). Probabilities are clamped at 1e-8 before the log.
    """
    s, t = _float(student_attn, "student attention"), _float(teacher_attn, "teacher attention")
    if s.dim() != 4 or t.dim() != 4:
        raise LeanmlError(f"attention shapes {tuple(s.shape)} and {tuple(t.shape)} are not accepted; use (B, heads, q, k)")
    if s.shape[:1] + s.shape[2:] != t.shape[:1] + t.shape[2:]:
        raise LeanmlError(
            f"student attention shape {tuple(s.shape)} does not match teacher attention shape {tuple(t.shape)}; "
            f"use the same (B, q, k) (head counts may differ)"
        )
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    keep = _keep(mask, torch.Size((s.shape[0], s.shape[2])), "attention mask")
    kl = (t * (t.clamp_min(_PROB_FLOOR).log() - s.clamp_min(_PROB_FLOOR).log())).sum(-1)  # (B, heads, q)
    if keep is not None:
        keep = keep[:, None, :].expand_as(kl)
    return _masked_mean(kl, keep)
