"""Structured pruning (``kind: prune-structured``): whole filters, neurons, heads or layers are
physically removed, so the model gets smaller and faster on every runtime.

Two paths, chosen by the model and ``unit``:

* **plain ``nn.Module`` networks** (``filters``; ``neurons`` of a model that is not a recognised
  transformer): :func:`leanml.prune.dependency.channel_groups` finds the channel groups (layers whose
  channels must be removed together; residual sums couple them), each prunable group loses
  ``round(ratio * channels)`` channels with the same indices in every member (producer rows, BatchNorm
  and depthwise parameters, consumer columns), via :mod:`leanml.prune.surgery`;
* **Hugging Face transformers** (llama-style and BERT-style, :mod:`leanml.prune.transformer`): FFN
  neurons, attention heads or whole layers, the same count in every layer so the config describes the
  result.

Units are ranked by :mod:`leanml.prune.units` on the weights removed with each unit (``l1``/``l2``), on
first-order Taylor scores of those weights (gradients of :func:`leanml.prune.api.task_loss` over the
calibration batches, :func:`leanml.prune.api.gradient_scores`), or on the mean ``|activation|`` the
unit feeds into the next layers (forward hooks over the calibration batches; for whole layers the block
influence ``1 - cos(input, output)`` of Men et al. 2024, "ShortGPT"). The lowest-ranked units go.

The report ``prune.json`` (``handle.meta["reports"]``) lists the units removed per layer (with their
indices), the groups that were left whole and why, and the parameter counts before and after.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate.batches import calibration_batches
from ..errors import LeanmlError
from ..models.handle import ModelHandle
from ..targeting import get_module, select_layers
from .api import _mark, gradient_scores
from .config import StructuredPrune
from .dependency import IN, OUT, THROUGH, ChannelGroup, channel_groups
from .surgery import CONV, check_resizable, count_params, keep_channels, keep_columns, keep_rows
from .transformer import Block, Layout, detect_layout, drop_layers, ffn_slices, head_slices, prune_ffn, prune_heads
from .units import lowest_units, unit_activation, unit_magnitude, unit_taylor, units_to_remove


def check_unit_layout(handle: ModelHandle, cfg) -> object:
    """The transformer layout of ``handle`` (``None`` for a plain network), refusing a unit it lacks."""
    layout = detect_layout(handle.module)
    if cfg.unit in ("heads", "layers") and layout is None:
        from ..models.arch import describe, supported

        raise LeanmlError(
            f"unit {cfg.unit!r} does not apply to model {handle.name!r} ({describe(handle.module)}): it applies to "
            f"the Hugging Face transformer families {', '.join(supported())}; use unit 'filters' or 'neurons'"
        )
    if cfg.unit == "heads" and not layout.heads_removable:
        raise LeanmlError(
            f"attention heads of {layout.family} models cannot be removed (its attention splits the fused "
            "projection by the hidden size); use unit 'neurons' or 'layers'"
        )
    if cfg.unit == "filters" and layout is not None:
        raise LeanmlError(f"unit 'filters' does not apply to transformer {handle.name!r}; use neurons, heads or layers")
    return layout


def apply_structured_prune(handle: ModelHandle, cfg: StructuredPrune, data=None) -> ModelHandle:
    """Remove the lowest-ranked ``cfg.unit`` units of ``handle``'s model in place (see the module
    docstring) and write the ``prune.json`` report."""
    model = handle.module
    if not handle.is_torch or not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise LeanmlError(f"structured pruning needs an eager PyTorch model; {handle.name!r} runs on {handle.runtime}")
    layout = check_unit_layout(handle, cfg)
    before = count_params(model)
    if cfg.unit in ("filters", "neurons") and layout is None:
        details = prune_channels(handle, cfg, data)
    elif cfg.unit == "neurons":
        details = prune_ffn_neurons(handle, layout, cfg, data)
    elif cfg.unit == "heads":
        details = prune_attention_heads(handle, layout, cfg, data)
    else:
        details = prune_layers(handle, layout, cfg, data)
    handle.meta.setdefault("reports", {})["prune.json"] = structured_report(cfg, before, count_params(model), details)
    _mark(handle, cfg)
    return handle


def structured_report(cfg: StructuredPrune, before: int, after: int, details: dict) -> dict:
    """The ``prune.json`` report of a structured removal: what was asked, the parameters before and
    after, and the unit's details (``layers`` and widths)."""
    return {
        "method": "structured",
        "unit": cfg.unit,
        "criterion": cfg.criterion,
        "ratio": cfg.ratio,
        "params_before": before,
        "params_after": after,
        "params_removed": before - after,
        "params_fraction_removed": (before - after) / max(1, before),
        **details,
    }


# ----------------------------------------------------------------------------------------------------
# Scoring helpers
# ----------------------------------------------------------------------------------------------------

NEEDS_DATA = ("taylor", "activation")
SHORT_OF_TARGET = 0.25  # a plain-network cut that removes under this × the ratio of the FLOPs is reported


def _calibration(handle: ModelHandle, cfg: StructuredPrune, data) -> list | None:
    """The calibration batches the criterion needs (None for l1/l2): drawn from a dataset, or ``data``
    itself when it is already a list of forward-call inputs. Called after every check that needs no
    data, so a bad config fails before any data is read."""
    if cfg.criterion not in NEEDS_DATA:
        return None
    if isinstance(data, list):
        if not data:
            raise LeanmlError("the list of calibration batches is empty")
        return data
    return calibration_batches(handle, data, cfg.calib_windows, cfg.window)


class _MeanAbs:
    """Running per-feature mean of ``|x|`` along axis ``dim`` over every other axis and every call (the
    streaming form of :func:`leanml.prune.criteria.activation_importance` with ``reduce="mean"``)."""

    def __init__(self, dim: int) -> None:
        self.dim, self.total, self.rows = dim, None, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().movedim(self.dim, -1)
        flat = x.reshape(-1, x.shape[-1]).abs().to(torch.float64)
        part = flat.sum(0).cpu()
        self.total = part if self.total is None else self.total + part
        self.rows += flat.shape[0]

    def value(self) -> torch.Tensor:
        if self.total is None or self.rows == 0:
            raise LeanmlError("a layer was never called on the calibration inputs, so its units cannot be scored")
        return self.total / self.rows


@torch.no_grad()
def _run(handle: ModelHandle, batches: list, hooks: list) -> None:
    """Forward every calibration batch in eval mode; the hooks are removed afterwards."""
    model = handle.module
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            handle.call(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _input_means(handle: ModelHandle, batches: list, readers: dict[str, int]) -> dict[str, torch.Tensor]:
    """Mean ``|x|`` per input feature of each named layer (``readers``: layer -> feature axis)."""
    acc = {n: _MeanAbs(d) for n, d in readers.items()}

    def pre(name: str) -> Callable:
        def hook(_mod, args, kwargs):
            acc[name].update(args[0] if args else next(iter(kwargs.values())))

        return hook

    hooks = [get_module(handle.module, n).register_forward_pre_hook(pre(n), with_kwargs=True) for n in readers]
    _run(handle, batches, hooks)
    return {n: a.value() for n, a in acc.items()}


def _output_means(handle: ModelHandle, batches: list, producers: dict[str, int]) -> dict[str, torch.Tensor]:
    """Mean ``|y|`` per output feature of each named layer (``producers``: layer -> feature axis)."""
    acc = {n: _MeanAbs(d) for n, d in producers.items()}

    def post(name: str) -> Callable:
        def hook(_mod, _args, out):
            acc[name].update(out)

        return hook

    hooks = [get_module(handle.module, n).register_forward_hook(post(n)) for n in producers]
    _run(handle, batches, hooks)
    return {n: a.value() for n, a in acc.items()}


def _weight_unit_scores(
    handle: ModelHandle, criterion: str, slices: dict[str, list[tuple]], n_units: dict[str, int], batches: list | None
) -> dict[str, torch.Tensor]:
    """Unit scores of each key of ``slices`` (a list of ``(layer, axis[, rows])`` weight slices; ``rows``
    a row range of a fused layer, or None) by l1, l2 or Taylor; the Taylor gradients of every layer come
    from one backward pass per batch."""
    model = handle.module

    def cut(t: torch.Tensor, rows) -> torch.Tensor:
        return t if rows is None else t[rows[0] : rows[1]]

    norm = {k: [(sl[0], sl[1], sl[2] if len(sl) > 2 else None) for sl in pairs] for k, pairs in slices.items()}
    if criterion == "taylor":
        layers = list(dict.fromkeys(n for pairs in norm.values() for n, _, _ in pairs))
        per_weight = gradient_scores(handle, layers, batches, "taylor")
        return {k: unit_taylor([(cut(per_weight[n], r), ax) for n, ax, r in pairs], n_units[k]) for k, pairs in norm.items()}
    p = 1 if criterion == "l1" else 2
    return {
        k: unit_magnitude([(cut(get_module(model, n).weight, r), ax) for n, ax, r in pairs], n_units[k], p)
        for k, pairs in norm.items()
    }


# ----------------------------------------------------------------------------------------------------
# Plain networks: channel groups from the dependency analysis
# ----------------------------------------------------------------------------------------------------


def _group_slices(model: nn.Module, g: ChannelGroup) -> list[tuple[str, int]]:
    """The weight slices of a group's units: producer rows, consumer columns, depthwise filters."""
    out = []
    for m in g.members:
        if m.role == OUT:
            out.append((m.layer, 0))
        elif m.role == IN:
            out.append((m.layer, 1))
        elif isinstance(get_module(model, m.layer), CONV):
            out.append((m.layer, 0))
    return out


def _plan_groups(
    handle: ModelHandle, cfg: StructuredPrune, groups: list[ChannelGroup], producer_types: tuple
) -> tuple[list[ChannelGroup], list[dict]]:
    """The groups to prune, and the targeted ones left whole with the reason.

    A group is this unit's when one of its producers is a layer of ``producer_types`` chosen by
    targets/ignore; it is pruned when all such producers are chosen. Producers of the other kind in
    the same group (the Linear of a squeeze-and-excitation gate multiplied into conv channels) follow.
    """
    model = handle.module
    chosen = set(select_layers(model, producer_types, cfg.targets, cfg.ignore, handle.task))
    plan, skipped = [], []
    for g in groups:
        prods = g.producers
        if not any(p in chosen for p in prods):
            continue
        left_out = [p for p in prods if p not in chosen and isinstance(get_module(model, p), producer_types)]
        if left_out:
            reason = f"coupled with layer {left_out[0]!r}, which targets/ignore leave out"
        elif g.frozen:
            reason = "; ".join(g.frozen)
        elif g.coupled and cfg.coupled == "skip":
            reason = "coupled by a residual connection (coupled: skip)"
        else:
            plan.append(g)
            continue
        skipped.append({"layers": prods, "reason": reason})
    if not plan:
        why = f": {skipped[0]['layers'][0]!r} is {skipped[0]['reason']}" if skipped else ""
        raise LeanmlError(f"no {cfg.unit} of model {handle.name!r} can be removed{why}")
    return plan, skipped


def prune_channels(handle: ModelHandle, cfg: StructuredPrune, data=None) -> dict:
    """Filters (Conv producers) or neurons (Linear producers) of a plain network, group by group.
    ``data``: a dataset or a list of forward-call inputs (for taylor/activation, and to trace shapes
    when the handle has no example inputs). After the surgery the model must still run on the traced
    example and give outputs of the same shapes; otherwise every resized layer is restored and a
    one-line error says so (a safety net under the dependency analysis)."""
    model = handle.module
    producer_types = CONV if cfg.unit == "filters" else (nn.Linear,)
    if not any(isinstance(m, producer_types) for m in model.modules()):
        kind = "Conv" if cfg.unit == "filters" else "Linear"
        raise LeanmlError(f"unit {cfg.unit!r} does not apply to model {handle.name!r}: it has no {kind} layers")
    select_layers(model, producer_types, cfg.targets, cfg.ignore, handle.task)  # bad patterns fail first
    batches = _calibration(handle, cfg, data)
    traced_on = batches
    if traced_on is None and data is not None:  # real inputs trace the shapes better than inferred ones
        traced_on = data if isinstance(data, list) else calibration_batches(handle, data, 1, cfg.window)
    example = traced_on[0] if traced_on else handle.example_inputs
    groups = channel_groups(model, example)
    plan, skipped = _plan_groups(handle, cfg, groups, producer_types)
    chosen = select_layers(model, producer_types, cfg.targets, cfg.ignore, handle.task)
    flops_before = _flops(handle, example)
    counts = []
    for g in plan:  # every error comes before any surgery
        others = f" (coupled with {', '.join(repr(p) for p in g.producers[1:])})" if g.coupled else ""
        counts.append(units_to_remove(cfg.ratio, g.channels, f"layer {g.producers[0]!r}{others}"))
    keys = [str(i) for i in range(len(plan))]
    if cfg.criterion == "activation":
        readers = {m.layer: (1 if isinstance(get_module(model, m.layer), CONV) else -1) for g in plan for m in g.consumers}
        producers = {
            p: (1 if isinstance(get_module(model, p), CONV) else -1) for g in plan if not g.consumers for p in g.producers
        }
        read = _input_means(handle, batches, readers)
        made = _output_means(handle, batches, producers) if producers else {}
        scores = {
            k: unit_activation([read[m.layer] for m in g.consumers] or [made[p] for p in g.producers], g.channels)
            for k, g in zip(keys, plan, strict=True)
        }
    else:
        slices = {k: _group_slices(model, g) for k, g in zip(keys, plan, strict=True)}
        sizes = {k: g.channels for k, g in zip(keys, plan, strict=True)}
        scores = _weight_unit_scores(handle, cfg.criterion, slices, sizes, batches)
    layers, report_groups = {}, []
    ref_shapes = _reference_shapes(handle, example)
    backup = {m.layer: copy.deepcopy(get_module(model, m.layer)) for g in plan for m in g.members}
    with torch.no_grad():
        for k, g, n_rm in zip(keys, plan, counts, strict=True):
            removed, kept = lowest_units(scores[k], n_rm)
            if removed:
                for m in g.members:
                    mod = get_module(model, m.layer)
                    if m.role == OUT:
                        keep_rows(mod, kept, 1, m.layer)
                    elif m.role == IN:
                        keep_columns(mod, kept, m.chunk, m.layer)
                    elif m.role == THROUGH:
                        keep_channels(mod, kept, m.layer)
            for p in g.producers:
                layers[p] = {"removed": len(removed), "kept": len(kept)}
            report_groups.append(
                {
                    "producers": g.producers,
                    "members": [f"{m.layer}:{m.role}" for m in g.members],
                    "channels": g.channels,
                    "coupled": g.coupled,
                    "removed_indices": removed,
                }
            )
    _check_pruned(handle, example, ref_shapes, backup)
    flops_after = _flops(handle, example)
    kind = "Conv" if cfg.unit == "filters" else "Linear"
    pruned = sorted(p for p, v in layers.items() if v["removed"])
    reach = {
        "producers_targeted": len(chosen),
        "producers_pruned": len(pruned),
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flops_fraction_removed": None if not flops_before else (flops_before - flops_after) / flops_before,
    }
    summary = f"{cfg.unit} {cfg.ratio:g}: pruned {len(pruned)} of the {len(chosen)} targeted {kind} layers"
    if reach["flops_fraction_removed"] is not None:
        summary += f", {reach['flops_fraction_removed']:.1%} of the FLOPs removed"
    reach["summary"] = summary
    # a cut far below what the ratio asks for (the layers it reached are a small part of the compute)
    if reach["flops_fraction_removed"] is not None and reach["flops_fraction_removed"] < SHORT_OF_TARGET * cfg.ratio:
        why = f"; left whole: {skipped[0]['layers'][0]!r} ({skipped[0]['reason']})" if skipped else ""
        reach["warning"] = (
            f"{summary}, under {SHORT_OF_TARGET:g} × the ratio {cfg.ratio:g}: most of the model was not pruned "
            f"({len(skipped)} groups left whole{why}; see prune.json)"
        )
        handle.meta.setdefault("notes", []).append(reach["warning"])
    return {"layers": layers, "groups": report_groups, "skipped": skipped, **reach}


def _flops(handle: ModelHandle, example) -> int | None:
    from ..measure.cost import count_flops

    try:
        return count_flops(handle, example)
    except Exception:  # noqa: BLE001 - a model the FLOP counter cannot run: the report says nothing of FLOPs
        return None


@torch.no_grad()
def _output_shapes(handle: ModelHandle, example) -> tuple:
    """The shapes of every tensor in the model's output on ``example`` (eval mode)."""
    model = handle.module
    was_training = model.training
    model.eval()
    try:
        out = handle.call(example)
    finally:
        model.train(was_training)
    shapes, stack = [], [out]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            shapes.append(tuple(item.shape))
        elif isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
    return tuple(shapes)


def _reference_shapes(handle: ModelHandle, example) -> tuple | None:
    """The output shapes before the surgery; None when the eager model does not run on ``example``
    (then there is nothing to compare with)."""
    try:
        return _output_shapes(handle, example)
    except Exception:  # noqa: BLE001 - the traced graph ran; the eager call is only a check
        return None


def _check_pruned(handle: ModelHandle, example, ref_shapes: tuple | None, backup: dict[str, nn.Module]) -> None:
    """The pruned model still runs on the example input and gives outputs of the same shape; otherwise
    every resized layer gets its weights back (the model is as it was) and a one-line error says so."""
    if ref_shapes is None:
        return
    try:
        shape = _output_shapes(handle, example)
        problem = None if shape == ref_shapes else f"its output shapes changed from {ref_shapes} to {shape}"
    except Exception as exc:  # noqa: BLE001 - a wrong removal; undo it
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if problem is None:
        return
    model = handle.module
    for name, saved in backup.items():
        vars(get_module(model, name)).update(vars(saved))  # in place: a shared layer stays shared
    raise LeanmlError(
        f"structured pruning of model {handle.name!r} was undone: the pruned model failed a check ({problem}); "
        "leave the layers around the failing operation out with ignore"
    )


# ----------------------------------------------------------------------------------------------------
# Transformers
# ----------------------------------------------------------------------------------------------------


def _check_blocks(handle: ModelHandle, layout: Layout, cfg: StructuredPrune, unit_layers: Callable[[Block], list[str]]) -> None:
    """Every block's unit layers are resizable, and targets/ignore select them in every block or in none
    (the config holds one width for all layers)."""
    model = handle.module
    for b in layout.blocks:
        for n in unit_layers(b):
            check_resizable(get_module(model, n), n, (nn.Linear,))
    chosen = set(select_layers(model, (nn.Linear,), cfg.targets, cfg.ignore, handle.task))
    for b in layout.blocks:
        missing = [n for n in unit_layers(b) if n not in chosen]
        if missing:
            raise LeanmlError(
                f"unit {cfg.unit!r} on a Hugging Face model removes the same units from every layer (the "
                f"config holds one width), but targets/ignore leave out {missing[0]!r}; select all layers"
            )


def prune_ffn_neurons(handle: ModelHandle, layout: Layout, cfg: StructuredPrune, data=None) -> dict:
    """The lowest-ranked FFN neurons of every layer (the same count everywhere). ``data``: a dataset or
    a list of forward-call inputs (taylor/activation only)."""
    model = handle.module
    _check_blocks(handle, layout, cfg, lambda b: b.ffn_layers)
    n, k = ffn_units(layout, cfg)
    batches = _calibration(handle, cfg, data)
    keys = [b.name for b in layout.blocks]
    if cfg.criterion == "activation":
        means = _input_means(handle, batches, {b.ffn_cols: -1 for b in layout.blocks})
        scores = {b.name: unit_activation([means[b.ffn_cols]], n) for b in layout.blocks}
    else:
        scores = _weight_unit_scores(
            handle, cfg.criterion, {b.name: ffn_slices(b) for b in layout.blocks}, dict.fromkeys(keys, n), batches
        )
    keep, layers = {}, {}
    for b in layout.blocks:
        keep[b.index], layers[b.name] = ffn_choice(scores[b.name], k)
    if k:
        prune_ffn(model, layout, keep)
    return {"layers": layers, "intermediate_size": n - k}


def prune_attention_heads(handle: ModelHandle, layout: Layout, cfg: StructuredPrune, data=None) -> dict:
    """The lowest-ranked attention units of every layer: key/value groups (a kv head with its query
    heads; plain heads without grouped-query attention) or, with ``gqa: queries``, the same number of
    query heads from every group. ``data`` as for :func:`prune_ffn_neurons`."""
    model = handle.module
    _check_blocks(handle, layout, cfg, lambda b: b.attn_layers)
    kv_groups, n_units, k = attention_units(layout, cfg)
    batches = _calibration(handle, cfg, data)
    if cfg.criterion == "activation":
        means = _input_means(handle, batches, {b.o: -1 for b in layout.blocks})
        scores = {b.name: unit_activation([means[b.o]], n_units) for b in layout.blocks}
    else:
        scores = _weight_unit_scores(
            handle,
            cfg.criterion,
            {b.name: head_slices(b, kv_groups) for b in layout.blocks},
            {b.name: n_units for b in layout.blocks},
            batches,
        )
    keep_q, keep_kv, layers = {}, {}, {}
    for b in layout.blocks:
        keep_q[b.index], keep_kv[b.index], layers[b.name] = head_choice(layout, scores[b.name], k, kv_groups)
    if k:
        prune_heads(model, layout, keep_q, keep_kv)
    first = layout.blocks[0].index
    return heads_report(layout, layers, len(keep_q[first]), len(keep_kv[first]), kv_groups, k)


def ffn_units(layout: Layout, cfg: StructuredPrune) -> tuple[int, int]:
    """``(n_units, k)`` of FFN pruning: the neurons of each block and how many it removes."""
    n = layout.intermediate
    return n, units_to_remove(cfg.ratio, n, f"the FFN of {layout.blocks[0].name!r}")


def attention_units(layout: Layout, cfg: StructuredPrune) -> tuple[bool, int, int]:
    """``(kv_groups, n_units, k)`` of head pruning: whether a unit is a key/value group, the units a
    block scores, and how many it removes (of each group, with ``gqa: queries``)."""
    kv_groups = cfg.gqa == "kv-groups" or layout.rep == 1
    name0 = layout.blocks[0].name
    if kv_groups:
        what = "key/value heads" if layout.rep > 1 else "attention heads"
        return True, layout.n_kv, units_to_remove(cfg.ratio, layout.n_kv, f"the {what} of {name0!r}")
    k = units_to_remove(cfg.ratio, layout.rep, f"the {layout.rep} query heads of each key/value group of {name0!r}")
    return False, layout.n_heads, k


def ffn_choice(score: torch.Tensor, k: int) -> tuple[list[int], dict]:
    """The FFN neurons one block keeps (its ``k`` lowest-scored removed) and its report entry."""
    removed, kept = lowest_units(score, k)
    return kept, {"removed": len(removed), "kept": len(kept), "removed_indices": removed}


def head_choice(layout: Layout, score: torch.Tensor, k: int, kv_groups: bool) -> tuple[list[int], list[int], dict]:
    """The query and key/value heads one block keeps, from its unit scores, and its report entry."""
    rep = layout.rep
    if kv_groups:
        removed, kept = lowest_units(score, k)
        keep_kv = kept
        keep_q = [g * rep + r for g in kept for r in range(rep)]
        removed_q = [g * rep + r for g in removed for r in range(rep)]
    else:
        keep_kv = list(range(layout.n_kv))
        keep_q, removed_q = [], []
        for g in range(layout.n_kv):
            rm, kp = lowest_units(score[g * rep : (g + 1) * rep], k)
            keep_q += [g * rep + j for j in kp]
            removed_q += [g * rep + j for j in rm]
    entry = {
        "removed": len(removed_q),
        "kept": len(keep_q),
        "removed_heads": removed_q,
        "removed_kv_heads": sorted(set(range(layout.n_kv)) - set(keep_kv)),
    }
    return keep_q, keep_kv, entry


def heads_report(layout: Layout, layers: dict, n_q: int, n_kv: int, kv_groups: bool, k: int) -> dict:
    out = {
        "layers": layers,
        "heads": n_q,
        "kv_heads": n_kv,
        "head_dim": layout.head_dim,
        "gqa": "kv-groups" if kv_groups else "queries",
    }
    if not layout.found.arch.heads_in_config and k:
        out["note"] = (
            f"a {layout.family} config cannot describe fewer heads of the same size, so its head count "
            f"still says {layout.n_heads}; the layers have {n_q}"
        )
    return out


def _block_influence(handle: ModelHandle, batches: list, blocks: list[Block]) -> dict[str, float]:
    """Mean over tokens of ``1 - cos(x_in, x_out)`` for each block (how much it changes the residual
    stream; a block that hardly changes it can go)."""
    sums = {b.name: [0.0, 0] for b in blocks}

    def post(name: str) -> Callable:
        def hook(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = F.cosine_similarity(
                x.detach().reshape(-1, x.shape[-1]).double(), y.detach().reshape(-1, y.shape[-1]).double(), dim=-1
            )
            sums[name][0] += float((1 - cos).sum())
            sums[name][1] += cos.numel()

        return hook

    hooks = [get_module(handle.module, b.name).register_forward_hook(post(b.name), with_kwargs=True) for b in blocks]
    _run(handle, batches, hooks)
    if any(c == 0 for _, c in sums.values()):
        raise LeanmlError("a layer was never called on the calibration inputs, so it cannot be scored")
    return {n: s / c for n, (s, c) in sums.items()}


def prune_layers(handle: ModelHandle, layout: Layout, cfg: StructuredPrune, data=None) -> dict:
    """Drop the lowest-ranked whole layers among those targets/ignore select. ``data`` as for
    :func:`prune_ffn_neurons`."""
    model = handle.module
    by_name = {b.name: b for b in layout.blocks}
    block_type = type(get_module(model, layout.blocks[0].name))
    names = select_layers(model, (block_type,), cfg.targets, cfg.ignore, handle.task, what="transformer layer")
    cands = [by_name[n] for n in names if n in by_name]
    if not cands:
        raise LeanmlError(f"targets/ignore select no layer of {layout.layers!r}")
    k = units_to_remove(cfg.ratio, len(cands), f"the {len(cands)} selected layers of {layout.layers!r}")
    batches = _calibration(handle, cfg, data)
    if cfg.criterion == "activation":
        influence = _block_influence(handle, batches, cands)
        scores = torch.tensor([influence[b.name] for b in cands], dtype=torch.float64)
    else:
        linears = {
            b.name: [f"{b.name}.{n}" for n, m in get_module(model, b.name).named_modules() if isinstance(m, nn.Linear)]
            for b in cands
        }
        slices = {name: [(n, 0) for n in ls] for name, ls in linears.items()}
        per_block = _weight_unit_scores(handle, cfg.criterion, slices, dict.fromkeys(linears, 1), batches)
        scores = torch.cat([per_block[b.name] for b in cands])
    removed, _ = lowest_units(scores, k)
    gone = [cands[i] for i in removed]
    if gone:
        drop_layers(model, layout, [b.index for b in gone])
    return {
        "removed_layers": [b.name for b in gone],
        "num_hidden_layers": len(layout.blocks) - len(gone),
        "scores": {b.name: float(s) for b, s in zip(cands, scores, strict=True)},
        "layers": {b.name: {"removed": 1} for b in gone},
    }
