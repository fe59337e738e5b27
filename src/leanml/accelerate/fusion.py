"""Operator fusion in torch: fold inference-mode BatchNorm into the convolution or linear layer before it.

In eval mode ``BN(y) = (y - mean) / sqrt(var + eps) * gamma + beta`` is an affine map per output channel,
so ``BN(conv(x))`` equals a convolution with ``w' = w * s`` (``s = gamma / sqrt(var + eps)`` broadcast
over the output-channel axis 0) and ``b' = (b - mean) * s + beta``. The folded model does one pass over
each activation instead of two and exports to ONNX without BatchNormalization nodes, which is what an
int8 backend needs (Conv + bias, then the quantizer).

The graph is read with ``torch.fx.symbolic_trace`` so residual blocks and nested modules are handled; a
layer is folded only when its output feeds the BatchNorm and nothing else, and both modules are called
exactly once. Models that fx cannot trace (data-dependent control flow) fall back to consecutive
``(layer, BatchNorm)`` children of ``nn.Sequential`` containers.

The math is in float64 and cast back to the layer's dtype. A Linear + BatchNorm1d pair is folded on the
assumption that the linear output is 2-D ``(batch, features)``, the only layout where BatchNorm1d
normalises the features (on a 3-D ``(N, L, F)`` output it would normalise axis 1 instead).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def fold_conv_bn_weights(
    w: torch.Tensor,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``BN(layer(x))`` as one layer; the output channel is axis 0 of ``w``.

    Works for Conv1d/2d/3d weights ``(out, in/groups, *k)`` and Linear weights ``(out, in)``. ``b``,
    ``gamma`` and ``beta`` may be None (no bias, ``affine=False``). Computed in float64 and returned in
    ``w``'s dtype (the bias in ``b``'s dtype when given).
    """
    w64, mean64, var64 = w.detach().double(), mean.detach().double(), var.detach().double()
    b64 = torch.zeros_like(mean64) if b is None else b.detach().double()
    g64 = torch.ones_like(mean64) if gamma is None else gamma.detach().double()
    beta64 = torch.zeros_like(mean64) if beta is None else beta.detach().double()
    s = g64 / torch.sqrt(var64 + eps)
    w_fused = w64 * s.reshape([-1] + [1] * (w.dim() - 1))
    b_fused = (b64 - mean64) * s + beta64
    return w_fused.to(w.dtype), b_fused.to(w.dtype if b is None else b.dtype)


def fold_linear_bn_weights(w, b, mean, var, gamma, beta, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`fold_conv_bn_weights` for a Linear weight ``(out, in)`` and BatchNorm1d over its outputs."""
    return fold_conv_bn_weights(w, b, mean, var, gamma, beta, eps)


def _foldable_pair(layer: nn.Module, bn: nn.Module) -> bool:
    """True when ``bn`` (in eval mode, with running stats) normalises exactly the outputs of ``layer``."""
    if not isinstance(bn, BN_TYPES) or bn.running_mean is None or bn.running_var is None:
        return False
    if isinstance(layer, CONV_TYPES):
        base = next((c for c in type(layer).__mro__ if c in _BN_FOR_CONV), None)  # conv subclasses (SAME pad)
        return base is not None and type(bn) is _BN_FOR_CONV[base] and bn.num_features == layer.out_channels
    if isinstance(layer, nn.Linear):
        return type(bn) is nn.BatchNorm1d and bn.num_features == layer.out_features
    return False


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    w, b = fold_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    with torch.no_grad():
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _label(layer: nn.Module) -> str:
    return "conv+bn" if isinstance(layer, CONV_TYPES) else "linear+bn"


def _pairs_from_fx(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BN name) pairs where the BN is the only user of the layer's output (may raise on trace)."""
    graph = torch.fx.symbolic_trace(model).graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), BN_TYPES):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        prev = node.args[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        if calls[prev.target] != 1 or calls[node.target] != 1:
            continue  # a module called twice cannot be rewritten for one call site only
        pairs.append((prev.target, node.target))
    return pairs


def _pairs_from_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """Consecutive (layer, BN) children of every nn.Sequential in ``model``."""
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        children = list(mod.named_children())
        for (n1, _), (n2, _) in zip(children, children[1:], strict=False):
            prefix = f"{name}." if name else ""
            pairs.append((prefix + n1, prefix + n2))
    return pairs


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``module`` in eval mode with every (Conv/Linear, BatchNorm) pair folded.

    The BatchNorm is replaced by ``nn.Identity``; ``module`` itself is not modified. Returns the copy
    and the fusions applied, e.g. ``["conv+bn: layer1.0.conv1 + layer1.0.bn1", ...]``.
    """
    model = copy.deepcopy(module).eval()
    try:
        pairs = _pairs_from_fx(model)
    except Exception:  # fx cannot trace data-dependent control flow and some custom modules
        pairs = _pairs_from_sequential(model)
    # A module object registered under two names (shared weights) is left alone: folding would change both uses.
    owners = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    fusions = []
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if not _foldable_pair(layer, bn) or owners[id(layer)] != 1 or owners[id(bn)] != 1:
            continue
        _fold_into(layer, bn)
        _set_submodule(model, bn_name, nn.Identity())
        fusions.append(f"{_label(layer)}: {layer_name} + {bn_name}")
    return model, fusions
