"""Recovery fine-tuning after pruning: a short training loop with the sparsity masks kept fixed.

``Finetune`` is a recipe step (``kind: finetune``) that trains the model on the training split of the
data for ``steps`` optimizer steps (AdamW, linear warm-up then cosine decay, gradient clipping, seeded).
Weights that a :class:`~leanml.prune.modules.SparseLinear` has removed get no gradient and are zeroed
again after every step, so the sparsity pattern cannot drift; structurally pruned models simply train
at their new shapes.

Two losses:

* ``task``: next-token cross-entropy for a causal LM; cross-entropy to the labels for labelled tensors;
* ``distill``: agreement with the model as it was before the recipe (the teacher): the temperature-
  scaled KL divergence ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al., 2015, "Distilling the
  Knowledge in a Neural Network") over the output distribution for models with logits, and for text
  encoders the mean-squared error of the token states (divided by the teacher's mean square, so the
  scale of the states does not matter) plus ``1 - cos`` of the mean-pooled sentence embeddings.
  ``task+distill`` adds both (``alpha`` weights the task term).

Inside :func:`leanml.pipeline.apply_recipe` the teacher is a copy of the model taken before the first
step; called directly, pass ``teacher=`` to :func:`finetune`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data import TensorData, TextCorpus
from ..errors import LeanmlError
from ..models.handle import ModelHandle, output_tensor
from ..progress import progress
from .config import _LeanmlConfig, register_config
from .modules import SparseLinear

TEACHER_KEY = "teacher_module"


class Finetune(_LeanmlConfig):
    """Short recovery training (see the module docstring). ``batch_size`` items per step (windows of
    ``window`` tokens for a causal LM, texts for an encoder, rows for tensors); ``warmup`` is the fraction
    of steps with a linearly rising learning rate; ``temperature`` is the distillation temperature."""

    kind: Literal["finetune"] = "finetune"
    steps: int = Field(100, ge=1)
    lr: float = Field(5e-5, gt=0, lt=1)
    batch_size: int = Field(4, ge=1)
    window: int = Field(256, ge=8)
    loss: Literal["task", "distill", "task+distill"] = "distill"
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, gt=0)
    seed: int = 0

    @property
    def needs_teacher(self) -> bool:
        return "distill" in self.loss


register_config(Finetune)


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up over the first
    ``ceil(warmup·steps)`` steps, then cosine decay to 0 at ``steps``."""
    warm = math.ceil(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    span = max(1, steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / span)))


# ----------------------------------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------------------------------


def training_batches(handle: ModelHandle, data, batch_size: int, window: int, seed: int) -> list:
    """Mini-batches from the training split of ``data`` (shuffled with ``seed``), shaped for one forward
    call: ``{"input_ids"}`` for a causal LM, tokenized text batches for an encoder, ``(x, y)`` for tensors."""
    if data is None:
        raise LeanmlError(f"fine-tuning model {handle.name!r} needs training data; pass --data or --calib")
    gen = torch.Generator().manual_seed(seed)
    if handle.task == "causal-lm":
        if not isinstance(data, TextCorpus):
            raise LeanmlError(f"fine-tuning causal LM {handle.name!r} needs running text, not {type(data).__name__}")
        wins = [w for w in data.windows(handle.tokenizer, "train", window) if len(w) == window]
        if len(wins) < batch_size:
            raise LeanmlError(
                f"data {data.name!r} has {len(wins)} training windows of {window} tokens, fewer than one batch of {batch_size}"
            )
        order = torch.randperm(len(wins), generator=gen).tolist()
        return [
            {"input_ids": torch.stack([wins[j] for j in order[i : i + batch_size]])}
            for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
    if isinstance(data, TensorData):
        x, y = data.tensors("calib")
        if len(x) < batch_size:
            raise LeanmlError(f"data {data.name!r} has {len(x)} training items, fewer than one batch of {batch_size}")
        order = torch.randperm(len(x), generator=gen)
        return [
            (x[order[i : i + batch_size]], None if y is None else y[order[i : i + batch_size]])
            for i in range(0, len(x) - batch_size + 1, batch_size)
        ]
    if handle.tokenizer is not None and hasattr(data, "documents"):
        docs = data.documents("calib")
        if len(docs) < batch_size:
            raise LeanmlError(f"data {data.name!r} has {len(docs)} training texts, fewer than one batch of {batch_size}")
        order = torch.randperm(len(docs), generator=gen).tolist()
        return [
            dict(
                handle.tokenizer(
                    [docs[j] for j in order[i : i + batch_size]],
                    padding=True,
                    truncation=True,
                    max_length=min(handle.max_length, window),
                    return_tensors="pt",
                )
            )
            for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
    raise LeanmlError(f"cannot build training batches for model {handle.name!r} from data {data.name!r}")


def _forward(module: torch.nn.Module, batch):
    if isinstance(batch, dict):
        return module(**batch)
    return module(batch[0])


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over every position (all axes but the last)."""
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1)
    t_log = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1)
    return kl.mean() * t * t


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scale-free MSE of token states plus ``1 - cos`` of the mean-pooled embeddings (masked)."""
    s, t = student.float(), teacher.float()
    m = torch.ones(s.shape[:-1], dtype=s.dtype, device=s.device) if mask is None else mask.to(s.device, s.dtype)
    m3 = m.unsqueeze(-1)
    denom = m.sum().clamp_min(1.0) * s.shape[-1]
    mse = (((s - t) ** 2) * m3).sum() / denom
    power = ((t**2) * m3).sum() / denom
    pooled_s = (s * m3).sum(-2) / m3.sum(-2).clamp_min(1.0)
    pooled_t = (t * m3).sum(-2) / m3.sum(-2).clamp_min(1.0)
    return mse / power.clamp_min(1e-12) + (1.0 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean()


def task_loss(handle: ModelHandle, batch, out: torch.Tensor) -> torch.Tensor:
    if handle.task == "causal-lm":
        ids = batch["input_ids"]
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), ids[:, 1:].reshape(-1))
    if isinstance(batch, tuple) and batch[1] is not None:
        return F.cross_entropy(out.float(), batch[1])
    raise LeanmlError(f"loss 'task' needs labels, and data for model {handle.name!r} has none; use loss: distill")


def distill_loss(handle: ModelHandle, batch, out: torch.Tensor, ref: torch.Tensor, temperature: float) -> torch.Tensor:
    if handle.task == "sentence-embedding":
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        return hidden_state_loss(out, ref, mask)
    return kd_kl(out, ref, temperature)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def finetune(handle: ModelHandle, cfg: Finetune, data=None, teacher: torch.nn.Module | None = None) -> dict:
    """Train ``handle.module`` in place per ``cfg``; returns ``{"losses": [...], "seconds": ...}``."""
    model = handle.module
    if not isinstance(model, torch.nn.Module):
        raise LeanmlError(f"model {handle.name!r} is not a torch module; fine-tune before exporting to a runtime")
    teacher = teacher if teacher is not None else handle.meta.get(TEACHER_KEY)
    if cfg.needs_teacher and teacher is None:
        raise LeanmlError(
            f"loss {cfg.loss!r} needs the original model: use it in a recipe after a pruning step, or pass teacher="
        )
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise LeanmlError(f"model {handle.name!r} has no float parameters to fine-tune")
    torch.manual_seed(cfg.seed)
    batches = training_batches(handle, data, cfg.batch_size, cfg.window, cfg.seed)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    hooks = [m.weight.register_hook(lambda g, m=m: g * m.weight_mask.to(g.dtype)) for m in sparse]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    was_training = model.training
    losses: list[float] = []
    started = time.perf_counter()
    try:
        model.train()
        for step in progress(range(cfg.steps), "fine-tuning"):
            batch = batches[step % len(batches)]
            out = output_tensor(_forward(model, batch))
            loss = out.new_zeros((), dtype=torch.float32)
            if cfg.loss in ("task", "task+distill"):
                weight = cfg.alpha if cfg.loss == "task+distill" else 1.0
                loss = loss + weight * task_loss(handle, batch, out)
            if cfg.needs_teacher:
                with torch.no_grad():
                    ref = output_tensor(_forward(teacher, batch))
                weight = 1.0 - cfg.alpha if cfg.loss == "task+distill" else 1.0
                loss = loss + weight * distill_loss(handle, batch, out, ref, cfg.temperature)
            if not torch.isfinite(loss):
                raise LeanmlError(f"fine-tuning diverged at step {step} (loss {float(loss)}); lower lr {cfg.lr}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            sched.step()
            for m in sparse:
                m.apply_mask()
            losses.append(round(float(loss.detach()), 6))
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return {
        "steps": cfg.steps,
        "loss": cfg.loss,
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - started, 2),
    }


def apply_finetune(handle: ModelHandle, cfg: Finetune, data=None) -> ModelHandle:
    """Recipe step: fine-tune in place and record ``finetune.json``."""
    report = finetune(handle, cfg, data)
    handle.meta.setdefault("reports", {})["finetune.json"] = report
    handle.meta["modified"] = True
    handle.meta.setdefault("applied", []).append(cfg.model_dump())
    return handle


def snapshot_teacher(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``module`` to distil from."""
    teacher = copy.deepcopy(module).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


__all__ = [
    "Finetune",
    "TEACHER_KEY",
    "distill_loss",
    "finetune",
    "hidden_state_loss",
    "kd_kl",
    "lr_factor",
    "snapshot_teacher",
    "training_batches",
]
