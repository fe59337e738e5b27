"""The distillation trainer: AdamW with warm-up + cosine decay, gradient accumulation and clipping,
seeded and deterministic on CPU, a progress bar with the loss and throughput, atomic checkpoints and a
resume that continues to the same result as an uninterrupted run, an optional cache of the teacher's
top-k logits, and data-parallel training across the processes of a ``torchrun`` job (gloo on CPU,
NCCL on GPUs) through ``torch.distributed``.

Batches are a pure function of the step: the training items are visited in seeded epoch permutations
(or in the given order, for a curriculum), so a resumed run and every process of a parallel run see the
same global batch at the same step; each process takes its own contiguous share of every micro-batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import init_distributed, world  # noqa: F401 - re-exported
from ..errors import LeanmlError
from ..models.handle import ModelHandle, output_tensor
from ..progress import StepBar
from ..prune.finetune import hidden_state_loss, lr_factor
from ..prune.modules import SparseLinear
from .config import Distill
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

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# Items and batches
# ----------------------------------------------------------------------------------------------------


@dataclass
class Items:
    """The training items of one task: ``kind`` ``tokens`` (a (N, T) tensor of windows), ``texts``
    (a list of strings) or ``tensors`` (``x`` rows with optional labels ``y``)."""

    kind: str
    tokens: torch.Tensor | None = None
    texts: list[str] | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    order: list[int] | None = None  # a fixed visiting order (curriculum); None = seeded epoch permutations
    report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        if self.kind == "tokens":
            return len(self.tokens)
        if self.kind == "texts":
            return len(self.texts)
        return len(self.x)

    def subset(self, keep: list[int]) -> Items:
        idx = torch.tensor(keep, dtype=torch.long)
        return Items(
            self.kind,
            None if self.tokens is None else self.tokens[idx],
            None if self.texts is None else [self.texts[i] for i in keep],
            None if self.x is None else self.x[idx],
            None if self.y is None else self.y[idx],
            None,
            dict(self.report),
        )


def batch_indices(n_items: int, step: int, batch_size: int, seed: int, order: list[int] | None = None) -> list[int]:
    """The item indices of the global batch at ``step``: consecutive slices of seeded permutations of
    ``range(n_items)`` (a new one each epoch), or of ``order`` repeated."""
    if n_items < batch_size:
        raise LeanmlError(f"the training data has {n_items} items, fewer than one batch of {batch_size}")
    per_epoch = n_items // batch_size
    epoch, k = divmod(step, per_epoch)
    if order is not None:
        seq = order
    else:
        seq = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return seq[k * batch_size : (k + 1) * batch_size]


def collate(items: Items, idx: list[int], handle: ModelHandle, max_tokens: int):
    """One forward call's input for the items ``idx``."""
    if items.kind == "tokens":
        return {"input_ids": items.tokens[idx]}
    if items.kind == "texts":
        enc = handle.tokenizer(
            [items.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=min(handle.max_length, max_tokens),
            return_tensors="pt",
        )
        return dict(enc)
    t = torch.tensor(idx, dtype=torch.long)
    return (items.x[t], None if items.y is None else items.y[t])


# ----------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------


def _call(module: nn.Module, batch, hidden: bool, attentions: bool):
    if isinstance(batch, dict):
        extra = {}
        if hidden:
            extra["output_hidden_states"] = True
        if attentions:
            extra["output_attentions"] = True
        return module(**batch, **extra)
    return module(batch[0])


def _pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if h.dim() == 2:
        return h
    m = torch.ones(h.shape[:-1], dtype=h.dtype) if mask is None else mask.to(h.dtype)
    return (h * m.unsqueeze(-1)).sum(-2) / m.sum(-1, keepdim=True).clamp_min(1.0)


class Objective(nn.Module):
    """The student plus any learned feature projections; ``forward(batch, ref)`` returns the training
    loss and its parts, given the teacher's outputs ``ref`` (so that one ``DistributedDataParallel``
    wrapper covers every trained parameter)."""

    def __init__(
        self, student: nn.Module, cfg: Distill, task: str, pairs: list[tuple[int, int]], widths: dict[int, tuple[int, int]]
    ):
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.task = task
        self.pairs = pairs
        self.projections = nn.ModuleDict(
            {str(s): FeatureProjection.for_widths(ws, wt) for s, (ws, wt) in widths.items() if ws != wt}
        )

    def forward(self, batch, ref) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, terms = self.cfg, self.cfg.terms
        out = _call(self.student, batch, "hidden" in terms, "attention" in terms)
        logits = output_tensor(out)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        both = "kd" in terms and "task" in terms
        parts: dict[str, torch.Tensor] = {}
        if "task" in terms:
            parts["task"] = (cfg.alpha if both else 1.0) * task_loss(self.task, batch, logits)
        if "kd" in terms:
            weight = (1.0 - cfg.alpha) if both else 1.0
            parts["kd"] = weight * self._kd(logits, ref, mask)
        if "hidden" in terms:
            parts["hidden"] = cfg.hidden_weight * self._hidden(out, ref, mask)
        if "relation" in terms:
            s = _pool(logits, mask)
            t = _pool(ref["logits"], mask)
            parts["relation"] = cfg.relation_weight * (rkd_distance(s, t) + rkd_angle(s, t))
        if "attention" in terms:
            s_att, t_att = out.attentions, ref["attentions"]
            losses = [attention_map_loss(s_att[si - 1], t_att[ti - 1]) for si, ti in self.pairs]
            parts["attention"] = cfg.attention_weight * torch.stack(losses).mean()
        loss = sum(parts.values())
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def _kd(self, logits: torch.Tensor, ref: dict, mask) -> torch.Tensor:
        cfg = self.cfg
        if self.task == "causal-lm":
            teacher = (ref["topk"][0], ref["topk"][1].long()) if "topk" in ref else ref["logits"]
            top_k = None if "topk" in ref else cfg.top_k
            return token_kl(logits, teacher, direction=cfg.kl, temperature=cfg.temperature, top_k=top_k)
        if self.task == "sentence-embedding":
            return hidden_state_loss(logits, ref["logits"], mask)
        return hinton_kd(logits, ref["logits"], None, temperature=cfg.temperature)

    def _hidden(self, out, ref: dict, mask) -> torch.Tensor:
        losses = []
        for si, ti in self.pairs:
            s, t = out.hidden_states[si], ref["hidden_states"][ti]
            proj = self.projections[str(si)] if str(si) in self.projections else None  # noqa: SIM401
            m = None if mask is None else mask.bool()
            loss = feature_loss(s, t, kind=self.cfg.hidden_kind, mask=m, projection=proj)
            if self.cfg.hidden_kind == "mse":  # scale-free: hidden states of LLMs have large, uneven norms
                t32 = t.float()
                power = (t32 * t32).mean() if m is None else (t32 * t32)[m].mean()
                loss = loss / power.clamp_min(1e-12)
            losses.append(loss)
        return torch.stack(losses).mean()


def task_loss(task: str, batch, logits: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (causal LM) or cross-entropy to the labels."""
    if task == "causal-lm":
        ids = batch["input_ids"]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    if isinstance(batch, tuple) and batch[1] is not None:
        return F.cross_entropy(logits.float(), batch[1])
    raise LeanmlError("loss term 'task' needs labels and this data has none; use loss kd")


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, batch, cfg: Distill, task: str) -> dict:
    terms = cfg.terms
    out = _call(teacher, batch, "hidden" in terms, "attention" in terms)
    ref = {"logits": output_tensor(out)}
    if "hidden" in terms:
        ref["hidden_states"] = out.hidden_states
    if "attention" in terms:
        ref["attentions"] = out.attentions
    if cfg.cache_teacher and task == "causal-lm":
        values, indices = ref.pop("logits").float().topk(cfg.top_k, dim=-1)
        ref["topk"] = (values, indices.to(torch.int32))
    return ref


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fingerprint(cfg: Distill, n_items: int) -> dict:
    keep = cfg.model_dump(exclude={"steps", "checkpoint_every"})
    return {"config": keep, "items": n_items}


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def train(
    student: ModelHandle,
    teacher: nn.Module | None,
    cfg: Distill,
    items: Items,
    layer_sources: list[int] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> dict:
    """Train ``student.module`` in place on ``items`` (see the module docstring); returns the report
    (losses per step, seconds, items per second, and, with ``checkpoint_dir``, where it checkpointed)."""
    model = student.module
    if not isinstance(model, nn.Module):
        raise LeanmlError(f"student {student.name!r} is not a torch module; distil before exporting to a runtime")
    if cfg.needs_teacher and teacher is None:
        raise LeanmlError(f"loss {cfg.loss!r} needs a teacher model")
    rank, size = world()
    micro = cfg.batch_size // cfg.grad_accum
    if micro % size:
        raise LeanmlError(
            f"a micro-batch of {micro} items (batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum}) "
            f"cannot be split evenly across {size} processes"
        )
    if len(items) < cfg.batch_size:
        raise LeanmlError(f"the training data has {len(items)} items, fewer than one batch of {cfg.batch_size}")
    if cfg.cache_teacher and student.task != "causal-lm":
        raise LeanmlError(
            f"cache_teacher keeps per-token top-k logits of a causal LM; model {student.name!r} is a "
            f"{student.task} model: turn it off"
        )
    if items.kind == "tensors" and ({"hidden", "attention"} & set(cfg.terms)):
        raise LeanmlError(
            f"loss {cfg.loss!r} needs hidden states/attentions, which a plain nn.Module does not return; use kd, task or relation"
        )
    if "attention" in cfg.terms:
        for module in (model, teacher):
            _eager_attention(module)
    pairs = _pairs(student, teacher, cfg, layer_sources) if {"hidden", "attention"} & set(cfg.terms) else []
    widths = _widths(student, teacher, pairs, items) if "hidden" in cfg.terms else {}
    torch.manual_seed(cfg.seed)
    objective = Objective(model, cfg, student.task, pairs, widths)
    params = [p for p in objective.parameters() if p.is_floating_point()]
    flags = [(p, p.requires_grad) for p in objective.parameters()]
    for p in params:
        p.requires_grad_(True)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    hooks = [m.weight.register_hook(lambda g, m=m: g * m.weight_mask.to(g.dtype)) for m in sparse]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    losses: list[float] = []
    parts_log: list[dict] = []
    start_step = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    fingerprint = _fingerprint(cfg, len(items))
    if resume:
        if ckpt is None or not ckpt.exists():
            raise LeanmlError(f"--resume found no checkpoint at {ckpt}; run without --resume to start")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise LeanmlError(
                f"checkpoint {ckpt} was written by a different configuration or data; "
                "resume with the same settings, or start again without --resume"
            )
        try:
            objective.load_state_dict(state["objective"])
        except RuntimeError:
            raise LeanmlError(f"checkpoint {ckpt} does not fit this student's shapes") from None
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step, losses, parts_log = state["step"], list(state["losses"]), list(state["parts"])
    ddp = None
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(objective, find_unused_parameters=False)
    runner = ddp if ddp is not None else objective
    if teacher is not None:
        teacher.eval()
    cache: dict[int, dict] = {}
    was_training = model.training
    seen_items = 0
    started = time.perf_counter()
    try:
        objective.train()
        with StepBar("distilling", cfg.steps, completed=start_step) as bar:
            for step in range(start_step, cfg.steps):
                idx = batch_indices(len(items), step, cfg.batch_size, cfg.seed, items.order)
                opt.zero_grad(set_to_none=True)
                total, parts = 0.0, {}
                for a in range(cfg.grad_accum):
                    mine = idx[a * micro : (a + 1) * micro]
                    share = micro // size
                    mine = mine[rank * share : (rank + 1) * share]
                    batch = collate(items, mine, student, cfg.window)
                    ref = None
                    if teacher is not None:
                        ref = _cached_teacher(cache, teacher, batch, mine, cfg, student.task)
                    sync = ddp is None or a == cfg.grad_accum - 1
                    ctx = ddp.no_sync() if not sync else _Null()
                    with ctx:
                        loss, p = runner(batch, ref)
                        if not torch.isfinite(loss):
                            raise LeanmlError(f"training diverged at step {step} (loss {float(loss)}); lower lr {cfg.lr}")
                        (loss / cfg.grad_accum).backward()
                    total += float(loss.detach()) / cfg.grad_accum
                    for k, v in p.items():
                        parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                sched.step()
                for m in sparse:
                    m.apply_mask()
                if size > 1:
                    total = _mean_across(total)
                losses.append(round(total, 6))
                parts_log.append({k: round(v, 6) for k, v in parts.items()})
                seen_items += cfg.batch_size
                rate = seen_items / max(1e-9, time.perf_counter() - started)
                bar.advance(f"loss {total:.4f}  {rate:.1f} items/s")
                done = step + 1
                if ckpt is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                    if rank == 0:
                        save_checkpoint(
                            ckpt,
                            {
                                "step": done,
                                "objective": objective.state_dict(),
                                "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(),
                                "rng": torch.get_rng_state(),
                                "losses": losses,
                                "parts": parts_log,
                                "fingerprint": fingerprint,
                            },
                        )
                    if size > 1:
                        import torch.distributed as dist

                        dist.barrier()
                from ..outputs import fault_point

                fault_point("distill-step")
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    seconds = time.perf_counter() - started
    return {
        "steps": cfg.steps,
        "resumed_from": start_step if resume else None,
        "loss": cfg.loss,
        "losses": losses,
        "parts": parts_log,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 2),
        "items_per_s": round(seen_items / max(1e-9, seconds), 2),
        "processes": size,
        "teacher_cached_items": len(cache),
        "layer_pairs": pairs,
        "checkpoint": str(ckpt) if ckpt is not None and cfg.checkpoint_every else None,
    }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _mean_across(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _cached_teacher(cache: dict, teacher: nn.Module, batch, idx: list[int], cfg: Distill, task: str) -> dict:
    """The teacher's outputs for the batch; with ``cache_teacher`` its top-k logits are kept per item
    (a window's outputs do not depend on the other rows), so an item is run through the teacher once."""
    if not cfg.cache_teacher:
        return teacher_outputs(teacher, batch, cfg, task)
    missing = [j for j, i in enumerate(idx) if i not in cache]
    if missing:
        ref = teacher_outputs(teacher, {k: v[missing] for k, v in batch.items()}, cfg, task)
        values, indices = ref["topk"]
        for r, j in enumerate(missing):
            cache[idx[j]] = (values[r].clone(), indices[r].clone())
    return {"topk": (torch.stack([cache[i][0] for i in idx]), torch.stack([cache[i][1] for i in idx]))}


def _eager_attention(module: nn.Module) -> None:
    """Attention maps are only returned by the eager attention implementation of a transformers model."""
    if hasattr(module, "set_attn_implementation"):
        module.set_attn_implementation("eager")
    else:
        raise LeanmlError(
            f"loss term 'attention' needs a Hugging Face transformer that returns attention maps; "
            f"{type(module).__name__} does not"
        )


def _n_layers(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    return getattr(config, "num_hidden_layers", None)


def _pairs(student: ModelHandle, teacher: nn.Module | None, cfg: Distill, sources: list[int] | None) -> list[tuple[int, int]]:
    """``(student, teacher)`` hidden-state indices (0 = embeddings, i = output of layer i)."""
    n_s, n_t = _n_layers(student.module), _n_layers(teacher) if teacher is not None else None
    if n_s is None or n_t is None:
        raise LeanmlError("hidden/attention distillation needs Hugging Face models that report num_hidden_layers")
    if cfg.layer_map == "sources" and sources is not None:
        if len(sources) != n_s:
            raise LeanmlError(f"the student has {n_s} layers but {len(sources)} layer sources were given")
        return [(i + 1, src + 1) for i, src in enumerate(sources)]
    return layer_map(n_s, n_t, "last" if cfg.layer_map == "last" else "uniform")


@torch.no_grad()
def _widths(student: ModelHandle, teacher: nn.Module, pairs, items: Items) -> dict[int, tuple[int, int]]:
    cs, ct = getattr(student.module, "config", None), getattr(teacher, "config", None)
    ws, wt = getattr(cs, "hidden_size", None), getattr(ct, "hidden_size", None)
    if ws is None or wt is None:
        raise LeanmlError("hidden distillation needs models whose config reports hidden_size")
    return {s: (ws, wt) for s, _ in pairs}


__all__ = [
    "CHECKPOINT",
    "Items",
    "Objective",
    "batch_indices",
    "collate",
    "init_distributed",
    "save_checkpoint",
    "task_loss",
    "teacher_outputs",
    "train",
    "world",
]
