"""Dependency analysis for structured pruning of plain ``nn.Module`` networks: which layers share a
channel dimension, so that removing a channel in one of them forces the same removal in the others.

The model is traced with ``torch.fx`` and its tensor shapes are recorded by running example inputs
through the traced graph (as ``ShapeProp`` does, in eval mode, without gradients). The tracer keeps as *leaf
modules* (one ``call_module`` node, not traced into) the standard ``torch.nn`` modules, every subclass of
Conv/BatchNorm/Linear (timm's ``Conv2dSame``, which pads its input by a size computed in forward), and,
falling back automatically, every submodule whose forward symbolic tracing cannot follow (Python
control flow on shapes or values, ``math.ceil`` of a size: TensorFlow "SAME" padding modules): when
tracing fails, the innermost module being traced becomes a leaf and the model is traced again. Then
every node of the graph is visited in order, tracking which *channel class* its channel axis belongs to:

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
* ``F.pad`` of the axes after the channel axis, and ``F.interpolate``, keep the class;
* a leaf module the analysis does not know, without parameters or buffers and with one tensor input
  (a padding module, an upsampling), keeps the class when it is checked to act on every channel alone:
  run on the recorded example input and on noise, and on a random half of the channels, its output is
  the same half of its output on all channels (so removing channels commutes with it, at any count);
* a Conv/BatchNorm/Linear subclass with its own forward counts as its base layer when it is checked
  the same way: sliced by the pruning surgery (output rows, input columns, depthwise channels) on a copy,
  it gives the matching slice of the original's output;
* everything else (concatenation, slicing, grouped convs, LayerNorm, unknown modules and functions,
  leaf modules that change the channel count, hold parameters or fail the check, the model's inputs and
  outputs) *freezes* the classes it touches: their channels stay, and the reason is reported. A layer
  that is also used inside such a leaf module (shared, its weight tied) is frozen too. This makes the
  analysis conservative: an operation it does not understand never leads to a wrong removal, only to
  fewer removals.

Union-find over channel classes follows the dependency-graph idea of Fang et al. 2023 ("DepGraph:
Towards Any Structural Pruning"), restricted to the operations listed above.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn.functional as F
from torch import fx, nn

from leanml.errors import LeanmlError

from .surgery import BATCHNORM, CONV, keep_channels, keep_columns, keep_rows

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
    F.interpolate,
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


_LAYERS = (*CONV, *BATCHNORM, nn.Linear)


class _Tracer(fx.Tracer):
    """The ``torch.fx`` tracer of :func:`trace`: the standard leaf modules, every Conv/BatchNorm/Linear
    (subclasses too) and the modules named in ``leaves`` stay leaves; ``failed_in`` is the innermost
    module whose forward raised while being traced ("" for the model's own forward)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or isinstance(m, _LAYERS) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the first module to see the error is the innermost one
                try:
                    self.failed_in = self.path_of_module(m)
                except Exception:  # noqa: BLE001 - a module that is not a submodule of the model
                    self.failed_in = ""
            raise


def _symbolic_trace(model: nn.Module) -> tuple[fx.GraphModule, set[str]]:
    """``model`` traced by :class:`_Tracer`, each submodule that cannot be traced made a leaf in turn;
    returns the graph module and the names of those fallback leaves."""
    name = type(model).__name__
    leaves: set[str] = set()
    limit = sum(1 for _ in model.modules())
    while True:
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: fall back, or the model is out of reach
            failed = tracer.failed_in
            if failed and failed not in leaves and len(leaves) < limit:
                leaves.add(failed)
                continue
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LeanmlError(
                f"model {name} cannot be traced by torch.fx ({first[:160]}) in its own forward; structured "
                "pruning of filters/neurons needs a model whose top-level forward has no data-dependent "
                "control flow (submodules that have it are kept whole)"
            ) from None
        return fx.GraphModule(tracer.root, graph, name), leaves


def _base_forward(mod: nn.Module):
    """The ``forward`` of the torch.nn class ``mod`` derives from, or None."""
    for klass in type(mod).__mro__:
        if klass.__module__.startswith("torch.nn") and "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


def _own_forward(mod: nn.Module) -> bool:
    """A Conv/BatchNorm/Linear subclass whose forward is not its base class's (timm's ``Conv2dSame``)."""
    return isinstance(mod, _LAYERS) and getattr(type(mod), "forward", None) is not _base_forward(mod)


def _has_state(mod: nn.Module) -> bool:
    return next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None


def _needs_probe(mod: nn.Module) -> bool:
    """A leaf whose effect on the channels is checked on its recorded input (see the module docstring)."""
    if isinstance(mod, _LAYERS):
        return _own_forward(mod)
    return not isinstance(mod, (*_PASS_MODULES, nn.Flatten)) and not _has_state(mod)


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph, recording each node's output shape as ``ShapeProp`` does (without its
    printed traceback when a node fails) and keeping the inputs of the call_module nodes in ``probe``."""

    def __init__(self, gm: fx.GraphModule, probe: set[str]) -> None:
        super().__init__(gm)
        self.probe, self.inputs = probe, {}

    def run_node(self, n: fx.Node):
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        result = super().run_node(n)
        found = False

        def extract(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = fx.node.map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def call_module(self, target, args, kwargs):
        if target in self.probe and target not in self.inputs:
            keep = fx.node.map_aggregate(args, lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a)
            self.inputs[target] = (tuple(keep), dict(kwargs))
        return super().call_module(target, args, kwargs)


def trace(model: nn.Module, example_inputs) -> fx.GraphModule:
    """``model`` traced by ``torch.fx`` with every node's output shape recorded from ``example_inputs``
    (a tuple of positional tensors, a dict of keyword tensors or one tensor). Submodules that symbolic
    tracing cannot follow are leaves (``gm.meta["fallback_leaves"]``); the inputs of the leaves whose
    effect on the channels is checked are kept in ``gm.meta["leaf_inputs"]``."""
    name = type(model).__name__
    gm, leaves = _symbolic_trace(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(example_inputs, dict):
        args = [example_inputs.get(p.target, p.args[0] if p.args else None) for p in placeholders]
    elif isinstance(example_inputs, (tuple, list)):
        args = list(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args = [example_inputs]
    else:
        raise LeanmlError(f"model {name} has no example inputs to trace its shapes with; pass calibration data")
    probe = {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and _needs_probe(gm.get_submodule(str(n.target)))}
    recorder = _ShapeRecorder(gm, probe)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            recorder.run(*args)
    except Exception as exc:  # noqa: BLE001 - the inputs do not fit the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LeanmlError(
            f"model {name} does not run on its example inputs ({first[:160]}); pass calibration data that fits it"
        ) from None
    finally:
        model.train(was_training)
    gm.meta["fallback_leaves"] = sorted(leaves)
    gm.meta["leaf_inputs"] = recorder.inputs
    return gm


def _close(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and bool((a.double() - b.double()).abs().max() <= 1e-4 * (1 + b.double().abs().max()))
    )


def _probe_inputs(x: torch.Tensor) -> list[torch.Tensor]:
    """The recorded input and seeded noise of its shape (values of both signs, no structure)."""
    g = torch.Generator().manual_seed(0)
    return [x, torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype).to(x.device)]


def _subsets(n: int) -> list[torch.Tensor]:
    """Two seeded random halves of ``n`` channels (sorted positions)."""
    g = torch.Generator().manual_seed(1)
    k = max(1, n // 2)
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(2)]


@torch.no_grad()
def _channelwise(mod: nn.Module, args: tuple, kwargs: dict, dim: int) -> bool:
    """``mod`` (no parameters) acts on every channel along ``dim`` of its one tensor input alone: on a
    random half of the channels it gives the same half of its output on all of them."""
    x, rest = args[0], args[1:]
    if not isinstance(x, torch.Tensor) or x.ndim <= dim or x.shape[dim] < 2 or not x.is_floating_point():
        return False
    if any(isinstance(a, torch.Tensor) for a in (*rest, *kwargs.values())):
        return False
    mod = copy.deepcopy(mod).eval()  # a module that caches something on its first call keeps it to itself
    try:
        for inp in _probe_inputs(x):
            full = mod(inp, *rest, **kwargs)
            if not isinstance(full, torch.Tensor) or full.ndim != x.ndim or full.shape[dim] != x.shape[dim]:
                return False
            for idx in _subsets(x.shape[dim]):
                part = mod(inp.index_select(dim, idx.to(inp.device)), *rest, **kwargs)
                if not _close(part, full.index_select(dim, idx.to(full.device))):
                    return False
    except Exception:  # noqa: BLE001 - a module that cannot run on fewer channels is not channel-wise
        return False
    return True


@torch.no_grad()
def _follows_weight(mod: nn.Module, args: tuple, kwargs: dict, dense: bool) -> bool:
    """A Conv/BatchNorm/Linear subclass with its own forward behaves as its base layer under the pruning
    surgery: with output rows kept, its output is those channels of the original's; with input columns
    kept, it equals the original on inputs whose other channels are zero; a per-channel layer (BatchNorm,
    depthwise conv) on kept channels gives those channels of the original's output."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or len(args) > 1 or kwargs:
        return False
    dim = x.ndim - 1 if isinstance(mod, nn.Linear) else 1
    base = copy.deepcopy(mod).eval()
    try:
        for inp in _probe_inputs(x):
            full = base(inp)
            if not isinstance(full, torch.Tensor):
                return False
            if dense:
                for idx in _subsets(full.shape[dim]):
                    rows = copy.deepcopy(base)
                    keep_rows(rows, idx.tolist())
                    if not _close(rows(inp), full.index_select(dim, idx.to(full.device))):
                        return False
                for idx in _subsets(inp.shape[dim]):
                    cols = copy.deepcopy(base)
                    keep_columns(cols, idx.tolist())
                    masked = torch.zeros_like(inp).index_copy(dim, idx.to(inp.device), inp.index_select(dim, idx.to(inp.device)))
                    if not _close(cols(inp.index_select(dim, idx.to(inp.device))), base(masked)):
                        return False
            else:
                for idx in _subsets(inp.shape[dim]):
                    chans = copy.deepcopy(base)
                    keep_channels(chans, idx.tolist())
                    part = chans(inp.index_select(dim, idx.to(inp.device)))
                    if not _close(part, full.index_select(dim, idx.to(full.device))):
                        return False
    except Exception:  # noqa: BLE001 - the sliced copy does not run: its forward does not follow the weight
        return False
    return True


class _Analysis:
    """One pass over the traced graph (see the module docstring for the rules)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.classes = _Classes()
        self.env: dict[fx.Node, _Chan | None] = {}
        self.fallback = set(gm.meta.get("fallback_leaves", ()))
        self.checked: dict[str, bool] = {}

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
        if _own_forward(mod) and not self.follows_weight(name, mod):
            self.opaque(node, f"{type(mod).__name__} {name!r} has its own forward, which does not follow its sliced weight")
        elif isinstance(mod, CONV):
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
            self.leaf(node, name, mod, c)

    def follows_weight(self, name: str, mod: nn.Module) -> bool:
        """A Conv/BatchNorm/Linear subclass with its own forward passes the surgery check (once per layer)."""
        if name not in self.checked:
            recorded = self.gm.meta.get("leaf_inputs", {}).get(name)
            dense = isinstance(mod, nn.Linear) or (isinstance(mod, CONV) and mod.groups == 1)
            self.checked[name] = recorded is not None and _follows_weight(mod, *recorded, dense=dense)
        return self.checked[name]

    def leaf(self, node: fx.Node, name: str, mod: nn.Module, c: _Chan | None) -> None:
        """A module the analysis does not know: the channels pass when it is parameter-free and checked
        to act on each channel alone (padding, upsampling); otherwise it is a boundary."""
        kind = type(mod).__name__
        untraced = " (a leaf: torch.fx cannot trace its forward)" if name in self.fallback else ""
        if _has_state(mod):
            self.opaque(node, f"{kind} {name!r}{untraced} is not supported by the dependency analysis")
            return
        recorded = self.gm.meta.get("leaf_inputs", {}).get(name)
        shape, src = _shape(node), _shape(node.args[0]) if node.args else None
        if (
            c is not None
            and c.chunk == 1
            and recorded is not None
            and shape is not None
            and src is not None
            and len(shape) == len(src)
            and shape[c.dim] == src[c.dim]
            and _channelwise(mod, *recorded, dim=c.dim)
        ):
            self.env[node] = c
            return
        self.opaque(node, f"{kind} {name!r}{untraced} does not act on each channel alone")

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
        elif not is_method and target is F.pad:
            self.pad(node, c, label)
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

    def pad(self, node: fx.Node, c: _Chan | None, label: str) -> None:
        """``F.pad`` keeps the channels when it pads only axes after the channel axis."""
        widths = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
        src = _shape(node.args[0]) if node.args else None
        if c is None or src is None or not isinstance(widths, (list, tuple)) or c.chunk != 1:
            self.opaque(node, f"{label} pads them")
            return
        if c.dim >= len(src) - len(widths) // 2:  # the last len(widths) // 2 axes are padded
            self.opaque(node, f"{label} pads the channel axis")
            return
        self.passes(node, c, f"{label} changes them")

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

    def hidden(self) -> tuple[dict[int, str], dict[int, str]]:
        """Modules and parameters inside the leaf modules the analysis does not see into (not a
        Conv/BatchNorm/Linear): id -> the leaf's name."""
        mods, params = {}, {}
        for node in self.gm.graph.nodes:
            if node.op != "call_module":
                continue
            leaf = self.gm.get_submodule(str(node.target))
            if isinstance(leaf, _LAYERS):
                continue
            for sub in leaf.modules():
                mods.setdefault(id(sub), str(node.target))
            for p in leaf.parameters():
                params.setdefault(id(p), str(node.target))
        return mods, params

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
        mods, params = self.hidden()
        for g in roots.values():  # a layer (or its weight) also used where the analysis does not look
            for m in g.members:
                layer = self.gm.get_submodule(m.layer)
                inside = mods.get(id(layer)) or next((params[id(p)] for p in layer.parameters() if id(p) in params), None)
                if inside is not None:
                    reason = f"layer {m.layer!r} is also used inside {inside!r}, which the analysis does not see into"
                    if reason not in g.frozen:
                        g.frozen.append(reason)
        out, reported = list(roots.values()), set()
        for node in self.gm.graph.nodes:  # the layers inside such leaves stay whole; say so
            leaf = str(node.target)
            if node.op != "call_module" or leaf in reported or isinstance(self.gm.get_submodule(leaf), _LAYERS):
                continue
            reported.add(leaf)
            why = "torch.fx cannot trace its forward" if leaf in self.fallback else "the analysis does not see into it"
            for sub_name, sub in self.gm.get_submodule(leaf).named_modules():
                if sub_name and isinstance(sub, (*CONV, nn.Linear)):
                    size = sub.out_channels if isinstance(sub, CONV) else sub.out_features
                    out.append(ChannelGroup(size, [Member(f"{leaf}.{sub_name}", OUT)], [f"inside {leaf!r} ({why})"]))
        return out


def channel_groups(model: nn.Module, example_inputs) -> list[ChannelGroup]:
    """Every channel group of ``model`` (see the module docstring): the layers whose channels must be
    removed together, and, for groups that must stay whole, the reasons."""
    return _Analysis(trace(model, example_inputs)).run()
