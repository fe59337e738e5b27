"""`prune(handle, config, data)`: apply one pruning technique to a model (module surgery on top of the
pure math in criteria/masks/sparsegpt).

Every handler selects the targeted linear layers (:func:`leanml.targeting.select_layers`; a causal LM's
``lm_head`` is left alone by default), computes keep-masks, zeroes the removed weights and replaces each
layer by a :class:`~leanml.prune.modules.SparseLinear` that shares its parameters and keeps the mask
(dense compute, sparse storage). A ``prune.json`` report (achieved sparsity per layer) goes to
``handle.meta["reports"]``.

* magnitude: no data needed;
* wanda / sparsegpt: layer by layer with :func:`leanml.calibrate.sequential.run_sequential` - each block
  is pruned on the inputs the already-pruned blocks before it produce; inside a block, the stages of
  linears reading one input (q/k/v, o, gate/up, down) are pruned in forward order, each calibrated after
  the earlier stages were pruned. Wanda gathers only ``sum x_j²`` per input feature; SparseGPT the
  Hessian ``2/n XᵀX``. A global Wanda ranking needs every score first, so it is gathered on the dense
  model;
* taylor / gradient: gradients of the task loss (next-token cross-entropy for a causal LM, cross-entropy
  to the model's own predictions otherwise) over the calibration batches.

Structured removal (filters, neurons, heads, layers) is the ``prune-structured`` handler in
:mod:`leanml.prune.structured`, over the same gradients.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..calibrate.batches import calibration_batches
from ..calibrate.sequential import BlockContext, run_sequential
from ..config import TechniqueConfig
from ..data import load_data
from ..errors import LeanmlError
from ..models.handle import ModelHandle, output_tensor
from ..progress import progress
from ..targeting import get_module, select_layers, set_module
from .config import GradualPrune, Prune, StructuredPrune
from .criteria import gradient_importance, magnitude, taylor, wanda
from .masks import cubic_schedule, outlier_ratio, owl_sparsities, select_masks
from .modules import SparseLinear
from .sparsegpt import sparsegpt_prune

LINEAR = (torch.nn.Linear,)


def _mark(handle: ModelHandle, config: TechniqueConfig) -> None:
    handle.meta["modified"] = True
    handle.meta.setdefault("applied", []).append(config.model_dump())


def _report(handle: ModelHandle, masks: dict[str, torch.Tensor], extra: dict) -> None:
    report_counts(handle, {n: (int(mk.sum()), mk.numel()) for n, mk in masks.items()}, extra)


def report_counts(handle: ModelHandle, counts: dict[str, tuple[int, int]], extra: dict) -> None:
    """The ``prune.json`` report from each layer's ``(kept, total)`` weights."""
    per_layer = {n: 1.0 - kept / total for n, (kept, total) in counts.items()}
    total = sum(t for _, t in counts.values())
    removed = sum(t - kept for kept, t in counts.values())
    handle.meta.setdefault("reports", {})["prune.json"] = {
        **extra,
        "overall_sparsity": removed / max(1, total),
        "layers": per_layer,
    }


def _install(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each layer by a SparseLinear; returns the installed masks (an already sparse layer keeps
    its earlier zeros too)."""
    out = {}
    for name, mask in masks.items():
        layer = SparseLinear.from_linear(get_module(model, name), mask)
        set_module(model, name, layer)
        out[name] = layer.weight_mask
    return out


def _check_nm_widths(model: torch.nn.Module, names: list[str], m: int | None) -> None:
    if m is None:
        return
    for name in names:
        width = get_module(model, name).in_features
        if width % m:
            raise LeanmlError(
                f"N:M pattern needs the inputs of every targeted layer to be a multiple of {m}; "
                f"layer {name!r} has {width}; exclude it with ignore or use another m"
            )


# ----------------------------------------------------------------------------------------------------
# One-shot pruning
# ----------------------------------------------------------------------------------------------------


def apply_prune(handle: ModelHandle, cfg: Prune, data=None) -> ModelHandle:
    """Prune the targeted linear layers once, by ``cfg.method`` (see the module docstring)."""
    model = handle.module
    names = select_layers(model, LINEAR, cfg.targets, cfg.ignore, handle.task)
    _check_nm_widths(model, names, cfg.m)
    sparsity, comparison = cfg.target_sparsity, cfg.comparison
    if cfg.method == "magnitude":
        scores = {n: magnitude(get_module(model, n).weight) for n in names}
        masks = select_masks(scores, comparison, sparsity, cfg.n, cfg.m)
        _zero(model, masks)
    else:
        batches = calibration_batches(handle, data, cfg.calib_windows, cfg.window)
        if cfg.method in ("taylor", "gradient"):
            scores = gradient_scores(handle, names, batches, cfg.method)
            masks = select_masks(scores, comparison, sparsity, cfg.n, cfg.m)
            _zero(model, masks)
        elif cfg.method == "wanda" and comparison == "global":
            norms = wanda_input_norms(model, names, batches)
            scores = {n: wanda(get_module(model, n).weight, norms[n].to(get_module(model, n).weight.device)) for n in names}
            masks = select_masks(scores, comparison, sparsity, cfg.n, cfg.m)
            _zero(model, masks)
        else:
            sparsities = owl_allocation(model, names, batches, cfg) if cfg.allocation == "owl" else None
            masks = prune_sequential(model, names, batches, cfg, sparsities)
    masks = _install(model, masks)
    _report(handle, masks, prune_facts(cfg))
    _mark(handle, cfg)
    return handle


def prune_facts(cfg: Prune) -> dict:
    """What the ``prune.json`` report says of the step itself."""
    pattern = f"{cfg.n}:{cfg.m}" if cfg.n else "unstructured"
    return {"method": cfg.method, "pattern": pattern, "comparison": cfg.comparison, "target_sparsity": cfg.target_sparsity}


@torch.no_grad()
def _zero(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        w = get_module(model, name).weight
        w.masked_fill_(~mask.to(w.device), 0)


class _StopForward(Exception):
    """Raised by a hook once every wanted linear has seen its input."""


def _sum_squares(
    module: torch.nn.Module, calls: list, linears: dict[str, torch.nn.Linear], names: list[str]
) -> dict[str, torch.Tensor]:
    """``sum over tokens of x_j²`` per input feature of each named linear, running ``module`` on ``calls``
    (each forward ends as soon as every named linear has been called)."""
    sums: dict[str, torch.Tensor] = {}
    fired: set[str] = set()

    def hook(name: str) -> Callable:
        def pre(_mod, args, kwargs):
            x = args[0] if args else kwargs["input"]
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            part = (x * x).sum(0).cpu()
            sums[name] = part if name not in sums else sums[name] + part
            fired.add(name)
            if fired >= set(names):
                raise _StopForward

        return pre

    handles = [linears[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            for args, kwargs in calls:
                fired.clear()
                with contextlib.suppress(_StopForward):
                    module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise LeanmlError(f"layer {missing[0]!r} was never called on the calibration inputs, so it cannot be scored")
    return sums


def wanda_input_norms(model: torch.nn.Module, names: list[str], batches: list) -> dict[str, torch.Tensor]:
    """``||x_j||_2`` per input feature of every named linear on the (unmodified) model."""
    norms: dict[str, torch.Tensor] = {}

    def process(ctx: BlockContext) -> None:
        for stage in ctx.stages:
            sums = _sum_squares(ctx.module, ctx.calls, ctx.linears, stage)
            norms.update({n: s.sqrt() for n, s in sums.items()})

    run_sequential(model, batches, names, process, label="wanda norms")
    return norms


def owl_allocation(model: torch.nn.Module, names: list[str], batches: list, cfg: Prune) -> dict[str, float]:
    """Per-layer sparsities by OWL from the dense model's Wanda scores (see ``Prune.allocation``)."""
    norms = wanda_input_norms(model, names, batches)
    ratios, sizes = {}, {}
    for n in names:
        w = get_module(model, n).weight
        ratios[n] = outlier_ratio(wanda(w, norms[n].to(w.device)), cfg.owl_m)
        sizes[n] = w.numel()
    return owl_sparsities(ratios, sizes, cfg.target_sparsity, cfg.owl_lambda)


def prune_sequential(
    model: torch.nn.Module,
    names: list[str],
    batches: list,
    cfg: Prune,
    sparsities: dict[str, float] | None = None,
    *,
    before_block: Callable | None = None,
    after_block: Callable | None = None,
    status: Callable[[], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Wanda (layer/row/N:M) or SparseGPT, block by block and stage by stage (errors fed forward);
    the weights are zeroed (and, for SparseGPT, updated) in place. ``sparsities``: per-layer targets
    (default: ``cfg.target_sparsity`` everywhere). Returns the keep-masks.

    ``before_block(i, prefix, block)`` and ``after_block(i, prefix, block, masks)`` bracket each block of
    the stack (a model pruned layer by layer reads and writes it there); ``after_block`` receives the
    block's keep-masks, which are then left out of the result."""
    masks: dict[str, torch.Tensor] = {}
    nm = cfg.comparison == "nm"
    target = {n: cfg.target_sparsity for n in names} if sparsities is None else sparsities

    def process(ctx: BlockContext) -> None:
        for stage in ctx.stages:
            if cfg.method == "wanda":
                sums = _sum_squares(ctx.module, ctx.calls, ctx.linears, stage)
                scores = {n: wanda(ctx.linears[n].weight, sums[n].sqrt().to(ctx.linears[n].weight.device)) for n in stage}
                if sparsities is None:
                    stage_masks = select_masks(scores, cfg.comparison, cfg.target_sparsity, cfg.n, cfg.m)
                else:
                    stage_masks = {n: select_masks({n: scores[n]}, cfg.comparison, target[n])[n] for n in stage}
                _zero_layers(ctx.linears, stage_masks)
            else:
                if cfg.dense_targets and ctx.dense_module is not None:
                    xtx, xtd = ctx.collect_dense_cross(stage[0])
                    hessians = {n: xtx for n in stage}
                else:
                    xtd = None
                    accs = ctx.collect(stage)
                    hessians = {n: accs[n].hessian for n in stage}
                stage_masks = {}
                for name in stage:
                    lin = ctx.linears[name]
                    weight = lin.weight.detach()
                    if xtd is not None:
                        weight = dense_target_weight(weight, hessians[name], xtd, cfg.damp)
                    res = sparsegpt_prune(
                        weight,
                        hessians[name],
                        None if nm else target[name],
                        cfg.n,
                        cfg.m,
                        block_size=cfg.block_size,
                        damp=cfg.damp,
                    )
                    with torch.no_grad():
                        lin.weight.copy_(res.weight.to(lin.weight.device, lin.weight.dtype))
                    stage_masks[name] = res.mask
            masks.update(stage_masks)

    def done(i: int, prefix: str, block: torch.nn.Module) -> None:
        after_block(i, prefix, block, {n: masks.pop(n) for n in list(masks) if n.startswith(prefix + ".")})

    run_sequential(
        model,
        batches,
        names,
        process,
        label=cfg.method,
        outlier_factor=cfg.outlier_factor,
        dense_inputs=cfg.method == "sparsegpt" and cfg.dense_targets,
        before_block=before_block,
        after_block=done if after_block is not None else None,
        status=status,
    )
    return masks


def dense_target_weight(W: torch.Tensor, xtx: torch.Tensor, xtd: torch.Tensor, damp: float) -> torch.Tensor:
    """The least-squares weight ``W' = W (XᵀD)ᵀ (XᵀX + λI)⁻¹`` that best maps the inputs X the layer now
    receives to the outputs ``D Wᵀ`` it gave on the unchanged model's inputs D (``λ = damp · mean diag``).
    Since ``||DWᵀ - XŴᵀ||² = ||XW'ᵀ - XŴᵀ||² + const`` (λ = 0), pruning ``W'`` under ``H = XᵀX`` targets
    the dense model's outputs rather than the layer's own outputs on already-perturbed inputs."""
    H = xtx.to(torch.float64).clone()
    diag = H.diagonal()
    dead = diag == 0
    diag += damp * float(diag.mean()) if bool((~dead).any()) else 1.0
    diag[dead] = 1.0
    rhs = xtd.to(torch.float64) @ W.to(torch.float64).T
    solved = torch.linalg.solve(H, rhs)
    return solved.T.to(W.dtype)


@torch.no_grad()
def _zero_layers(linears: dict[str, torch.nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        w = linears[name].weight
        w.masked_fill_(~mask.to(w.device), 0)


# ----------------------------------------------------------------------------------------------------
# Gradients (taylor / gradient importance)
# ----------------------------------------------------------------------------------------------------


def task_loss(handle: ModelHandle, batch, out: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy for a causal LM; otherwise cross-entropy to the model's own predictions
    (argmax over the last axis), whose gradient measures how much each weight supports them."""
    out = out.float()
    if handle.task == "causal-lm" and isinstance(batch, dict) and "input_ids" in batch:
        ids = batch["input_ids"]
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1).to(out.device))
    flat = out.reshape(-1, out.shape[-1])
    return F.cross_entropy(flat, flat.detach().argmax(-1))


@contextlib.contextmanager
def _grads_only_for(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Only ``params`` require gradients inside the block; the flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p in params:
            p.grad = None


def gradient_scores(handle: ModelHandle, names: list[str], batches: list, method: str) -> dict[str, torch.Tensor]:
    """Taylor (``mean_b |w * g_b|``) or gradient (``mean_b |g_b|``) importance of every named layer's
    weight over ``batches`` (one backward pass per batch, model in eval mode)."""
    model = handle.module
    layers = {n: get_module(model, n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with _grads_only_for(model, [lyr.weight for lyr in layers.values()]):
            for batch in progress(batches, f"{method} scores"):
                for lyr in layers.values():
                    lyr.weight.grad = None
                loss = task_loss(handle, batch, output_tensor(handle.call(batch)))
                loss.backward()
                _accumulate(sums, layers, method)
    finally:
        model.train(was_training)
    return {n: s / len(batches) for n, s in sums.items()}


def _accumulate(sums: dict[str, torch.Tensor], layers: dict[str, torch.nn.Module], method: str) -> None:
    for n, lyr in layers.items():
        g = lyr.weight.grad
        if g is None:
            g = torch.zeros_like(lyr.weight)
        part = taylor(lyr.weight.detach(), g) if method == "taylor" else gradient_importance([g])
        sums[n] = part if n not in sums else sums[n] + part


# ----------------------------------------------------------------------------------------------------
# Gradual pruning with fine-tuning
# ----------------------------------------------------------------------------------------------------


def apply_gradual_prune(handle: ModelHandle, cfg: GradualPrune, data=None) -> ModelHandle:
    """Cubic-schedule gradual pruning with masked fine-tuning between the steps (see ``GradualPrune``)."""
    model = handle.module
    names = select_layers(model, LINEAR, cfg.targets, cfg.ignore, handle.task)
    batches = calibration_batches(handle, data, cfg.calib_windows, cfg.window)
    masks, history = gradual_prune(handle, names, batches, cfg)
    masks = _install(model, masks)
    _report(
        handle,
        masks,
        {
            "method": cfg.method,
            "pattern": "unstructured",
            "comparison": cfg.scope,
            "target_sparsity": cfg.final_sparsity,
            **history,
        },
    )
    _mark(handle, cfg)
    return handle


def gradual_prune(
    handle: ModelHandle, names: list[str], batches: list, cfg: GradualPrune
) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the schedule; returns the final keep-masks and ``{"schedule": [...], "losses": [...]}``."""
    torch.manual_seed(cfg.seed)
    model = handle.module
    layers = {n: get_module(model, n) for n in names}
    masks = {n: torch.ones_like(lyr.weight, dtype=torch.bool) for n, lyr in layers.items()}
    teacher = copy.deepcopy(model).eval() if cfg.distill else None
    params = [lyr.weight for lyr in layers.values()]
    sums: dict[str, torch.Tensor] = {}
    schedule, losses = [], []
    cursor = 0
    was_training = model.training
    hooks = [lyr.weight.register_hook(lambda g, n=n: g * masks[n].to(g.device, g.dtype)) for n, lyr in layers.items()]
    try:
        with _grads_only_for(model, params):
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
            for step in progress(range(1, cfg.steps + 1), "gradual pruning"):
                target = cubic_schedule(step, cfg.steps, cfg.final_sparsity, cfg.initial_sparsity)
                if cfg.method != "magnitude" and not sums:  # no fine-tuning gradients yet: one scoring pass
                    model.eval()
                    for batch in batches:
                        for p in params:
                            p.grad = None
                        _distill_or_task_loss(handle, teacher, batch).backward()
                        _accumulate(sums, layers, cfg.method)
                scores = _gradual_scores(layers, masks, sums, cfg.method)
                masks.update(select_masks(scores, cfg.scope, target))
                _zero(model, masks)
                schedule.append(target)
                sums = {}
                model.train()
                for _ in range(cfg.finetune_steps_per_step):
                    batch = batches[cursor % len(batches)]
                    cursor += 1
                    opt.zero_grad()
                    loss = _distill_or_task_loss(handle, teacher, batch)
                    loss.backward()
                    if cfg.method != "magnitude":
                        _accumulate(sums, layers, cfg.method)
                    opt.step()
                    _zero(model, masks)  # Adam's moments would otherwise move the removed weights
                    losses.append(float(loss))
                model.eval()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return masks, {"schedule": schedule, "losses": losses}


def _gradual_scores(layers: dict, masks: dict, sums: dict, method: str) -> dict[str, torch.Tensor]:
    """Scores with the already removed weights ranked lowest, so masks only ever shrink."""
    out = {}
    for n, lyr in layers.items():
        s = magnitude(lyr.weight) if method == "magnitude" else sums[n]
        out[n] = s.masked_fill(~masks[n].to(s.device), float("-inf"))
    return out


def _distill_or_task_loss(handle: ModelHandle, teacher: torch.nn.Module | None, batch) -> torch.Tensor:
    out = output_tensor(handle.call(batch)).float()
    if teacher is None:
        return task_loss(handle, batch, out)
    with torch.no_grad():
        target = output_tensor(teacher(**batch) if isinstance(batch, dict) else teacher(*batch)).float()
    loss = F.kl_div(out.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")
    return loss / out.shape[1] if out.ndim == 3 else loss


# ----------------------------------------------------------------------------------------------------
# The verb
# ----------------------------------------------------------------------------------------------------


def prune(handle: ModelHandle, config: TechniqueConfig | dict, data=None) -> ModelHandle:
    """Apply the pruning ``config`` to ``handle`` in place and return it (calibration from ``data``).

    ``config`` is a Prune, GradualPrune or StructuredPrune config, or a dict with its ``kind``."""
    from ..config import coerce_config
    from ..quantize.api import check_handle
    from ..registry import handler_for

    check_handle(handle, "leanml.prune")
    config = coerce_config(config, (Prune, GradualPrune, StructuredPrune), "leanml.prune")
    data = load_data(data) if data is not None else None
    return handler_for(config)(handle, config, data)
