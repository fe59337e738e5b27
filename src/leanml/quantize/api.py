"""`quantize(handle, config, data)`: apply one quantization technique to a model (module surgery
on top of the pure math in primitives/gptq/awq/observers)."""

from __future__ import annotations

import torch

from ..calibrate.batches import calibration_batches, run_batches
from ..config import (
    QAT,
    Codebook,
    FloatCast,
    Int8Dynamic,
    Int8Static,
    MixedPrecision,
    SmoothQuant,
    TechniqueConfig,
    WeightOnly,
    coerce_config,
)
from ..data import load_data
from ..errors import LeanmlError
from ..models.handle import ModelHandle
from ..progress import progress
from ..targeting import get_module, select_layers, set_module
from .awq import smoothquant_scales
from .gptq import rtn_quantize_weight
from .mixed import FLOAT_BITS, allocate_bits, layer_sensitivity, storage_bits
from .modules import CastLinear, CodebookLinear, Int8ActConv2d, Int8ActLinear, QuantEmbedding, QuantLinear, embedding_scale
from .observers import KLObserver, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, PercentileObserver
from .primitives import kmeans_quantize, log2_dequantize, log2_quantize, nf4_levels
from .qat import qat_train

LINEAR = (torch.nn.Linear,)


def _mark(handle: ModelHandle, config: TechniqueConfig) -> None:
    handle.meta["modified"] = True
    handle.meta.setdefault("applied", []).append(config.model_dump())


def apply_weight_only(handle: ModelHandle, cfg: WeightOnly, data=None) -> ModelHandle:
    """RTN, GPTQ, AWQ or AWQ+GPTQ weight-only quantization of the targeted linear layers."""
    model = handle.module
    names = select_layers(model, LINEAR, cfg.targets, cfg.ignore, handle.task)
    _check_groups(model, names, cfg.group_size)
    upgrade = upgrade_names(model, names, cfg, handle.task)
    originals = {n: get_module(model, n).weight.detach().clone() for n in upgrade}
    if cfg.method == "rtn":
        results = {}
        for name in progress(names, f"RTN w{cfg.bits}"):
            layer = get_module(model, name)
            results[name] = rtn_weight(layer.weight.detach(), cfg)
    else:
        from .weight_only import quantize_weights

        batches = calibration_batches(handle, data, cfg.calib_windows, cfg.window)
        results = quantize_weights(model, batches, weight_spec(cfg), names)
    for name in upgrade:
        results[name] = upgraded_weight(originals.pop(name), cfg.upgrade_bits)
    for name, qw in results.items():
        replace_linear(model, name, QuantLinear.from_quantized(get_module(model, name), qw))
    quantize_head(model, cfg, handle.task)
    _mark(handle, cfg)
    return handle


def weight_spec(cfg: WeightOnly):
    """The calibrated pass's :class:`~leanml.quantize.weight_only.WeightQuantSpec` of a weight-only step."""
    from .weight_only import WeightQuantSpec

    return WeightQuantSpec(
        bits=cfg.bits,
        group_size=cfg.group_size,
        symmetric=cfg.symmetric,
        method=cfg.method,
        act_order=cfg.act_order,
        static_groups=cfg.static_groups,
        damp=cfg.damp,
        mse_clip=cfg.mse_clip,
        outlier_factor=cfg.outlier_factor,
        awq_grid=cfg.awq_grid,
        refine_scales=cfg.refine_scales,
    )


def rtn_weight(weight: torch.Tensor, cfg: WeightOnly):
    """A weight-only step's round-to-nearest result for one layer's weight."""
    return rtn_quantize_weight(weight, cfg.bits, cfg.group_size, cfg.symmetric, mse_clip=cfg.mse_clip)


def quantize_head(model: torch.nn.Module, cfg: WeightOnly, task: str) -> None:
    """The output head of a causal LM at ``cfg.head_bits`` (round to nearest, per channel), if asked."""
    if cfg.head_bits is None or task != "causal-lm":
        return
    for name in _output_heads(model):
        layer = get_module(model, name)
        qw = rtn_quantize_weight(layer.weight.detach(), cfg.head_bits, None, True, mse_clip=False)
        replace_linear(model, name, QuantLinear.from_quantized(layer, qw))


def upgrade_names(model: torch.nn.Module, names: list[str], cfg: WeightOnly, task: str) -> list[str]:
    """The layers of ``cfg.upgrade`` (each must be one of the step's ``names``), in model order."""
    if not cfg.upgrade:
        return []
    chosen = select_layers(model, LINEAR, cfg.upgrade, [], task)
    stray = [n for n in chosen if n not in set(names)]
    if stray:
        raise LeanmlError(f"upgrade layer {stray[0]!r} is not one of the layers this weight-only step quantizes")
    return chosen


def upgraded_weight(weight: torch.Tensor, bits: int):
    """An upgraded layer's weight: round to nearest at ``bits``, symmetric, one scale per output channel."""
    return rtn_quantize_weight(weight, bits, None, True, mse_clip=False)


def upgrade_layers(handle: ModelHandle, original: ModelHandle, cfg: WeightOnly) -> None:
    """Finish ``cfg`` on ``handle``, which already holds ``cfg``'s calibrated pass without its upgrade:
    the upgraded layers are re-quantized from ``original``'s weights (what :func:`apply_weight_only`
    does with the weights it kept), and the step is recorded as ``cfg``."""
    model, source = handle.module, original.module
    names = select_layers(source, LINEAR, cfg.targets, cfg.ignore, original.task)
    for name in upgrade_names(source, names, cfg, original.task):
        layer = get_module(source, name)
        replace_linear(model, name, QuantLinear.from_quantized(layer, upgraded_weight(layer.weight.detach(), cfg.upgrade_bits)))
    applied = handle.meta.setdefault("applied", [])
    if applied and applied[-1].get("kind") == cfg.kind:
        applied[-1] = cfg.model_dump()


def _output_heads(model: torch.nn.Module) -> list[str]:
    heads = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] == "lm_head"]
    if not heads and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        heads = [n for n, m in model.named_modules() if m is out and isinstance(m, torch.nn.Linear)]
    return heads


def replace_linear(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put ``new`` in place of the linear layer ``name``; an input embedding tied to that layer's weight
    (an LLM's shared embedding / output head) then reads its rows from the quantized head, so the shared
    table stays stored once."""
    old_weight = get_module(model, name).weight
    set_module(model, name, new)
    if not isinstance(new, QuantLinear):
        return
    for emb_name, emb in list(model.named_modules()):
        if isinstance(emb, torch.nn.Embedding) and emb.weight is old_weight:
            scale = embedding_scale(emb, emb_name)
            quant = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, name, emb.padding_idx, scale)
            set_module(model, emb_name, quant.bind(new))


def _check_groups(model: torch.nn.Module, names: list[str], group_size: int | None) -> None:
    for name in names:
        layer = get_module(model, name)
        if group_size is not None and layer.in_features % group_size:
            raise LeanmlError(
                f"group_size {group_size} does not divide the {layer.in_features} inputs of "
                f"layer {name!r}; choose a divisor or group_size: null (per channel)"
            )


def apply_mixed_precision(handle: ModelHandle, cfg: MixedPrecision, data=None) -> ModelHandle:
    """Per-layer sensitivity → bit allocation under ``avg_bits`` → weight-only quantization per width."""
    model = handle.module
    names = select_layers(model, LINEAR, cfg.targets, cfg.ignore, handle.task)
    _check_groups(model, names, cfg.group_size)
    batches = calibration_batches(handle, data, cfg.sensitivity_windows, window=256)
    table = layer_sensitivity(handle, names, batches, cfg.candidates, cfg.group_size)
    sizes = {n: get_module(model, n).weight.numel() for n in names}
    choice = allocate_bits(table, sizes, cfg.avg_bits)
    for bits in sorted({b for b in choice.values() if b < FLOAT_BITS}):
        members = [n for n in names if choice[n] == bits]
        step = WeightOnly(
            bits=bits, group_size=cfg.group_size, method=cfg.method, targets=members, ignore=[], calib_windows=cfg.calib_windows
        )
        apply_weight_only(handle, step, data)
        handle.meta["applied"].pop()  # recorded once below, as the mixed-precision step
    achieved = sum(storage_bits(choice[n]) * sizes[n] for n in names) / sum(sizes.values())
    handle.meta.setdefault("reports", {})["mixed_precision.json"] = {
        "avg_bits": achieved,
        "budget_avg_bits": cfg.avg_bits,
        "bits": choice,
        "sensitivity_mean_kl": table,
    }
    _mark(handle, cfg)
    return handle


def apply_qat(handle: ModelHandle, cfg: QAT, data=None) -> ModelHandle:
    """Fine-tune with fake-quantized weights (STE), then store the trained weights as integers."""
    model = handle.module
    names = select_layers(model, LINEAR, cfg.targets, cfg.ignore, handle.task)
    _check_groups(model, names, cfg.group_size)
    if cfg.init == "gptq":
        apply_weight_only(handle, WeightOnly(bits=cfg.bits, group_size=cfg.group_size, targets=names, ignore=[]), data)
        handle.meta["applied"].pop()
        for n in names:  # continue training from the GPTQ-compensated float weights
            q = get_module(model, n)
            lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            lin.weight.data = q.dequantize()
            if q.bias is not None:
                lin.bias.data = q.bias.detach().clone()
            set_module(model, n, lin)
    batches = calibration_batches(handle, data, cfg.steps, cfg.window)
    losses = qat_train(handle, names, batches, cfg.bits, cfg.group_size, cfg.symmetric, cfg.steps, cfg.lr, cfg.distill)
    for n in names:
        fq = get_module(model, n)
        set_module(model, n, QuantLinear.from_quantized(fq, fq.quantized()))
    handle.meta.setdefault("reports", {})["qat.json"] = {"losses": losses}
    _mark(handle, cfg)
    return handle


def apply_int8_dynamic(handle: ModelHandle, cfg: Int8Dynamic, data=None) -> ModelHandle:
    """int8 weights per channel; activations quantized per token (or tensor) at run time."""
    for name in select_layers(handle.module, LINEAR, cfg.targets, cfg.ignore, handle.task):
        set_module(handle.module, name, Int8ActLinear(get_module(handle.module, name), "dynamic", cfg.per_token))
    _mark(handle, cfg)
    return handle


def make_observer(kind: str, percentile: float = 99.99):
    return {
        "minmax": MinMaxObserver,
        "ema": MovingAverageMinMaxObserver,
        "mse": MSEObserver,
        "kl": KLObserver,
        "percentile": lambda: PercentileObserver(percentile=percentile),
    }[kind]()


@torch.no_grad()
def observe_inputs(handle: ModelHandle, names: list[str], batches: list, make) -> dict:
    """Run ``batches`` and feed every named layer's input to its own observer."""
    observers = {n: make() for n in names}
    hooks = [
        get_module(handle.module, n).register_forward_pre_hook(
            lambda mod, args, n=n: observers[n].observe(args[0].detach().float())
        )
        for n in names
    ]
    try:
        run_batches(handle, list(progress(batches, "calibrating activations")))
    finally:
        for h in hooks:
            h.remove()
    return observers


def _set_static_range(layer, observer, symmetric: bool) -> None:
    qp = observer.qparams(8, symmetric)
    layer.act_scale = qp.scale.reshape(()).to(torch.float32).clone()
    layer.act_zero_point = qp.zero_point.reshape(()).to(torch.float32).clone()


def _own_forward(layer: torch.nn.Module) -> bool:
    """A Conv2d/Linear subclass with a forward of its own (timm's ``Conv2dSame`` pads in it)."""
    base = torch.nn.Conv2d if isinstance(layer, torch.nn.Conv2d) else torch.nn.Linear
    return type(layer).forward is not base.forward


def _close(out, ref: torch.Tensor) -> bool:
    return (
        isinstance(out, torch.Tensor)
        and out.shape == ref.shape
        and bool((out.double() - ref.double()).abs().max() <= 1e-4 * (1 + ref.double().abs().max()))
    )


@torch.no_grad()
def _static_padding(layer: torch.nn.Module, name: str, shape: tuple | None) -> bool:
    """How the int8 layer reproduces ``layer``, a Conv2d/Linear subclass with its own forward: ``True``
    for TensorFlow "SAME" padding computed at run time, ``False`` for its static padding (a Linear: the
    plain product). Checked in float against its forward on seeded inputs at the calibrated input
    ``shape`` and, for a conv, at two other sizes; a one-line error when neither reproduces it there."""
    import copy

    what = f"layer {name!r} ({type(layer).__name__}) computes its output in its own forward"
    leave = f"leave it in float (ignore: [{name!r}])"
    if shape is None:
        raise LeanmlError(f"{what} and was never called on the calibration inputs, so it cannot be checked; {leave}")
    ref = copy.deepcopy(layer).eval()
    w = layer.weight
    g = torch.Generator().manual_seed(0)
    if isinstance(layer, torch.nn.Conv2d):
        *_, c, h, wd = shape
        sizes = [(h, wd), (h + 1, wd + 2), (h + 3, wd + 1)]
        inputs = [torch.randn(1, c, a, b, generator=g) for a, b in sizes]
        candidates = {pad: Int8ActConv2d(layer, "static", pad_same=pad) for pad in (False, True)}

        def run(pad, x):
            return candidates[pad].conv(x, w)
    else:
        inputs = [torch.randn((1, *shape[1:]), generator=g)]
        candidates = {False: None}

        def run(_pad, x):
            return torch.nn.functional.linear(x, w, layer.bias)

    refs = []
    for x in inputs:
        try:
            refs.append(ref(x.to(w.dtype).to(w.device)))
        except Exception:  # noqa: BLE001 - the float layer does not run at this size either
            refs.append(None)
    if refs[0] is None:
        raise LeanmlError(f"{what} and does not run on one item of its calibrated input shape {tuple(shape[1:])}; {leave}")
    at_calibrated = False
    for pad in candidates:
        ok = [_close(run(pad, x.to(w.dtype).to(w.device)), r) for x, r in zip(inputs, refs, strict=True) if r is not None]
        if all(ok):
            return pad
        at_calibrated = at_calibrated or ok[0]
    if at_calibrated:
        raise LeanmlError(
            f"{what}, which int8-static reproduces only at the calibrated input size {h}x{wd} (its padding "
            f"is not static nor TensorFlow 'SAME'); {leave}"
        )
    raise LeanmlError(f"{what}, which int8-static cannot reproduce with a plain convolution/product; {leave}")


def apply_int8_static(handle: ModelHandle, cfg: Int8Static, data=None) -> ModelHandle:
    """int8 weights per channel, int8 activations per tensor with ranges calibrated by an observer.
    A Conv2d/Linear subclass with its own forward (timm's ``Conv2dSame``) is replaced only when the int8
    layer reproduces it (see :func:`_static_padding`): the quantized model then runs at every input
    size the float one does."""
    model = handle.module
    names = select_layers(model, (torch.nn.Linear, torch.nn.Conv2d), cfg.targets, cfg.ignore, handle.task)
    batches = calibration_batches(handle, data, cfg.calib_batches)
    custom = [n for n in names if _own_forward(get_module(model, n))]
    shapes: dict[str, tuple] = {}

    def record(name: str, args: tuple) -> None:  # a pre-hook must return None to leave the input alone
        shapes.setdefault(name, tuple(args[0].shape))

    hooks = [get_module(model, n).register_forward_pre_hook(lambda mod, args, n=n: record(n, args)) for n in custom]
    try:
        observers = observe_inputs(handle, names, batches, lambda: make_observer(cfg.observer, cfg.percentile))
    finally:
        for h in hooks:
            h.remove()
    pad_same = {n: _static_padding(get_module(model, n), n, shapes.get(n)) for n in custom}  # all checks first
    for name in names:
        set_module(model, name, int8_static_layer(get_module(model, name), observers[name], cfg, pad_same.get(name, False)))
    _mark(handle, cfg)
    return handle


def int8_static_layer(layer: torch.nn.Module, observer, cfg: Int8Static, pad_same: bool = False) -> torch.nn.Module:
    """The int8-static replacement of ``layer`` (Linear or Conv2d) with the range ``observer`` found."""
    if isinstance(layer, torch.nn.Conv2d):
        new = Int8ActConv2d(layer, "static", cfg.symmetric_activations, pad_same=pad_same)
    else:
        new = Int8ActLinear(layer, "static", symmetric_act=cfg.symmetric_activations)
    _set_static_range(new, observer, cfg.symmetric_activations)
    return new


@torch.no_grad()
def norm_producers(handle: ModelHandle, names: list[str], block: str | None = None) -> dict[str, tuple[str, float]]:
    """For each named linear layer, the pre-norm whose output is exactly its input and feeds only named
    layers, as ``(norm name, offset)`` (``offset`` 1 for Gemma's ``(1 + w)`` norms): a per-channel scale
    folds into that norm's weight. From the family adapter; models without one get no folding. ``block``
    (a block's full name) looks in that block only (a model read layer by layer holds no other)."""
    from ..models.arch import producers, resolve
    from .weight_only import _norm_scales_exactly

    model = handle.module
    found = resolve(model)
    if found is None:
        return {}
    chosen, out = set(names), {}
    for b in found.blocks:
        if block is not None and b.name != block:
            continue
        for spec in producers(found, b):
            if spec.kind != "norm" or not set(spec.consumers) <= chosen:
                continue
            if _norm_scales_exactly(model.get_submodule(spec.producer), spec.offset):
                out.update(dict.fromkeys(spec.consumers, (spec.producer, spec.offset)))
    return out


def apply_smoothquant(handle: ModelHandle, cfg: SmoothQuant, data=None) -> ModelHandle:
    """SmoothQuant W8A8: per-channel scales s = max|X|^α / max|W|^(1-α) divide the activations and
    multiply the weights (folded into the preceding pre-norm where the family adapter allows, else kept
    as an exact per-channel input scale), then int8 weights × int8 activations."""
    model = handle.module
    names = select_layers(model, LINEAR, cfg.targets, cfg.ignore, handle.task)
    batches = calibration_batches(handle, data, cfg.calib_windows)
    observers = observe_inputs(handle, names, batches, lambda: ChannelAbsMax(cfg.outlier_factor))
    smooth_layers(model, names, observers, norm_producers(handle, names), cfg.alpha)
    static = cfg.activations == "static"
    if static:  # ranges of what the int8 layers will quantize: x / s where s stayed an input scale
        hooks = [
            divide_input(get_module(model, n)) for n in names if getattr(get_module(model, n), "smooth_inv", None) is not None
        ]
        try:
            observers = observe_inputs(handle, names, batches, lambda: make_observer(cfg.observer))
        finally:
            for h in hooks:
                h.remove()
    for n in names:
        set_module(model, n, smoothquant_layer(get_module(model, n), observers[n] if static else None))
    _mark(handle, cfg)
    return handle


def smooth_layers(model: torch.nn.Module, names: list[str], absmax: dict, producers: dict, alpha: float) -> None:
    """SmoothQuant's migration on ``names`` (:func:`smoothing_groups`, then :func:`apply_smoothing`)."""
    apply_smoothing(model, smoothing_groups(model, names, absmax, producers, alpha))


@torch.no_grad()
def smoothing_groups(model: torch.nn.Module, names: list[str], absmax: dict, producers: dict, alpha: float) -> list:
    """SmoothQuant's scales for ``names`` as ``(norm, offset, members, s)``: the layers fed by one norm
    (``producers``, from :func:`norm_producers`) share s = max|X|^α / max|W|^(1-α), to be folded into
    that norm; any other layer is a group of its own with norm None (s stays an input scale).
    ``absmax`` maps each name to its :class:`ChannelAbsMax` of the float inputs."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(producers[n][0] if n in producers else f"self:{n}", []).append(n)
    out = []
    for key, members in groups.items():
        act = torch.stack([absmax[n].absmax for n in members]).amax(0)
        w_max = torch.stack([get_module(model, n).weight.detach().abs().amax(0) for n in members]).amax(0)
        s = smoothquant_scales(act, w_max, alpha)
        own = key.startswith("self:")
        out.append((None if own else key, 0.0 if own else producers[members[0]][1], members, s))
    return out


@torch.no_grad()
def apply_smoothing(model: torch.nn.Module, groups: list) -> None:
    """Multiply each group's weights by its s and fold 1/s into its norm, or keep it as the layer's exact
    input scale (``smooth_inv``, applied by its int8 replacement) where there is no norm."""
    from .weight_only import _fold_norm

    for norm, offset, members, s in groups:
        if norm is None:
            layer = get_module(model, members[0])
            layer.weight.data.mul_(s)
            layer.smooth_inv = (1.0 / s).to(torch.float32)
        else:
            _fold_norm(get_module(model, norm), s, offset)
            for n in members:
                get_module(model, n).weight.data.mul_(s)


def smoothquant_layer(layer: torch.nn.Linear, observer=None) -> Int8ActLinear:
    """The W8A8 replacement of a smoothed ``layer``: static with ``observer``'s range, else dynamic per token."""
    mode = "dynamic" if observer is None else "static"
    new = Int8ActLinear(layer, mode, per_token=True, smooth_inv=getattr(layer, "smooth_inv", None))
    if observer is not None:
        _set_static_range(new, observer, False)
    return new


def divide_input(layer: torch.nn.Module):
    """A pre-hook making the float ``layer`` (weights already multiplied by s) take ``x / s``, as its int8
    replacement will, so it computes the original product; registered before the observer's hook, which
    then sees the scaled input."""
    inv = layer.smooth_inv
    return layer.register_forward_pre_hook(lambda _mod, args: (args[0] * inv.to(args[0].dtype), *args[1:]))


class ChannelAbsMax:
    """Running max |x| per input channel (last axis), over tokens whose norm is at most
    ``outlier_factor`` × the median token norm (attention-sink tokens are left to per-token scales)."""

    def __init__(self, outlier_factor: float | None = None) -> None:
        self.absmax: torch.Tensor | None = None
        self.outlier_factor = outlier_factor

    def observe(self, x: torch.Tensor) -> None:
        rows = x.abs().reshape(-1, x.shape[-1])
        if self.outlier_factor:
            norms = rows.norm(dim=1)
            keep = norms <= self.outlier_factor * norms.median()
            rows = rows[keep] if keep.any() else rows
        m = rows.amax(0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)


def apply_float(handle: ModelHandle, cfg: FloatCast, data=None) -> ModelHandle:
    dtype = torch.float16 if cfg.dtype == "fp16" else torch.bfloat16
    for name in select_layers(handle.module, LINEAR, cfg.targets, cfg.ignore, handle.task):
        set_module(handle.module, name, CastLinear(get_module(handle.module, name), dtype))
    _mark(handle, cfg)
    return handle


def apply_codebook(handle: ModelHandle, cfg: Codebook, data=None) -> ModelHandle:
    """k-means (per tensor or per output row), NF4 (blocks of ``block_size``) or power-of-two levels."""
    for name in progress(select_layers(handle.module, LINEAR, cfg.targets, cfg.ignore, handle.task), cfg.method):
        layer = get_module(handle.module, name)
        w = layer.weight.detach().float()
        if cfg.method == "kmeans":
            codes, book = kmeans_quantize(w, cfg.bits, axis=0 if cfg.per_channel else None)
            new = CodebookLinear(layer, codes, book, cfg.bits, "kmeans")
        elif cfg.method == "nf4":
            if w.shape[1] % cfg.block_size:
                raise LeanmlError(f"block_size {cfg.block_size} does not divide the {w.shape[1]} inputs of {name!r}")
            blocks = w.reshape(w.shape[0], -1, cfg.block_size)
            absmax = blocks.abs().amax(-1).clamp_min(1e-12)
            levels = nf4_levels()
            codes = ((blocks / absmax[..., None])[..., None] - levels).abs().argmin(-1).reshape(w.shape)
            new = CodebookLinear(layer, codes, levels, 4, "nf4", row_scale=absmax)
        else:
            codes, max_exp = log2_quantize(w, cfg.bits)
            m = (1 << (cfg.bits - 1)) - 1
            levels = log2_dequantize(torch.arange(-m, m + 1), cfg.bits, max_exp)  # table index = code + m
            new = CodebookLinear(layer, codes.to(torch.int64) + m, levels, cfg.bits, "log2")
        set_module(handle.module, name, new)
    _mark(handle, cfg)
    return handle


QUANTIZE_CONFIGS = (WeightOnly, Int8Dynamic, Int8Static, SmoothQuant, FloatCast, Codebook, MixedPrecision, QAT)


def check_handle(handle, verb: str) -> ModelHandle:
    """``handle`` when it is a :class:`ModelHandle`; a one-line error naming what was passed otherwise."""
    if not isinstance(handle, ModelHandle):
        raise LeanmlError(
            f"{verb} takes a ModelHandle (from leanml.load_model), got {type(handle).__name__}; "
            "load the model first: leanml.load_model(path_or_name)"
        )
    return handle


def quantize(handle: ModelHandle, config: TechniqueConfig | dict, data=None) -> ModelHandle:
    """Apply ``config`` to ``handle`` in place and return it (calibration from ``data`` when needed).

    ``config`` is a quantization config (:data:`QUANTIZE_CONFIGS`) or a dict with its ``kind``
    (e.g. ``{"kind": "weight-only", "bits": 4}``)."""
    from ..registry import handler_for

    check_handle(handle, "leanml.quantize")
    config = coerce_config(config, QUANTIZE_CONFIGS, "leanml.quantize")
    data = load_data(data) if data is not None else None
    return handler_for(config)(handle, config, data)
