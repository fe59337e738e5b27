"""Graph fusions for ONNX models with ONNX Runtime's optimizers, and a report of what was fused.

BERT-like encoders (``model_type="bert"`` or detected) go through
``onnxruntime.transformers.optimizer.optimize_model``: the attention subgraph becomes one ``Attention``
op (packed QKV weight), residual add + LayerNorm becomes ``SkipLayerNormalization``, bias + GELU
becomes ``BiasGelu``, the embeddings become ``EmbedLayerNormalization``. The fusion needs the number of
heads and the hidden size; they come from the arguments, else from the ``leanml.*`` metadata that
:func:`leanml.accelerate.onnx_export.export_onnx` writes (from the Hugging Face config), else from the
graph's reshape constants. Other graphs get ONNX Runtime's offline *basic* optimisation (constant
folding, redundant-node elimination, Conv+BatchNorm/Add/Mul folding), which keeps only standard ONNX
ops so the result stays portable to any execution provider.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import numpy_helper

from leanml.errors import LeanmlError

GENERIC = ("generic", "none", "basic")
# fusion name -> FusionOptions switches of onnxruntime.transformers that produce it
FUSIONS = {
    "Attention": ("enable_attention",),
    "SkipLayerNormalization": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
    "BiasGelu": ("enable_bias_gelu",),
    "EmbedLayerNormalization": ("enable_embed_layer_norm",),
    "Gelu": ("enable_gelu",),
    "LayerNormalization": ("enable_layer_norm",),
}
# What the dynamic-int8 CPU graph leaves out (measured with ONNX Runtime 1.32, MiniLM-L6, 50 x 128 tokens, 1 thread):
# SkipLayerNormalization's CPU kernel is a scalar loop with a division per element, 5.5x slower than Add +
# LayerNormalization (14.3 ms vs 2.6 ms on 6400 x 384); BiasGelu is 1.6x slower than Gelu when the bias can be
# folded into the int8 MatMul before it instead.
CPU_INT8_SKIP = ("SkipLayerNormalization", "BiasGelu")
TEXT_ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert", "albert")


def _load(path: str | os.PathLike) -> tuple[Path, onnx.ModelProto]:
    p = Path(path)
    if not p.is_file():
        raise LeanmlError(f"ONNX model {str(path)!r} does not exist; pass the path of an .onnx file")
    try:
        return p, onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise LeanmlError(f"'{p}' is not a readable ONNX model ({type(exc).__name__})") from None


def op_histogram(model: onnx.ModelProto) -> Counter:
    """Op type counts of the main graph (contrib ops prefixed by their domain, e.g. ``com.microsoft.X``)."""
    return Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)


def fusion_report(before: Counter, after: Counter) -> list[str]:
    """Ops that are new or more frequent after optimisation, most frequent first: ``["Attention ×6", ...]``."""
    gained = {op: after[op] - before.get(op, 0) for op in after if after[op] > before.get(op, 0)}
    return [f"{op.removeprefix('com.microsoft.')} ×{n}" for op, n in sorted(gained.items(), key=lambda kv: (-kv[1], kv[0]))]


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key[len("leanml.") :]: p.value for p in model.metadata_props if p.key.startswith("leanml.")}


def _const_ints(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Integer constants (initializers and Constant nodes) by output name."""
    out: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and len(init.dims) <= 1:
            out[init.name] = [int(v) for v in numpy_helper.to_array(init).reshape(-1)]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            arr = numpy_helper.to_array(node.attribute[0].t)
            if arr.dtype.kind == "i" and arr.ndim <= 1:
                out[node.output[0]] = [int(v) for v in arr.reshape(-1)]
    return out


def detect_heads(model: onnx.ModelProto) -> tuple[int, int]:
    """(num_heads, hidden_size) read off a traced encoder graph, or (0, 0).

    The hidden size is the length of the LayerNormalization scale; a head split is a Reshape to
    ``(batch, seq, heads, head_size)`` whose last two entries are constants (``heads`` may be -1).
    """
    inits = {i.name: i for i in model.graph.initializer}
    hidden = 0
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization") and len(node.input) > 1:
            scale = inits.get(node.input[1] if node.op_type == "LayerNormalization" else node.input[2])
            if scale is not None and len(scale.dims) == 1:
                hidden = int(scale.dims[0])
                break
    if not hidden:
        return 0, 0
    consts = _const_ints(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    votes: Counter = Counter()
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = consts.get(node.input[1])
        if shape is None:
            concat = producers.get(node.input[1])
            if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
                continue
            tail = [consts.get(name) for name in concat.input[2:]]
            if any(t is None or len(t) != 1 for t in tail):
                continue
            shape = [0, 0, tail[0][0], tail[1][0]]
        if len(shape) != 4:
            continue
        heads, size = shape[2], shape[3]
        if size > 0 and hidden % size == 0 and (heads == -1 or heads * size == hidden) and size < hidden:
            votes[hidden // size] += 1
    return (votes.most_common(1)[0][0], hidden) if votes else (0, hidden)


def _looks_like_encoder(model: onnx.ModelProto) -> bool:
    ops = op_histogram(model)
    int_inputs = [
        i for i in model.graph.input if i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    ]
    has_norm = ops.get("LayerNormalization", 0) > 0 or ops.get("ReduceMean", 0) > 0
    return bool(int_inputs) and ops.get("Softmax", 0) > 0 and has_norm and ops.get("MatMul", 0) > 0


@contextlib.contextmanager
def _quiet_ort_optimizer() -> Iterator[None]:
    """ORT's fusion scripts log at INFO/WARNING through the standard logging module."""
    names = ["onnxruntime.transformers", "fusion_base", "onnx_model", "fusion_utils"]
    loggers = [logging.getLogger(n) for n in names] + [
        logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("onnxruntime.transformers")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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


def _offline_basic(src: Path) -> onnx.ModelProto:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise LeanmlError(f"ONNX Runtime cannot load '{src}': {str(exc).strip().splitlines()[0]}") from None
        return onnx.load(opts.optimized_model_filepath)


def optimize_onnx(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    model_type: str | None = None,
    num_heads: int = 0,
    hidden_size: int = 0,
    skip: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """Write a fused version of the ONNX model at ``path`` to ``out_path``; return the fusions applied.

    ``model_type``: an ONNX Runtime transformer type (``"bert"``, ``"vit"``, ``"bart"``, ...) for its
    fusion scripts, ``"generic"`` for ONNX Runtime's basic offline optimisation, or None to decide from
    the graph (exported text encoders are optimised as ``"bert"``). ``num_heads``/``hidden_size``: 0 =
    from the export metadata or the graph. ``skip``: transformer fusions to leave out (names of
    :data:`FUSIONS`; :data:`CPU_INT8_SKIP` before :func:`leanml.accelerate.onnx_dynamic.quantize_dynamic_onnx`).
    When ``SkipLayerNormalization`` is skipped, each residual ``Add`` feeding a ``LayerNormalization`` is
    written as the equivalent two-input ``Sum``, so that ONNX Runtime's own session-time
    ``SkipLayerNormFusion`` does not fuse it back.
    Returns e.g. ``["SkipLayerNormalization ×12", "Attention ×6"]`` (op types that are new or more
    frequent afterwards). The file is written atomically.
    """
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    src, model = _load(path)
    for name, value in (("num_heads", num_heads), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LeanmlError(f"{name} {value!r} is not supported; use a positive integer, or 0 to detect it")
    if isinstance(skip, str) or any(s not in FUSIONS for s in skip):
        raise LeanmlError(f"skip {skip!r} is not supported; use a tuple of fusion names from {', '.join(FUSIONS)}")
    meta = _metadata(model)
    if model_type is None:
        hf_type = meta.get("model_type", "")
        model_type = (
            "bert"
            if hf_type in TEXT_ENCODERS or (not hf_type and _looks_like_encoder(model))
            else (hf_type if hf_type in MODEL_TYPES else "generic")
        )
    if model_type not in MODEL_TYPES and model_type not in GENERIC:
        raise LeanmlError(f"model_type {model_type!r} is not supported; use one of {', '.join(GENERIC + tuple(MODEL_TYPES))}")
    before = op_histogram(model)
    if model_type in GENERIC:
        optimized = _offline_basic(src)
    else:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        options = FusionOptions(model_type)
        for fusion in skip:
            for switch in FUSIONS[fusion]:
                setattr(options, switch, False)
        if not num_heads and meta.get("num_heads", "").isdigit():
            num_heads = int(meta["num_heads"])
        if not hidden_size and meta.get("hidden_size", "").isdigit():
            hidden_size = int(meta["hidden_size"])
        if not (num_heads and hidden_size):
            heads, hidden = detect_heads(model)
            num_heads, hidden_size = num_heads or heads, hidden_size or hidden
        with _quiet_ort_optimizer():
            try:
                fused = optimize_model(
                    model,
                    model_type=model_type,
                    num_heads=num_heads,
                    hidden_size=hidden_size,
                    optimization_options=options,
                    opt_level=0,
                    use_gpu=False,
                )
            except Exception as exc:  # noqa: BLE001 - the fusion scripts raise many types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise LeanmlError(f"ONNX Runtime's {model_type} optimizer failed on '{src}': {first}") from None
        optimized = fused.model
        if "SkipLayerNormalization" in skip:
            protect_layer_norm_adds(optimized)
        domains = {n.domain for n in optimized.graph.node if n.domain not in ("", "ai.onnx")}
        imported = {o.domain for o in optimized.opset_import}
        optimized.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in sorted(domains - imported))
        onnx.helper.set_model_props(optimized, {**{p.key: p.value for p in model.metadata_props}, "leanml.optimized": model_type})
    _save_atomic(optimized, Path(out_path))
    return fusion_report(before, op_histogram(optimized))


def protect_layer_norm_adds(model: onnx.ModelProto) -> int:
    """Rewrite each ``Add`` of two computed tensors whose only consumer is a ``LayerNormalization`` as ``Sum``.

    Same values (``Sum`` of two same-shape tensors is ``Add``); ONNX Runtime's ``SkipLayerNormFusion``
    only matches ``Add``, so the pair keeps the fast ``LayerNormalization`` kernel. Returns how many.
    """
    constant = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        after = users.get(node.output[0], [])
        if (
            (set(node.input) & constant)
            or node.output[0] in outputs
            or len(after) != 1
            or (after[0].op_type != "LayerNormalization")
        ):
            continue
        node.op_type = "Sum"
        count += 1
    return count


def _session_graph(session_or_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for a session or file (its optimised form, dumped through a new session)."""
    import onnxruntime as ort

    if isinstance(session_or_path, ort.InferenceSession):
        model_path = getattr(session_or_path, "_model_path", None)
        if not model_path:
            raise LeanmlError("this InferenceSession was built from bytes, not a file; pass the .onnx path instead")
        level = session_or_path.get_session_options().graph_optimization_level
        providers = session_or_path.get_providers()
    else:
        model_path = str(_load(session_or_path)[0])
        level, providers = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        ort.InferenceSession(str(model_path), opts, providers=providers)
        return onnx.load(opts.optimized_model_filepath)


def fused_ops_report(session_or_path) -> dict[str, int]:
    """Fused and quantized kernels in the graph ONNX Runtime actually runs (after its own optimisation).

    Takes an ``InferenceSession`` created from a file (its optimisation level and providers are kept)
    or a path (full optimisation, CPU). Returns counts of the ops outside the standard ONNX domain
    (``com.microsoft`` contrib kernels such as ``Attention``, ``SkipLayerNormalization``,
    ``DynamicQuantizeMatMul``, ``QAttention``, ``FusedMatMul``...), keyed without the domain prefix.
    """
    graph = _session_graph(session_or_path)
    counts = Counter(n.op_type for n in graph.graph.node if n.domain not in ("", "ai.onnx"))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (its weights as stored)."""
    return int(sum(numpy_helper.to_array(t).nbytes if not t.raw_data else len(t.raw_data) for t in model.graph.initializer))


__all__ = [
    "CPU_INT8_SKIP",
    "FUSIONS",
    "detect_heads",
    "fused_ops_report",
    "fusion_report",
    "op_histogram",
    "optimize_onnx",
    "protect_layer_norm_adds",
    "weight_bytes",
]
