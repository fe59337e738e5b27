"""Dependency analysis for structured pruning of plain ``nn.Module`` networks: which layers share a
channel dimension, so that removing a channel in one of them forces the same removal in the others.

The model is traced with ``torch.fx`` (``symbolic_trace``) and its tensor shapes are recorded by running
example inputs through the traced graph (``ShapeProp``, in eval mode, without gradients). Then every
node of the graph is visited in order, tracking which *channel class* its channel axis belongs to:

* a dense Conv (``groups == 1``) or a Linear *produces* a new class (its output channels/features) and
  *consumes* the class of its input (input channels; for a Linear after a flatten, ``H*W`` consecutive
  input features per channel);
* BatchNorm and a depthwise Conv (``groups == in == out``) let the class *pass through* (their
  per-channel parameters are sliced with it), as do elementwise activations, dropout and pooling;
* an elementwise ``+``/``-``/``*``/``/`` of two channel-carrying tensors (a residual connection, an
  SE gate) *couples* their classes: a union-find merges them, so all producers of a residual stream
  form one group whose channels must be removed with the same indices everywhere;
* ``flatten``/``view``/``reshape`` that merge the channel axis with the axes after it or append axes
  of size 1, and reductions over other axes (``mean((2, 3))``), keep the class;
* everything else (concatenation, slicing, grouped convs, LayerNorm, unknown modules and functions,
  the model's inputs and outputs) *freezes* the classes it touches: their channels stay, and the
  reason is reported. This makes the analysis conservative: an operation it does not understand never
  leads to a wrong removal, only to fewer removals.

Union-find over channel classes follows the dependency-graph idea of Fang et al. 2023 ("DepGraph:
Towards Any Structural Pruning"), restricted to the operations listed above.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn.functional as F
from torch import fx, nn

from leanml.errors import LeanmlError

from .surgery import BATCHNORM, CONV

OUT, IN, THROUGH = "out", "in", "through"


@dataclass(frozen=True)
class Member:
    """A layer's share of a channel group: ``out`` (its output channels/rows are the group's channels),
    ``in`` (its input channels/columns; ``chunk`` consecutive input features per channel) or ``through``
    (per-channel parameters: BatchNorm, depthwise conv)."""

    layer: str
    role: str
    chunk: int = 1


@dataclass
class ChannelGroup:
    """Channels that must be removed together (same indices) from every member."""

    channels: int
    members: list[Member]
    frozen: list[str] = field(default_factory=list)

    @property
    def producers(self) -> list[str]:
        return [m.layer for m in self.members if m.role == OUT]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == IN]

    @property
    def coupled(self) -> bool:
        """More than one layer produces these channels (joined by a residual sum or a product)."""
        return len(self.producers) > 1

    @property
    def prunable(self) -> bool:
        return not self.frozen and bool(self.producers)


class _Classes:
    """Union-find over channel classes, each with its size, members and reasons to stay whole."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: list[list[Member]] = []
        self.frozen: list[list[str]] = []

    def new(self, channels: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(channels))
        self.members.append([])
        self.frozen.append([reason] if reason else [])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self.parent[rb] = ra
        self.members[ra] += self.members[rb]
        self.frozen[ra] += self.frozen[rb]
        if self.size[ra] != self.size[rb]:
            self.frozen[ra].append(f"joins {self.size[ra]} and {self.size[rb]} channels")
        return ra

    def add(self, i: int, member: Member) -> None:
        self.members[self.find(i)].append(member)

    def freeze(self, i: int, reason: str) -> None:
        root = self.find(i)
        if reason not in self.frozen[root]:
            self.frozen[root].append(reason)


@dataclass(frozen=True)
class _Chan:
    """Where a tensor's channels lie: class ``cls`` along axis ``dim``, ``chunk`` positions per channel."""

    cls: int
    dim: int
    chunk: int = 1


_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_PASS_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.sigmoid,
    F.tanh,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.abs,
    torch.exp,
    torch.neg,
    operator.neg,
    operator.pos,
}
_PASS_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "abs",
    "exp",
    "neg",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
}
_BINARY = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPE = {torch.flatten, torch.reshape, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "unsqueeze"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


def _meta(node: fx.Node):
    return node.meta.get("tensor_meta")


def _shape(node) -> tuple[int, ...] | None:
    """The output shape of a node that yields one tensor, else None."""
    if not isinstance(node, fx.Node):
        return None
    meta = _meta(node)
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _yields_tensors(node: fx.Node) -> bool:
    """The node yields a tensor or a container holding tensors (split, chunk, max with indices...)."""
    meta = _meta(node)
    if hasattr(meta, "shape"):
        return True
    stack = [meta]
    while stack:
        item = stack.pop()
        if hasattr(item, "shape"):
            return True
        if isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def trace(model: nn.Module, example_inputs) -> fx.GraphModule:
    """``model`` traced by ``torch.fx`` with every node's output shape recorded from ``example_inputs``
    (a tuple of positional tensors, a dict of keyword tensors or one tensor)."""
    name = type(model).__name__
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means the model is out of reach
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LeanmlError(
            f"model {name} cannot be traced by torch.fx ({first[:160]}); structured pruning of "
            "filters/neurons needs a traceable nn.Module (no data-dependent control flow)"
        ) from None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(example_inputs, dict):
        args = [example_inputs.get(p.target, p.args[0] if p.args else None) for p in placeholders]
    elif isinstance(example_inputs, (tuple, list)):
        args = list(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args = [example_inputs]
    else:
        raise LeanmlError(f"model {name} has no example inputs to trace its shapes with; pass calibration data")
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:  # noqa: BLE001 - the inputs do not fit the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LeanmlError(
            f"model {name} does not run on its example inputs ({first[:160]}); pass calibration data that fits it"
        ) from None
    finally:
        model.train(was_training)
    return gm


class _Analysis:
    """One pass over the traced graph (see the module docstring for the rules)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.classes = _Classes()
        self.env: dict[fx.Node, _Chan | None] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def chan(self, node) -> _Chan | None:
        return self.env.get(node) if isinstance(node, fx.Node) else None

    def fresh(self, node: fx.Node, dim: int, reason: str | None = None, member: Member | None = None) -> None:
        """A new class for the node's output channels along ``dim`` (frozen when ``reason`` is given)."""
        shape = _shape(node)
        if shape is None or len(shape) <= dim:
            self.env[node] = None
            return
        cls = self.classes.new(shape[dim], reason)
        if member is not None:
            self.classes.add(cls, member)
        self.env[node] = _Chan(cls, dim)

    def opaque(self, node: fx.Node, reason: str) -> None:
        """An operation the analysis does not model: every channel class it touches stays whole."""
        for n in _input_nodes(node):
            c = self.chan(n)
            if c is not None:
                self.classes.freeze(c.cls, reason)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            self.fresh(node, 1, reason)
        else:
            self.env[node] = None

    def passes(self, node: fx.Node, c: _Chan | None, reason: str) -> None:
        """The output keeps the input's channels (checked on the recorded shapes)."""
        shape, src = _shape(node), _shape(node.args[0]) if node.args else None
        if c is None or shape is None or src is None or len(shape) != len(src) or shape[c.dim] != src[c.dim]:
            self.opaque(node, reason)
            return
        self.env[node] = c

    def consume(self, c: _Chan | None, member: Member, dim: int, width: int, what: str) -> None:
        """``member`` reads the channels of ``c`` along ``dim`` (``width`` input features in all)."""
        if c is None:
            return
        if c.dim != dim or self.classes.size[self.classes.find(c.cls)] * c.chunk != width:
            self.classes.freeze(c.cls, f"{what} reads them in a layout the analysis does not follow")
            return
        self.classes.add(c.cls, Member(member.layer, member.role, c.chunk))

    # -- rules -------------------------------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.fresh(node, 1, f"model input {node.target!r}")
            elif node.op == "get_attr":
                self.env[node] = None
            elif node.op == "output":
                for n in _input_nodes(node):
                    c = self.chan(n)
                    if c is not None:
                        self.classes.freeze(c.cls, "model output")
            elif node.op == "call_module":
                self.module(node)
            else:
                self.function(node)
        return self.groups()

    def module(self, node: fx.Node) -> None:
        name = str(node.target)
        mod = self.gm.get_submodule(name)
        x = node.args[0] if node.args else None
        c = self.chan(x)
        shape = _shape(node)
        if isinstance(mod, CONV):
            if mod.groups == 1:
                self.consume(c, Member(name, IN), 1, mod.in_channels, f"conv {name!r}")
                self.fresh(node, 1, member=Member(name, OUT))
            elif mod.groups == mod.in_channels == mod.out_channels and c is not None and c.chunk == 1 and c.dim == 1:
                self.classes.add(c.cls, Member(name, THROUGH))
                self.env[node] = c
            else:
                self.opaque(node, f"grouped conv {name!r} (groups={mod.groups}) is not supported")
        elif isinstance(mod, BATCHNORM):
            if c is not None and c.dim == 1 and c.chunk == 1:
                self.classes.add(c.cls, Member(name, THROUGH))
                self.env[node] = c
            else:
                self.opaque(node, f"batch norm {name!r} sees them in an unexpected layout")
        elif isinstance(mod, nn.Linear):
            src = _shape(x)
            if src is None or shape is None:
                self.opaque(node, f"linear {name!r} has no recorded shapes")
                return
            self.consume(c, Member(name, IN), len(src) - 1, mod.in_features, f"linear {name!r}")
            self.fresh(node, len(shape) - 1, member=Member(name, OUT))
        elif isinstance(mod, _PASS_MODULES):
            self.passes(node, c, f"{type(mod).__name__} {name!r} changes them")
        elif isinstance(mod, nn.Flatten):
            self.reshape(node, c, f"flatten {name!r}")
        else:
            self.opaque(node, f"{type(mod).__name__} {name!r} is not supported by the dependency analysis")

    def function(self, node: fx.Node) -> None:
        target = node.target
        is_method = node.op == "call_method"
        first = node.args[0] if node.args else None
        c = self.chan(first)
        label = f"{target if is_method else getattr(target, '__name__', target)}"
        if not _yields_tensors(node):
            self.env[node] = None  # sizes, shapes, numbers: no channels to follow
        elif (target in _PASS_METHODS) if is_method else (target in _PASS_FUNCTIONS):
            self.passes(node, c, f"{label} changes them")
        elif (target in _BINARY_METHODS) if is_method else (target in _BINARY):
            self.binary(node, label)
        elif (target in _RESHAPE_METHODS) if is_method else (target in _RESHAPE):
            self.reshape(node, c, label)
        elif (target in _REDUCE_METHODS) if is_method else (target in _REDUCE):
            self.reduce(node, c, label)
        else:
            self.opaque(node, f"operation {label!r} is not supported by the dependency analysis")

    def binary(self, node: fx.Node, label: str) -> None:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and _shape(a) is not None]
        shape = _shape(node)
        if len(operands) == 1 and shape is not None:  # a tensor with a number
            c, src = self.chan(operands[0]), _shape(operands[0])
            if c is not None and len(shape) == len(src) and shape[c.dim] == src[c.dim]:
                self.env[node] = c
                return
        if len(operands) == 2 and shape is not None:
            (a, b), sa, sb = operands, _shape(operands[0]), _shape(operands[1])
            ca, cb = self.chan(a), self.chan(b)
            if (
                ca is not None
                and cb is not None
                and len(sa) == len(sb) == len(shape)
                and ca.dim == cb.dim
                and ca.chunk == cb.chunk
            ):
                d = ca.dim
                if sa[d] == sb[d]:  # a residual sum, a gate: the same channels on both sides
                    self.env[node] = _Chan(self.classes.union(ca.cls, cb.cls), d, ca.chunk)
                    return
                for keep, one, s_keep, s_one in ((ca, cb, sa, sb), (cb, ca, sb, sa)):  # one channel broadcast
                    if s_one[d] == 1 and shape[d] == s_keep[d]:
                        self.classes.freeze(one.cls, f"broadcast over the channels by {label}")
                        self.env[node] = keep
                        return
        self.opaque(node, f"{label} combines tensors whose channels the analysis cannot match")

    def reshape(self, node: fx.Node, c: _Chan | None, label: str) -> None:
        src, shape = _shape(node.args[0]) if node.args else None, _shape(node)
        if c is None or src is None or shape is None:
            self.opaque(node, f"{label} reshapes them")
            return
        d = c.dim
        if shape == src or (shape[: len(src)] == src and all(n == 1 for n in shape[len(src) :])):
            self.env[node] = c  # unchanged, or trailing axes of size 1 added (a gate shaped (B, C, 1, 1))
        elif len(shape) == d + 1 and shape[:d] == src[:d] and shape[d] == prod(src[d:]):
            self.env[node] = _Chan(c.cls, d, c.chunk * prod(src[d + 1 :]))
        else:
            self.opaque(node, f"{label} reshapes them")

    def reduce(self, node: fx.Node, c: _Chan | None, label: str) -> None:
        src, shape = _shape(node.args[0]) if node.args else None, _shape(node)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if c is None or src is None or shape is None or dims is None or c.chunk != 1:
            self.opaque(node, f"{label} reduces them")
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            self.opaque(node, f"{label} reduces them")
            return
        dims = [d % len(src) for d in dims]
        # with keepdim the axis stays put; otherwise it moves left by the reduced axes before it
        dim = c.dim if len(shape) == len(src) else c.dim - sum(d < c.dim for d in dims)
        if c.dim in dims or len(shape) <= dim or shape[dim] != src[c.dim]:
            self.opaque(node, f"{label} reduces them")
            return
        self.env[node] = _Chan(c.cls, dim)

    def groups(self) -> list[ChannelGroup]:
        roots: dict[int, ChannelGroup] = {}
        for i in range(len(self.classes.parent)):
            r = self.classes.find(i)
            if r == i and self.classes.members[r]:
                unique = list(dict.fromkeys(self.classes.members[r]))
                roots[r] = ChannelGroup(self.classes.size[r], unique, list(dict.fromkeys(self.classes.frozen[r])))
        seen: dict[tuple[str, str], list[ChannelGroup]] = {}
        for g in roots.values():
            for m in g.members:
                seen.setdefault((m.layer, m.role), []).append(g)
        for (layer, _), gs in seen.items():
            if len(gs) > 1:  # a layer called on different channel sets (reused module)
                for g in gs:
                    g.frozen.append(f"layer {layer!r} is called more than once")
        return list(roots.values())


def channel_groups(model: nn.Module, example_inputs) -> list[ChannelGroup]:
    """Every channel group of ``model`` (see the module docstring): the layers whose channels must be
    removed together, and, for groups that must stay whole, the reasons."""
    return _Analysis(trace(model, example_inputs)).run()
