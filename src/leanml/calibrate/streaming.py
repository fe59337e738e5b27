"""Weight-only quantization and pruning of a model larger than memory, one block at a time.

The model is opened on the ``meta`` device (:func:`leanml.models.lazy.open_lazy`); everything outside
its stack of blocks (embeddings, final norm, head) is read first. Then for each block in order:

1. its weights are read from the safetensors files or the GGUF file (memory-mapped; GGUF blocks
   dequantized tensor by tensor);
2. RTN quantizes its linears directly (magnitude pruning prunes them); GPTQ/AWQ (Wanda/SparseGPT)
   calibrate them on the cached inputs of the block (:func:`~leanml.calibrate.sequential.run_sequential`,
   errors fed forward exactly as in memory);
3. the block, now holding packed integer layers (or sparse layers), is written to its own safetensors
   file of the artifact, and sent back to ``meta``.

The peak memory is the largest block plus the embeddings (the output head is read once the blocks are
done, and RTN reads neither before) plus the calibration inputs of one block (``windows x tokens x
hidden`` floats, twice), not the model; each released block's memory goes back to the system. The artifact is the same as an
in-memory run's (same tensors and ``leanml.json`` layout), split into one weights file per block, and it
reloads with :func:`leanml.load`. In a ``torchrun`` job every rank calibrates on its share of the windows
and only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Int8Dynamic, Int8Static, SmoothQuant, WeightOnly
from ..errors import LeanmlError
from ..memory import MemoryCap
from ..models.handle import ModelHandle
from ..models.lazy import LAZY_KEY, GGUFWeights, LazyWeights, materialize, release
from ..progress import memory_status, progress
from .sequential import activations_on_disk

LAYERWISE_PRUNE = ("magnitude", "wanda", "sparsegpt")
INT8_STEPS = (Int8Dynamic, Int8Static, SmoothQuant)


def streamable(recipe) -> str | None:
    """Why ``recipe`` cannot run layer by layer (None when it can): one weight-only step, without
    ``upgrade`` (it needs a second pass over the float weights), or one prune step whose masks are
    chosen layer by layer (magnitude, Wanda, SparseGPT; not a global ranking, OWL or gradients)."""
    from ..prune.config import Prune, StructuredPrune
    from ..recipe import load_recipe

    steps = list(load_recipe(recipe).steps)
    if len(steps) != 1 or not isinstance(steps[0], (WeightOnly, Prune, StructuredPrune, *INT8_STEPS)):
        kinds = ", ".join(s.kind for s in steps) or "none"
        return (
            "layer-by-layer compression runs one weight-only step (rtn, gptq, awq), one int8 step (int8-dynamic, "
            f"int8-static, smoothquant), one prune step ({', '.join(LAYERWISE_PRUNE)}) or one prune-structured "
            f"step (neurons, heads); this recipe has: {kinds}"
        )
    step = steps[0]
    if isinstance(step, INT8_STEPS):
        return None
    if isinstance(step, StructuredPrune):
        if step.unit not in ("neurons", "heads"):
            return (
                f"layer-by-layer structured pruning removes neurons or heads; unit {step.unit!r} ranks the whole "
                "model first: load it whole"
            )
        if step.criterion == "taylor":
            return (
                "layer-by-layer structured pruning cannot use criterion 'taylor' (gradients of the whole model); "
                "use l1, l2 or activation"
            )
        return None
    if isinstance(step, Prune):
        if step.method not in LAYERWISE_PRUNE:
            methods = ", ".join(LAYERWISE_PRUNE)
            return f"layer-by-layer pruning runs {methods}; method {step.method!r} needs gradients of the whole model"
        if step.comparison == "global":
            return "layer-by-layer pruning cannot rank weights over the whole model (scope 'global'); use scope 'layer' or 'row'"
        if step.allocation != "uniform":
            return f"layer-by-layer pruning cannot run allocation {step.allocation!r} (a whole-model pass); use 'uniform'"
        return None
    if step.upgrade:
        return "layer-by-layer compression does not run a weight-only step with 'upgrade'; drop it or use more memory"
    return None


class _Shards:
    """The artifact's weights, one safetensors file per call of :meth:`add` (nothing when ``folder`` is
    None: a rank other than 0)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.files: list[str] = []

    def add(self, state: dict[str, torch.Tensor]) -> None:
        from ..artifact import write_weights

        if self.folder is None or not state:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        write_weights(self.folder, name, {k: v.detach().contiguous() for k, v in state.items()})
        self.files.append(name)


def _block_state(prefix: str, block: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in block.state_dict().items()}


def _rest_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors outside the (released) stack, each storage once, and the aliases of tied ones."""
    from ..artifact import _dedup_state

    return _dedup_state(model, skip_meta=True)


def compress_layer_by_layer(
    handle: ModelHandle, recipe, data, folder: Path | None, max_memory: float | None = None, scratch: Path | None = None
) -> dict:
    """Run ``recipe`` (see :func:`streamable`) on the lazily opened ``handle`` block by block, writing the
    weights into ``folder`` (the artifact's temporary folder; None writes nothing). ``max_memory`` (bytes)
    caps the peak resident memory, checked after every block (:class:`leanml.memory.MemoryCap`).
    Calibration inputs too large for memory go under ``scratch`` (default: beside ``folder``, else the
    system's temporary folder). Returns the run's facts: ``weights`` (the files written), ``aliases``,
    ``blocks``, ``peak_rss_bytes``."""
    import tempfile

    place = Path(scratch) if scratch is not None else (folder.parent if folder is not None else Path(tempfile.gettempdir()))
    with MemoryCap(max_memory) as cap:
        return _compress_layer_by_layer(handle, recipe, data, folder, cap, place)


def _compress_layer_by_layer(handle: ModelHandle, recipe, data, folder: Path | None, cap: MemoryCap, scratch: Path) -> dict:
    from ..calibrate.sequential import find_block_stack
    from ..prune.config import Prune, StructuredPrune
    from ..quantize.api import LINEAR, _check_groups, quantize_head, replace_linear, rtn_weight, weight_spec
    from ..quantize.modules import QuantLinear
    from ..targeting import get_module, select_layers

    why = streamable(recipe)
    if why:
        raise LeanmlError(why)
    weights: LazyWeights | GGUFWeights | None = handle.meta.get(LAZY_KEY)
    if weights is None:
        raise LeanmlError(f"model {handle.name!r} was loaded whole; layer-by-layer compression needs it opened lazily")
    cfg = recipe.steps[0]
    model = handle.module
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if isinstance(cfg, Int8Static) else LINEAR
    names = select_layers(model, kinds, cfg.targets, cfg.ignore, handle.task)
    convs = [n for n in names if isinstance(get_module(model, n), torch.nn.Conv2d)]
    if convs:
        raise LeanmlError(
            f"layer {convs[0]!r} is a Conv2d; layer by layer, {cfg.kind} quantizes linear layers only: add it to "
            "'ignore' or load the model whole"
        )
    if isinstance(cfg, StructuredPrune):
        from ..prune.structured import check_unit_layout

        if check_unit_layout(handle, cfg) is None:
            raise LeanmlError(f"model {handle.name!r} has no transformer layout whose {cfg.unit} can be removed; load it whole")
    elif isinstance(cfg, Prune):
        from ..prune.api import _check_nm_widths

        _check_nm_widths(model, names, cfg.m)
    elif isinstance(cfg, WeightOnly):
        _check_groups(model, names, cfg.group_size)
    stack = find_block_stack(model, names)
    if stack is None:
        raise LeanmlError(f"model {handle.name!r} has no stack of blocks holding its linear layers; load it whole")
    stack_name, blocks = stack
    outside = [n for n in names if not n.startswith(stack_name + ".")]
    method = getattr(cfg, "method", cfg.kind)
    if outside and method not in ("rtn", "magnitude", "int8-dynamic", "prune-structured"):
        raise LeanmlError(
            f"layer {outside[0]!r} is outside the stack of blocks {stack_name!r}; a calibrated method ({method}) "
            "runs layer by layer only on the layers inside it: add it to 'ignore' or load the model whole"
        )
    done = [0]

    def status() -> str:
        cap.check(f"block {done[0]} of {len(blocks)}" if done[0] < len(blocks) else "the layers outside the blocks")
        return memory_status()

    shards = _Shards(folder)
    mine = {n for n in names if n.startswith(stack_name + ".")}

    def finish(prefix: str, block: nn.Module) -> None:
        status()
        shards.add(_block_state(prefix, block))
        release(block)
        done[0] += 1

    facts: dict = {}
    if isinstance(cfg, Prune):
        _prune_blocks(handle, cfg, data, weights, stack, mine, outside, finish, status, cap, scratch, facts)
    elif isinstance(cfg, INT8_STEPS):
        _int8_blocks(handle, cfg, data, weights, stack, mine, outside, finish, status, cap, scratch, facts)
    elif isinstance(cfg, StructuredPrune):
        _structured_blocks(handle, cfg, data, weights, stack, finish, status, cap, scratch, facts)
    elif cfg.method == "rtn":
        _data_free_blocks(
            handle,
            weights,
            stack,
            mine,
            outside,
            finish,
            status,
            f"RTN w{cfg.bits}, layer by layer",
            lambda layer: QuantLinear.from_quantized(layer, rtn_weight(layer.weight.detach(), cfg)),
        )
    else:
        from ..quantize.weight_only import quantize_weights

        batches, before = _calibration_start(handle, cfg, data, weights, stack_name)
        offload = _offload_place(model, batches, False, cap, scratch, facts)

        def after(_i: int, prefix: str, block: nn.Module, records: dict) -> None:
            for name, qw in records.items():
                old = get_module(model, name)
                replace_linear(model, name, QuantLinear.from_quantized(old, qw))
                old.to("meta")  # the calibration keeps a table of the original layers: free their weights now
            finish(prefix, block)

        with activations_on_disk(offload):
            quantize_weights(
                model, batches, weight_spec(cfg), sorted(mine), before_block=before, after_block=after, status=status
            )
        materialize(model, "", weights, skip=stack_name)
    if isinstance(cfg, WeightOnly):
        quantize_head(model, cfg, handle.task)
    state, aliases = _rest_state(model)
    shards.add(state)
    peak = cap.check("the end")
    handle.meta["modified"] = True
    handle.meta.setdefault("applied", []).append(cfg.model_dump())
    facts.update(weights=shards.files, aliases=aliases, blocks=len(blocks), peak_rss_bytes=peak)
    facts["peak_from"] = "kernel (VmHWM)" if cap.kernel else "samples after each block"
    if cap.limit is not None:
        facts["max_memory_bytes"] = int(cap.limit)
    return facts


OFFLOAD_FRACTION = 0.25  # cached block inputs above this share of the memory budget go to disk


def _offload_place(model: nn.Module, batches, dense: bool, cap: MemoryCap, scratch: Path, facts: dict) -> Path | None:
    """Where the calibration's cached block inputs go: None (memory) when they take at most
    :data:`OFFLOAD_FRACTION` of the budget (``--max-memory``, else the memory available now), else
    ``scratch`` (the runner makes a temporary folder of its own there, removed when the run ends)."""

    import psutil

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    width = getattr(emb, "embedding_dim", None)
    if width is None:
        return None

    def tokens(batch) -> int:
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        return int(ids.numel()) if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else 0

    need = sum(tokens(b) for b in batches) * int(width) * 4 * (2 if dense else 1)
    budget = cap.limit if cap.limit is not None else psutil.virtual_memory().available
    facts["activations_bytes"] = need
    if need == 0 or need <= OFFLOAD_FRACTION * budget:
        return None
    facts["activations_on_disk"] = str(scratch)
    return scratch


def _calibration_start(handle: ModelHandle, cfg, data, weights: LazyWeights | GGUFWeights, stack_name: str):
    """What a calibrated pass reads before the blocks: the embeddings (they feed the first block; the
    output head is read only once the blocks are done) and the calibration batches (as many as the
    in-memory step takes); with the hook that reads each block's weights before it runs."""
    from ..calibrate.batches import calibration_batches
    from ..quantize.api import _output_heads

    model = handle.module
    materialize(model, "", weights, skip=(stack_name, *_output_heads(model)))
    count = cfg.calib_batches if isinstance(cfg, Int8Static) else cfg.calib_windows
    batches = calibration_batches(handle, data, count, *([cfg.window] if hasattr(cfg, "window") else []))

    def before(_i: int, prefix: str, _block: nn.Module) -> None:
        materialize(model, prefix, weights)

    return batches, before


def _prune_blocks(
    handle: ModelHandle, cfg, data, weights: LazyWeights | GGUFWeights, stack, mine, outside, finish, status, cap, scratch, facts
) -> None:
    """The prune step of :func:`compress_layer_by_layer`: each block's masks chosen and installed
    (``SparseLinear``) while the block is in memory, as :func:`leanml.prune.api.apply_prune` does for
    the whole model; the ``prune.json`` report from the layers' counts."""
    from ..prune.api import prune_facts, prune_sequential, report_counts
    from ..prune.criteria import magnitude
    from ..prune.masks import select_masks
    from ..prune.modules import SparseLinear
    from ..targeting import get_module, set_module

    model = handle.module
    stack_name, blocks = stack
    counts: dict[str, tuple[int, int]] = {}

    def install(masks: dict[str, torch.Tensor]) -> None:
        for name, mask in masks.items():
            old = get_module(model, name)
            set_module(model, name, SparseLinear.from_linear(old, mask))  # shares old's weight
            counts[name] = (int(mask.sum()), mask.numel())

    def by_magnitude(names: list[str]) -> None:
        scores = {n: magnitude(get_module(model, n).weight) for n in names}
        install(select_masks(scores, cfg.comparison, cfg.target_sparsity, cfg.n, cfg.m))

    if cfg.method == "magnitude":
        for i in progress(range(len(blocks)), "magnitude pruning, layer by layer", status=status):
            prefix = f"{stack_name}.{i}"
            materialize(model, prefix, weights)
            by_magnitude(sorted(n for n in mine if n.startswith(prefix + ".")))
            finish(prefix, blocks[i])
        materialize(model, "", weights, skip=stack_name)
        if outside:
            by_magnitude(sorted(outside))
    else:
        batches, before = _calibration_start(handle, cfg, data, weights, stack_name)

        def after(_i: int, prefix: str, block: nn.Module, masks: dict) -> None:
            install(masks)
            finish(prefix, block)

        dense = cfg.method == "sparsegpt" and cfg.dense_targets
        with activations_on_disk(_offload_place(model, batches, dense, cap, scratch, facts)):
            prune_sequential(model, sorted(mine), batches, cfg, None, before_block=before, after_block=after, status=status)
        materialize(model, "", weights, skip=stack_name)
    report_counts(handle, dict(sorted(counts.items())), prune_facts(cfg))


def _data_free_blocks(handle: ModelHandle, weights, stack, mine, outside, finish, status, label: str, make) -> None:
    """A step that needs no data (RTN, int8-dynamic): each block read, its target linears replaced by
    ``make(layer)`` and written; nothing outside the stack is read until the blocks are done, then the
    targets outside it (an output head) are replaced the same way."""
    from ..quantize.api import replace_linear
    from ..targeting import get_module

    model = handle.module
    stack_name, blocks = stack
    for i in progress(range(len(blocks)), label, status=status):
        prefix = f"{stack_name}.{i}"
        materialize(model, prefix, weights)
        for name in sorted(n for n in mine if n.startswith(prefix + ".")):
            layer = get_module(model, name)
            replace_linear(model, name, make(layer))
            layer.to("meta")
        finish(prefix, blocks[i])
    materialize(model, "", weights, skip=stack_name)
    for name in outside:
        replace_linear(model, name, make(get_module(model, name)))


def _int8_blocks(
    handle: ModelHandle, cfg, data, weights: LazyWeights | GGUFWeights, stack, mine, outside, finish, status, cap, scratch, facts
) -> None:
    """The int8 step of :func:`compress_layer_by_layer` (int8-dynamic, int8-static, SmoothQuant), block by
    block, giving the layers :mod:`leanml.quantize.api` gives the whole model: its calibration observes
    the float model only, so each block advances the cached inputs unchanged while its observers watch,
    and its linears become int8 afterwards. SmoothQuant reads each block's channel maxima in one extra
    forward of the block; its static ranges are those of the inputs divided by s (what the smoothed
    float model feeds each layer, up to rounding), and the scales are folded once the block is done."""
    from ..distributed import world
    from ..quantize.api import (
        ChannelAbsMax,
        _own_forward,
        _static_padding,
        apply_smoothing,
        int8_static_layer,
        make_observer,
        norm_producers,
        replace_linear,
        smoothing_groups,
        smoothquant_layer,
    )
    from ..quantize.modules import Int8ActLinear
    from ..targeting import get_module
    from .sequential import run_sequential

    model = handle.module
    stack_name, blocks = stack
    if isinstance(cfg, Int8Dynamic):
        _data_free_blocks(
            handle,
            weights,
            stack,
            mine,
            outside,
            finish,
            status,
            "int8 dynamic, layer by layer",
            lambda layer: Int8ActLinear(layer, "dynamic", cfg.per_token),
        )
        return
    if world()[1] > 1:
        raise LeanmlError(f"{cfg.kind} calibrates activation ranges in one process; run it without torchrun")
    smooth = isinstance(cfg, SmoothQuant)
    static = not smooth or cfg.activations == "static"
    batches, before = _calibration_start(handle, cfg, data, weights, stack_name)
    offload = _offload_place(model, batches, False, cap, scratch, facts)
    percentile = getattr(cfg, "percentile", 99.99)
    held: dict = {}  # the block in hand: its names, hooks, observers, input shapes and smoothing

    def watch(names: list[str], make, inv: dict | None = None) -> tuple[dict, list]:
        """An observer per name on the layer's float input (times ``inv[name]`` where given)."""
        observers = {n: make() for n in names}

        def see(name: str, args: tuple) -> None:
            x = args[0].detach().float()
            observers[name].observe(x if inv is None else x * inv[name])

        hooks = [get_module(model, n).register_forward_pre_hook(lambda _m, a, n=n: see(n, a)) for n in names]
        return observers, hooks

    def process(ctx) -> None:
        names = sorted(ctx.linears)
        groups, inv = [], None
        if smooth:  # s from the block's float inputs; folded once the block is done
            absmax, first = watch(names, lambda: ChannelAbsMax(cfg.outlier_factor))
            try:
                ctx.run()
            finally:
                for h in first:
                    h.remove()
            groups = smoothing_groups(model, names, absmax, norm_producers(handle, names, ctx.prefix), cfg.alpha)
            inv = {n: (1.0 / s).to(torch.float32) for _, _, members, s in groups for n in members}
        observers: dict = {}
        hooks: list = []
        shapes: dict[str, tuple] = {}
        custom = [n for n in names if not smooth and _own_forward(get_module(model, n))]

        def record(name: str, args: tuple) -> None:  # a pre-hook returning None leaves the input alone
            shapes.setdefault(name, tuple(args[0].shape))

        if static:  # ranges of what each int8 layer quantizes: its input, divided by s under SmoothQuant
            observers, hooks = watch(names, lambda: make_observer(cfg.observer, percentile), inv)
            hooks += [get_module(model, n).register_forward_pre_hook(lambda _m, a, n=n: record(n, a)) for n in custom]
        held.update(names=names, hooks=hooks, observers=observers, shapes=shapes, custom=custom, groups=groups)

    def after(_i: int, prefix: str, block: nn.Module) -> None:
        for h in held.pop("hooks", []):
            h.remove()
        names, observers, shapes = held.pop("names", []), held.pop("observers", {}), held.pop("shapes", {})
        custom = {n: _static_padding(get_module(model, n), n, shapes.get(n)) for n in held.pop("custom", [])}
        apply_smoothing(model, held.pop("groups", []))
        for name in names:
            old = get_module(model, name)
            if smooth:
                new = smoothquant_layer(old, observers.get(name))
            else:
                new = int8_static_layer(old, observers[name], cfg, custom.get(name, False))
            replace_linear(model, name, new)
            old.to("meta")
        finish(prefix, block)

    label = f"{cfg.kind}, layer by layer"
    try:
        with activations_on_disk(offload):
            run_sequential(
                model,
                batches,
                sorted(mine),
                process,
                label=label,
                before_block=before,
                after_block=after,
                status=status,
                run_last=static,  # the observers watch the forward that advances the inputs, the last block's too
            )
    finally:  # a run stopped part way leaves no observer on the model
        for h in held.pop("hooks", []):
            h.remove()
    materialize(model, "", weights, skip=stack_name)


def _structured_blocks(
    handle: ModelHandle, cfg, data, weights: LazyWeights | GGUFWeights, stack, finish, status, cap, scratch, facts
) -> None:
    """The prune-structured step of :func:`compress_layer_by_layer` (FFN neurons or attention heads): each
    block's units are scored and removed while the block is in memory, with the scores
    :mod:`leanml.prune.structured` gives the whole model (l1/l2 of the block's weights; ``activation``
    from the unpruned model's inputs, so each block advances the calibration inputs before it is cut);
    the config's widths are set once every block is done; the ``prune.json`` report as in memory."""
    from ..distributed import all_reduce_sum
    from ..models.arch import set_widths
    from ..prune.structured import (
        _check_blocks,
        _MeanAbs,
        _weight_unit_scores,
        attention_units,
        ffn_choice,
        ffn_units,
        head_choice,
        heads_report,
        structured_report,
    )
    from ..prune.surgery import count_params
    from ..prune.transformer import detect_layout, ffn_slices, head_slices, prune_block_ffn, prune_block_heads
    from ..prune.units import unit_activation
    from ..targeting import get_module
    from .sequential import run_sequential

    model = handle.module
    stack_name, blocks = stack
    layout = detect_layout(model)
    neurons = cfg.unit == "neurons"
    _check_blocks(handle, layout, cfg, (lambda b: b.ffn_layers) if neurons else (lambda b: b.attn_layers))
    if neurons:
        (n_units, k), kv_groups = ffn_units(layout, cfg), False
    else:
        kv_groups, n_units, k = attention_units(layout, cfg)
    by_prefix = {b.name: b for b in layout.blocks}
    before_params = count_params(model)
    layers: dict = {}
    kept_counts: list[tuple[int, int]] = []

    def cut(prefix: str, score: torch.Tensor) -> None:
        b = by_prefix[prefix]
        if neurons:
            keep, layers[b.name] = ffn_choice(score, k)
            if k:
                prune_block_ffn(model, b, keep)
            kept_counts.append((len(keep), 0))
        else:
            keep_q, keep_kv, layers[b.name] = head_choice(layout, score, k, kv_groups)
            if k:
                prune_block_heads(model, layout, b, keep_q, keep_kv)
            kept_counts.append((len(keep_q), len(keep_kv)))

    if cfg.criterion in ("l1", "l2"):
        for i in progress(range(len(blocks)), f"prune {cfg.unit} ({cfg.criterion}), layer by layer", status=status):
            prefix = f"{stack_name}.{i}"
            materialize(model, prefix, weights)
            b = by_prefix[prefix]
            slices = {b.name: ffn_slices(b) if neurons else head_slices(b, kv_groups)}
            cut(prefix, _weight_unit_scores(handle, cfg.criterion, slices, {b.name: n_units}, None)[b.name])
            finish(prefix, blocks[i])
    else:  # activation: mean |x| of what the units feed into (down_proj / o_proj), in the unpruned model
        batches, before = _calibration_start(handle, cfg, data, weights, stack_name)
        offload = _offload_place(model, batches, False, cap, scratch, facts)
        readers = [
            by_prefix[f"{stack_name}.{i}"].ffn_cols if neurons else by_prefix[f"{stack_name}.{i}"].o for i in range(len(blocks))
        ]
        held: dict = {}

        def process(ctx) -> None:
            reader = next(r for r in readers if r.startswith(ctx.prefix + "."))
            acc = _MeanAbs(-1)
            hook = get_module(model, reader).register_forward_pre_hook(lambda _m, a: acc.update(a[0]))
            held.update(acc=acc, hook=hook)

        def after(_i: int, prefix: str, block: nn.Module) -> None:
            held.pop("hook").remove()
            acc = held.pop("acc")
            if acc.total is not None:  # under torchrun every rank saw its share of the windows: sum them
                acc.total = all_reduce_sum(acc.total)
                acc.rows = int(all_reduce_sum(torch.tensor([acc.rows], dtype=torch.float64)).item())
            cut(prefix, unit_activation([acc.value()], n_units))
            finish(prefix, block)

        try:
            with activations_on_disk(offload):
                run_sequential(
                    model,
                    batches,
                    readers,
                    process,
                    label=f"prune {cfg.unit} (activation), layer by layer",
                    before_block=before,
                    after_block=after,
                    status=status,
                    run_last=True,  # the hook watches the forward that advances the inputs, the last block's too
                )
        finally:  # a run stopped part way leaves no hook on the model
            if "hook" in held:
                held.pop("hook").remove()
    materialize(model, "", weights, skip=stack_name)
    if k:
        q, kv = kept_counts[0]
        set_widths(model, layout.found, **({"ffn": q} if neurons else {"heads": (q, kv)}))
    details = (
        {"layers": layers, "intermediate_size": n_units - k}
        if neurons
        else heads_report(layout, layers, kept_counts[0][0], kept_counts[0][1], kv_groups, k)
    )
    handle.meta.setdefault("reports", {})["prune.json"] = structured_report(cfg, before_params, count_params(model), details)
