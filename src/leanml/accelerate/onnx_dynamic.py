"""Dynamic int8 quantization of an ONNX graph with leanml's own weight quantization.

Weights are quantized once, offline, with :mod:`leanml.quantize.primitives` (symmetric, zero point 0,
one scale per output column of ``B`` when ``per_channel``, else one per tensor); activations are
quantized at run time by ONNX Runtime's kernels (uint8, asymmetric, one scale per tensor per call).
The graph is rewritten onto ONNX Runtime's integer contrib kernels:

* ``MatMul`` with a constant 2-D float ``B`` (plus the ``Add`` of a constant 1-D bias right after it,
  when that Add is the MatMul's only consumer), and ``Gemm`` (``alpha = beta = 1``, ``transA = 0``,
  constant ``B``, 1-D or no ``C``) become ``com.microsoft.DynamicQuantizeMatMul(A, B_int8, b_scale,
  b_zero_point, bias)``: ``A`` is quantized inside the kernel, the int32 accumulator is scaled by
  ``a_scale * b_scale[column]`` and the bias is added in float;
* the fused ``com.microsoft.Attention`` of :func:`leanml.accelerate.ort_optimize.optimize_onnx` (packed
  QKV weight ``(hidden, 3 * hidden)``) becomes ``DynamicQuantizeLinear`` + ``com.microsoft.QAttention``
  (uint8 input, int8 weight with per-column or per-tensor scale, float bias, same ``mask_index``; the
  CPU kernel takes per-column weight scales), unless ``attention="float"`` keeps it float.

The zero point input is one int8 scalar 0 shared by all weights: per-column zero points (all 0 here)
would send MLAS down its slower per-column zero-point path. ``weight_bits`` is 8, or 7 for
"reduce range" codes in ``[-64, 63]``: CPUs without VNNI multiply uint8 x int8 with ``vpmaddubsw``,
whose int16 pair sums can saturate on full-range weights. Everything else stays float and is counted
under ``ops_kept_float`` (weighted ops only).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from leanml.errors import LeanmlError
from leanml.quantize.primitives import QParams, compute_qparams, quantize

MS_DOMAIN = "com.microsoft"
WEIGHT_BITS = (8, 7)
ATTENTION_MODES = ("qattention", "float")
QATTENTION_ATTRS = ("num_heads", "unidirectional", "mask_filter_value", "scale", "do_rotary", "past_present_share_buffer")
WEIGHTED_OPS = ("MatMul", "Gemm", "Attention", "Conv")


def quantize_weight(w: np.ndarray, bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray, QParams]:
    """Symmetric codes (int8) of a ``(K, N)`` weight, its float32 scale (``(N,)`` per column, else a
    scalar) and the :class:`~leanml.quantize.primitives.QParams` they come from."""
    wt = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    if per_channel:
        qp = compute_qparams(wt.amin(0, keepdim=True), wt.amax(0, keepdim=True), bits, symmetric=True, axis=1)
        scale = qp.scale.reshape(-1).numpy().astype(np.float32)
    else:
        qp = compute_qparams(wt.min(), wt.max(), bits, symmetric=True)
        scale = np.asarray(qp.scale.item(), dtype=np.float32)
    return quantize(wt, qp).numpy().astype(np.int8), scale, qp


def _check_args(path, per_channel, weight_bits, attention, exclude) -> Path:
    p = Path(path)
    if not p.is_file():
        raise LeanmlError(f"ONNX model {str(path)!r} does not exist; pass the path of a float .onnx file")
    if isinstance(weight_bits, bool) or weight_bits not in WEIGHT_BITS:
        raise LeanmlError(
            f"weight_bits {weight_bits!r} is not supported; use 8, or 7 for reduce-range codes "
            "(ONNX Runtime's dynamic kernels take int8 weights)"
        )
    if not isinstance(per_channel, bool):
        raise LeanmlError(f"per_channel {per_channel!r} is not a bool; use True or False")
    if attention not in ATTENTION_MODES:
        raise LeanmlError(f"attention {attention!r} is not supported; use one of {', '.join(ATTENTION_MODES)}")
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise LeanmlError(f"exclude {exclude!r} is not supported; pass a tuple of node or tensor names")
    return p


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise LeanmlError(f"'{path}' is not a readable ONNX model ({type(exc).__name__})") from None


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Float ``Constant`` nodes become initializers, so constant weights are found in one place."""
    keep = []
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
            and node.attribute[0].t.data_type == TensorProto.FLOAT
        ):
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_onnx(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


class _Rewriter:
    """Builds the replacement nodes and int8 initializers for one graph."""

    def __init__(self, graph: onnx.GraphProto, bits: int, per_channel: bool):
        self.graph, self.bits, self.per_channel = graph, bits, per_channel
        self.inits = {t.name: t for t in graph.initializer}
        # the TorchScript exporter shares equal initializers (e.g. all-zero biases) through Identity nodes
        self.alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and _is_onnx(n)}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.used = set(self.inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        self.new_inits: list[onnx.TensorProto] = []
        self.weights: dict[tuple[str, bool], tuple[str, str]] = {}
        self.zero_point = ""
        self.bias_folded = 0

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def resolve(self, name: str) -> str:
        """The initializer behind a chain of Identity nodes (or ``name`` itself)."""
        seen = 0
        while name not in self.inits and name in self.alias and seen < 100:
            name, seen = self.alias[name], seen + 1
        return name

    def float_const(self, name: str, ndim: int) -> np.ndarray | None:
        t = self.inits.get(self.resolve(name))
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != ndim:
            return None
        return numpy_helper.to_array(t)

    def weight(self, name: str, w: np.ndarray, transpose: bool = False) -> tuple[str, str, str]:
        """Names of the int8 codes, scale and (shared scalar) zero point of weight ``name`` as ``(K, N)``."""
        key = (name, transpose)
        if key not in self.weights:
            codes, scale, _ = quantize_weight(w.T if transpose else w, self.bits, self.per_channel)
            q, s = self.fresh(f"{name}_int8"), self.fresh(f"{name}_scale")
            self.new_inits += [numpy_helper.from_array(codes, q), numpy_helper.from_array(scale, s)]
            self.weights[key] = (q, s)
        if not self.zero_point:
            self.zero_point = self.fresh("int8_zero_point")
            self.new_inits.append(numpy_helper.from_array(np.zeros((), np.int8), self.zero_point))
        return (*self.weights[key], self.zero_point)

    def matmul(self, node: onnx.NodeProto, excluded: set[str]) -> tuple[list[onnx.NodeProto], onnx.NodeProto | None]:
        """DynamicQuantizeMatMul for a MatMul (with the bias Add after it folded in), and the Add it absorbed."""
        w = self.float_const(node.input[1], 2)
        if w is None:
            return [], None
        bias, out, absorbed = "", node.output[0], None
        users = self.consumers.get(out, [])
        if (
            len(users) == 1
            and users[0].op_type == "Add"
            and _is_onnx(users[0])
            and out not in self.outputs
            and (users[0].name not in excluded and users[0].output[0] not in excluded)
        ):
            add = users[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = self.float_const(other, 1)
            if b is not None and b.shape[0] == w.shape[1]:
                bias, out, absorbed = self.resolve(other), add.output[0], add
                self.bias_folded += 1
        q, s, z = self.weight(self.resolve(node.input[1]), w)
        tag = node.name or node.output[0]
        return [
            helper.make_node(
                "DynamicQuantizeMatMul",
                [node.input[0], q, s, z, bias],
                [out],
                name=self.fresh(f"{tag}_DynamicQuantizeMatMul"),
                domain=MS_DOMAIN,
            )
        ], absorbed

    def gemm(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        w = self.float_const(node.input[1], 2)
        c = node.input[2] if len(node.input) > 2 else ""
        b = self.float_const(c, 1) if c else None
        if w is None or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "transA", 0) != 0:
            return []
        if c and (b is None or _attr(node, "beta", 1.0) != 1.0):
            return []
        trans_b = bool(_attr(node, "transB", 0))
        if b is not None and b.shape[0] != (w.shape[0] if trans_b else w.shape[1]):
            return []
        q, s, z = self.weight(self.resolve(node.input[1]), w, transpose=trans_b)
        tag = node.name or node.output[0]
        return [
            helper.make_node(
                "DynamicQuantizeMatMul",
                [node.input[0], q, s, z, self.resolve(c)],
                [node.output[0]],
                name=self.fresh(f"{tag}_DynamicQuantizeMatMul"),
                domain=MS_DOMAIN,
            )
        ]

    def attention(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """DynamicQuantizeLinear + QAttention for a fused Attention with a packed constant QKV weight."""
        w = self.float_const(node.input[1], 2)
        unsupported = [a.name for a in node.attribute if a.name not in QATTENTION_ATTRS]
        if w is None or len(node.input) > 5 or unsupported or w.shape[1] % 3:
            return []
        q, s, z = self.weight(self.resolve(node.input[1]), w)
        tag = node.name or node.output[0]
        xq, xs, xz = (self.fresh(f"{tag}_input_{k}") for k in ("quantized", "scale", "zero_point"))
        dql = helper.make_node(
            "DynamicQuantizeLinear", [node.input[0]], [xq, xs, xz], name=self.fresh(f"{tag}_DynamicQuantizeLinear")
        )
        mask = node.input[3] if len(node.input) > 3 else ""
        past = node.input[4] if len(node.input) > 4 else ""
        inputs = [xq, q, node.input[2], xs, s, mask, xz, z, past]
        while not inputs[-1]:
            inputs.pop()
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return [
            dql,
            helper.make_node(
                "QAttention", inputs, list(node.output), name=self.fresh(f"{tag}_QAttention"), domain=MS_DOMAIN, **attrs
            ),
        ]


def quantize_dynamic_onnx(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    per_channel: bool = True,
    weight_bits: int = 8,
    attention: str = "qattention",
    exclude: tuple[str, ...] | list[str] = (),
) -> dict:
    """Write a dynamic-int8 version of the float ONNX model at ``path`` to ``out_path``; return a report.

    ``per_channel``: one weight scale per output column (else one per tensor). ``weight_bits``: 8, or
    7 (reduce range). ``attention``: ``"qattention"`` turns fused ``Attention`` ops into ``QAttention``,
    ``"float"`` keeps them float. ``exclude``: node names (or their first output's name) kept float.
    The report gives the ops quantized and the weighted ops kept float, by type, the biases folded into
    the int8 MatMuls and the weight bytes before and after. The file is written atomically.
    """
    src = _check_args(path, per_channel, weight_bits, attention, exclude)
    model = _load(src)
    graph = model.graph
    _constants_to_initializers(graph)
    rw = _Rewriter(graph, weight_bits, per_channel)
    excluded = set(exclude)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    absorbed: set[int] = set()
    ops = Counter()
    for node in graph.node:
        if node.name in excluded or (node.output and node.output[0] in excluded) or id(node) in absorbed:
            continue
        new: list[onnx.NodeProto] = []
        if node.op_type == "MatMul" and _is_onnx(node):
            new, add = rw.matmul(node, excluded)
            if add is not None:
                absorbed.add(id(add))
        elif node.op_type == "Gemm" and _is_onnx(node):
            new = rw.gemm(node)
        elif node.op_type == "Attention" and node.domain == MS_DOMAIN and attention == "qattention":
            new = rw.attention(node)
        if new:
            replaced[id(node)] = new
            ops[node.op_type] += 1
    if not ops:
        raise LeanmlError(f"'{src}' has no MatMul/Gemm with a constant float weight and no fused Attention to quantize")

    nodes: list[onnx.NodeProto] = []
    floats = Counter()
    for node in graph.node:
        if id(node) in absorbed:
            continue
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
            continue
        nodes.append(node)
        if node.op_type in WEIGHTED_OPS:
            floats[node.op_type] += 1
    nodes = _drop_dead_identities(nodes, rw.outputs)
    bytes_before = _init_bytes(graph.initializer)
    still_used = {name for n in nodes for name in n.input} | rw.outputs
    kept = [t for t in graph.initializer if t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + rw.new_inits)
    del graph.node[:]
    graph.node.extend(nodes)
    produced = {o for n in nodes for o in n.output} | {i.name for i in graph.input}
    for v in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(v)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.helper.set_model_props(
        model,
        {
            **{p.key: p.value for p in model.metadata_props},
            "leanml.quantized": f"dynamic-int8 w{weight_bits} {'per-channel' if per_channel else 'per-tensor'}",
        },
    )
    _save_atomic(model, Path(out_path))
    return {
        "out_path": str(out_path),
        "ops_quantized": dict(sorted(ops.items())),
        "ops_kept_float": dict(sorted(floats.items())),
        "weights_quantized": len(rw.weights),
        "bias_folded": rw.bias_folded,
        "per_channel": per_channel,
        "weight_bits": weight_bits,
        "attention": attention,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": _init_bytes(graph.initializer),
    }


def _drop_dead_identities(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Remove Identity nodes whose output nothing reads any more (aliases of weights now stored as int8)."""
    while True:
        read = {name for n in nodes for name in n.input} | outputs
        kept = [n for n in nodes if not (n.op_type == "Identity" and _is_onnx(n) and n.output[0] not in read)]
        if len(kept) == len(nodes):
            return nodes
        nodes = kept


def _init_bytes(inits) -> int:
    return int(sum(len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes for t in inits))


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["ATTENTION_MODES", "WEIGHT_BITS", "quantize_dynamic_onnx", "quantize_weight"]
