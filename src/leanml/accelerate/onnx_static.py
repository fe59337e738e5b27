"""Static int8 quantization of an ONNX model in QDQ form, calibrated with leanml's own observers.

The float model is run with ONNX Runtime on the calibration feeds, with the tensors to quantize exposed
as extra outputs; one :mod:`leanml.quantize.observers` observer per tensor gives its uint8 asymmetric
range. Weights are quantized with :mod:`leanml.quantize.primitives` (symmetric int8, per output channel
by default). The written model holds:

* ``QuantizeLinear -> DequantizeLinear`` (uint8) on every quantized activation tensor;
* int8 weight initializers + ``DequantizeLinear`` (``axis`` = the output-channel axis when per channel);
* int32 biases + ``DequantizeLinear`` with ``scale = x_scale * w_scale`` and zero point 0.

ONNX Runtime's QDQ transformer rewrites ``DQ -> op -> Q`` groups into its integer kernels (QLinearConv,
QGemm, QLinearMatMul, QLinearAdd, QLinearGlobalAveragePool, uint8 MaxPool ...), so activations stay uint8
between layers. What is quantized:

* Conv, Gemm (``alpha = beta = 1``, ``transA = 0``, constant B and 1-D C) and MatMul with a constant 2-D
  weight; MatMul of two activations;
* Add of two activations (residual connections), AveragePool, GlobalAveragePool: own output range;
* MaxPool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze on a quantized input: the output reuses the
  input's scale and zero point (the op only moves or selects values), so ORT drops the Q/DQ around them;
* Relu directly after Conv/Gemm/MatMul/Add (the only user of that output): no Q/DQ between the two, the
  Relu's output range (zero point 0) is used, and ORT folds the Relu into the integer kernel.

Graph outputs stay float (the last Gemm becomes QGemm with a float output). Everything else (e.g. an
unfolded BatchNormalization) runs in float on dequantized inputs and is listed under ``float_ops`` in the
report. ``weight_bits`` below 8 stores narrower codes in the int8 container (ORT still runs int8 kernels).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from leanml.errors import LeanmlError
from leanml.quantize.observers import (
    KLObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
)
from leanml.quantize.primitives import MAX_BITS, MIN_BITS, QParams, compute_qparams, quantize

OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
OWN_RANGE_OPS = ("Add", "AveragePool", "GlobalAveragePool")
PASSTHROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
RELU_PRODUCERS = ("Conv", "Gemm", "MatMul", "Add")
MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
ACT_BITS = 8
INT32 = np.iinfo(np.int32)


def _check_args(model_path, calib_feeds, per_channel, observer, weight_bits) -> Path:
    path = Path(model_path)
    if not path.is_file():
        raise LeanmlError(f"ONNX model {str(model_path)!r} does not exist; pass the path of a float .onnx file")
    if observer not in OBSERVERS:
        raise LeanmlError(f"observer {observer!r} is not supported; use one of {tuple(OBSERVERS)}")
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, int) or not MIN_BITS <= weight_bits <= MAX_BITS:
        raise LeanmlError(
            f"weight_bits {weight_bits!r} is not supported; use an integer from {MIN_BITS} to {MAX_BITS} "
            "(codes are stored as int8)"
        )
    if not isinstance(per_channel, bool):
        raise LeanmlError(f"per_channel {per_channel!r} is not a bool; use True or False")
    if calib_feeds is None or isinstance(calib_feeds, Mapping) or not isinstance(calib_feeds, Iterable):
        raise LeanmlError(
            f"calib_feeds of type {type(calib_feeds).__name__} is not supported; pass an iterable of "
            "dicts mapping input names to arrays"
        )
    return path


def _load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise LeanmlError(f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}); pass a float .onnx file") from exc
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise LeanmlError(f"ONNX opset {opset} is too old for per-channel QDQ; export with opset_version >= {MIN_OPSET}")
    return model


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Turn ``Constant`` nodes holding a tensor into initializers so weights look the same either way."""
    keep = []
    for node in graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in attr:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr["value"].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a nicety: unknown types count as float below
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


class _Plan:
    """Which nodes, tensors and weights get quantized (decided on the float graph, before calibration)."""

    def __init__(self, graph: onnx.GraphProto, types: dict[str, int]):
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                self.producer[name] = node
        self.types = types
        self.nodes: dict[int, str] = {}  # id(node) -> kind ("weighted", "matmul2", "own", "pass", "relu")
        self.fused: set[int] = set()  # producers whose Relu follows directly (no Q/DQ on their output)
        self.acts: list[str] = []  # activation tensors with a Q/DQ pair, in graph order
        self.alias: dict[str, str] = {}  # passthrough output -> tensor whose qparams it reuses
        self.weights: dict[int, tuple[str, int | None, str | None]] = {}  # id(node) -> (weight, axis, bias)
        for node in graph.node:
            self._visit(node)

    def _is_float_act(self, name: str) -> bool:
        return bool(name) and name not in self.inits and self.types.get(name, TensorProto.FLOAT) == TensorProto.FLOAT

    def _float_init(self, name: str, ndim: int | None = None) -> bool:
        t = self.inits.get(name)
        return t is not None and t.data_type == TensorProto.FLOAT and (ndim is None or len(t.dims) == ndim)

    def _add_act(self, name: str) -> None:
        if name not in self.acts:
            self.acts.append(name)

    def _weight_spec(self, node: onnx.NodeProto) -> tuple[str, int, str | None] | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input)
        if node.op_type == "Conv" and len(ins) >= 2 and self._is_float_act(ins[0]) and self._float_init(ins[1]):
            bias = ins[2] if len(ins) > 2 and ins[2] else None
            if bias is None or self._float_init(bias, 1):
                return ins[1], 0, bias
        if node.op_type == "Gemm" and len(ins) >= 2 and self._is_float_act(ins[0]) and self._float_init(ins[1], 2):
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                return None
            axis = 0 if attrs.get("transB", 0) else 1
            n_out = self.inits[ins[1]].dims[axis]
            bias = ins[2] if len(ins) > 2 and ins[2] else None
            if bias is None or (self._float_init(bias, 1) and self.inits[bias].dims[0] == n_out):
                return ins[1], axis, bias
        if node.op_type == "MatMul" and self._is_float_act(ins[0]) and self._float_init(ins[1], 2):
            return ins[1], 1, None
        return None

    def _visit(self, node: onnx.NodeProto) -> None:
        op, ins = node.op_type, list(node.input)
        if node.domain not in ("", "ai.onnx") or not node.output:
            return
        kind = None
        if op in WEIGHTED_OPS and (spec := self._weight_spec(node)) is not None:
            self.weights[id(node)] = spec
            self._add_act(ins[0])
            kind = "weighted"
        elif op == "MatMul" and all(self._is_float_act(i) for i in ins):
            for i in ins:
                self._add_act(i)
            kind = "matmul2"
        elif op in OWN_RANGE_OPS and all(self._is_float_act(i) for i in ins) and len(node.output) == 1:
            if op == "Add" and len(ins) != 2:
                return
            for i in ins:
                self._add_act(i)
            kind = "own"
        elif op in PASSTHROUGH_OPS and ins[0] in self.acts and len(node.output) == 1:
            kind = "pass"
            self.alias[node.output[0]] = ins[0]
        elif op == "Relu" and self._is_float_act(ins[0]):
            prev = self.producer.get(ins[0])
            if (
                prev is not None
                and self.nodes.get(id(prev)) in ("weighted", "matmul2", "own")
                and prev.op_type in RELU_PRODUCERS
                and len(self.consumers.get(ins[0], [])) == 1
                and ins[0] not in self.outputs
            ):
                self.fused.add(id(prev))
                self.acts.remove(ins[0])
                kind = "relu"
            elif ins[0] in self.acts:
                kind = "relu"
        if kind is None:
            return
        self.nodes[id(node)] = kind
        out = node.output[0]
        if out not in self.outputs:
            self._add_act(out)

    def calibrated(self) -> list[str]:
        """Tensors whose range is observed (passthrough outputs reuse their input's range)."""
        return [t for t in self.acts if t not in self.alias]

    def root(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name


def _feeds(calib_feeds: Iterable, inputs: dict[str, int]):
    for i, feed in enumerate(calib_feeds):
        if not isinstance(feed, Mapping):
            raise LeanmlError(f"calibration item {i} is a {type(feed).__name__}; each item must be a dict input name -> array")
        unknown = sorted(set(feed) - set(inputs))
        missing = sorted(set(inputs) - set(feed))
        if unknown or missing:
            raise LeanmlError(f"calibration item {i} has inputs {sorted(feed)}; the model takes {sorted(inputs)}")
        out = {}
        for name, value in feed.items():
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            elem = inputs[name]
            out[name] = arr.astype(helper.tensor_dtype_to_np_dtype(elem), copy=False) if elem else arr
        yield out


def _calibrate(model: onnx.ModelProto, tensors: list[str], calib_feeds: Iterable, observer: str) -> tuple[dict, int]:
    """Observers for ``tensors``, fed by running the float model on every calibration item."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in existing)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not busy-wait
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.name not in inits}
    observers: dict[str, Observer] = {t: OBSERVERS[observer]() for t in tensors}
    count = 0
    for feed in _feeds(calib_feeds, inputs):
        values = sess.run(tensors, feed)
        for name, value in zip(tensors, values, strict=True):
            observers[name].observe(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
        count += 1
    if count == 0:
        raise LeanmlError("calib_feeds is empty; pass at least one dict of input arrays to calibrate activation ranges")
    return observers, count


def _scalar_init(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def quantize_weight(w: np.ndarray, bits: int, axis: int | None) -> tuple[np.ndarray, QParams]:
    """Symmetric int8 codes of ``w`` and their QParams (per channel along ``axis``, per tensor if None)."""
    wt = torch.from_numpy(np.array(w, dtype=np.float32))
    if axis is None:
        qp = compute_qparams(wt.min(), wt.max(), bits, symmetric=True)
    else:
        dims = [d for d in range(wt.dim()) if d != axis]
        qp = compute_qparams(wt.amin(dims, keepdim=True), wt.amax(dims, keepdim=True), bits, symmetric=True, axis=axis)
    return quantize(wt, qp).numpy().astype(np.int8), qp


def quantize_static_onnx(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib_feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    per_channel: bool = True,
    observer: str = "minmax",
    weight_bits: int = 8,
) -> dict:
    """Write a static int8 QDQ version of the float ONNX model at ``model_path`` to ``out_path``.

    ``calib_feeds``: an iterable of dicts input name -> array (numpy or torch), run one at a time.
    ``observer``: one of ``minmax, ema, percentile, mse, kl`` for the uint8 activation ranges.
    ``per_channel``: int8 weight scale per output channel (else one per tensor).
    Returns a report: quantized ops by type, Relus folded, ops left in float, calibration items, etc.
    """
    path = _check_args(model_path, calib_feeds, per_channel, observer, weight_bits)
    model = _load(path)
    graph = model.graph
    _constants_to_initializers(graph)
    plan = _Plan(graph, _elem_types(model))
    if not plan.nodes:
        raise LeanmlError(
            f"{str(path)!r} has no float op that can be quantized; supported: "
            f"{', '.join(WEIGHTED_OPS + OWN_RANGE_OPS + PASSTHROUGH_OPS)}, Relu"
        )
    observers, n_items = _calibrate(model, plan.calibrated(), calib_feeds, observer)
    act_qp: dict[str, QParams] = {}
    for name in plan.acts:
        obs = observers[plan.root(name)]
        act_qp[name] = obs.qparams(ACT_BITS, symmetric=False)

    new_inits: list[onnx.TensorProto] = []
    dq_name = {t: f"{t}_DequantizeLinear_Output" for t in plan.acts}

    def qdq_nodes(t: str) -> list[onnx.NodeProto]:
        qp = act_qp[t]
        scale, zero = f"{t}_scale", f"{t}_zero_point"
        new_inits.append(_scalar_init(scale, qp.scale.item(), np.float32))
        new_inits.append(_scalar_init(zero, qp.zero_point.item(), np.uint8))
        return [
            helper.make_node("QuantizeLinear", [t, scale, zero], [f"{t}_QuantizeLinear_Output"], name=f"{t}_QuantizeLinear"),
            helper.make_node(
                "DequantizeLinear", [f"{t}_QuantizeLinear_Output", scale, zero], [dq_name[t]], name=f"{t}_DequantizeLinear"
            ),
        ]

    weight_done: dict[tuple[str, int | None], tuple[str, np.ndarray]] = {}
    replaced_inits: set[str] = set()
    bias_clipped = 0

    def weight_nodes(w_name: str, axis: int) -> tuple[list[onnx.NodeProto], str, np.ndarray]:
        """DQ node (once per weight and axis) and the float32 weight scale per output channel (or scalar)."""
        key = (w_name, axis if per_channel else None)
        if key in weight_done:
            return [], *weight_done[key]
        tag = f"{w_name}_axis{axis}" if any(w == w_name for w, _ in weight_done) else w_name
        codes, qp = quantize_weight(numpy_helper.to_array(plan.inits[w_name]), weight_bits, key[1])
        scale = qp.scale.reshape(-1).numpy().astype(np.float32) if per_channel else np.float32(qp.scale.item())
        q, s, z, out = f"{tag}_quantized", f"{tag}_scale", f"{tag}_zero_point", f"{tag}_DequantizeLinear_Output"
        new_inits.extend(
            [
                numpy_helper.from_array(codes, q),
                numpy_helper.from_array(np.asarray(scale, np.float32), s),
                numpy_helper.from_array(np.zeros_like(np.asarray(scale), dtype=np.int8), z),
            ]
        )
        kwargs = {"axis": axis} if per_channel else {}
        replaced_inits.add(w_name)
        weight_done[key] = (out, scale)
        return [helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{tag}_DequantizeLinear", **kwargs)], out, scale

    def bias_nodes(node: onnx.NodeProto, b_name: str, x_scale: float, w_scale: np.ndarray) -> tuple[list, str]:
        nonlocal bias_clipped
        b = numpy_helper.to_array(plan.inits[b_name]).astype(np.float64)
        b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
        b_scale_full = np.broadcast_to(b_scale, b.shape).astype(np.float64)
        codes = np.round(b / b_scale_full)
        bias_clipped += int(((codes < INT32.min) | (codes > INT32.max)).sum())
        codes = np.clip(codes, INT32.min, INT32.max).astype(np.int32)
        tag = f"{b_name}_{node.name or node.output[0]}"
        q, s, z, out = f"{tag}_quantized", f"{tag}_scale", f"{tag}_zero_point", f"{tag}_DequantizeLinear_Output"
        new_inits.extend(
            [
                numpy_helper.from_array(codes, q),
                numpy_helper.from_array(np.asarray(b_scale, np.float32), s),
                numpy_helper.from_array(np.zeros(b_scale.shape, np.int32), z),
            ]
        )
        kwargs = {"axis": 0} if b_scale.ndim else {}
        replaced_inits.add(b_name)
        return [helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{tag}_DequantizeLinear", **kwargs)], out

    new_nodes: list[onnx.NodeProto] = []
    graph_inputs = [i.name for i in graph.input]
    for t in plan.acts:
        if t in graph_inputs:
            new_nodes.extend(qdq_nodes(t))
    ops = Counter()
    floats = Counter()
    for node in graph.node:
        kind = plan.nodes.get(id(node))
        if kind == "weighted":
            w_name, axis, b_name = plan.weights[id(node)]
            dq_w, w_out, w_scale = weight_nodes(w_name, axis)
            new_nodes.extend(dq_w)
            node.input[1] = w_out
            if b_name is not None:
                dq_b, b_out = bias_nodes(node, b_name, act_qp[node.input[0]].scale.item(), w_scale)
                new_nodes.extend(dq_b)
                node.input[2] = b_out
        for i, name in enumerate(node.input):
            if name in dq_name:
                node.input[i] = dq_name[name]
        new_nodes.append(node)
        if kind is None:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                floats[node.op_type] += 1
        else:
            ops[node.op_type] += 1
        for out in node.output:
            if out in dq_name:
                new_nodes.extend(qdq_nodes(out))

    still_used = {name for n in new_nodes for name in n.input}
    kept = [t for t in graph.initializer if t.name not in replaced_inits or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    gone = replaced_inits - still_used  # old IR versions also list initializers as graph inputs
    inputs = [i for i in graph.input if i.name not in gone]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _save_atomic(model, Path(out_path))
    return {
        "out_path": str(out_path),
        "ops_quantized": dict(sorted(ops.items())),
        "relu_fused": len(plan.fused),
        "float_ops": dict(sorted(floats.items())),
        "activations_quantized": len(plan.acts),
        "weights_quantized": len(weight_done),
        "calibration_items": n_items,
        "observer": observer,
        "per_channel": per_channel,
        "weight_bits": weight_bits,
        "bias_clipped": bias_clipped,
    }


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


def optimized_op_counts(model_path: str | os.PathLike, threads: int = 1) -> dict[str, int]:
    """Op types (with domain prefix for contrib ops) in the graph ONNX Runtime actually runs after its
    full optimization (``SessionOptions.optimized_model_filepath``), e.g. ``{"com.microsoft.QLinearConv": 20}``
    for QLinearConv in NHWC layout, or ``{"QLinearConv": 20}``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    names = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in optimized.graph.node)
    return dict(sorted(names.items()))


__all__ = ["optimized_op_counts", "quantize_static_onnx", "quantize_weight"]
