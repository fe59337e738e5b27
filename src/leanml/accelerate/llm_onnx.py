"""A decoder LLM (Llama family) written as an ONNX Runtime graph with a key/value cache.

The graph is built from the model's own tensors, not traced, so that every layer maps to the fastest
ONNX Runtime kernel for it and so that leanml's quantized integers go in unchanged:

* ``QuantLinear`` → ``com.microsoft.MatMulNBits`` fed with leanml's codes, scales and zero points
  (widths below 4 sit in 4-bit containers, 5-7 in 8-bit ones; the values are the same). Columns
  quantized out of order (GPTQ ``act_order``) are gathered into group order before the product,
  which is exact. Float layers → ``MatMul`` on the transposed weight.
* Projections that read the same input with the same layout are fused: q/k/v into one product,
  gate/up into another.
* RMS norms → ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (the residual
  add fused in), attention → ``com.microsoft.GroupQueryAttention`` with rotary embeddings and the
  cache (present = past + new keys, in BNSH layout).
* A ``QuantEmbedding`` tied to a quantized head → ``com.microsoft.GatherBlockQuantized`` on the head's
  codes, so the shared table is stored once, quantized.

:class:`OrtCausalLM` runs the graph behind the call signature of a transformers causal LM
(``input_ids``, ``past_key_values``, ``use_cache``), so perplexity and greedy decode are measured the
same way as for torch.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import LeanmlError
from ..models.handle import ModelHandle
from ..quantize.modules import QuantEmbedding, QuantLinear
from ..quantize.primitives import qrange

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MS = "com.microsoft"
OPSET = 17


# ----------------------------------------------------------------------------------------------------
# MatMulNBits tensors from leanml's integers
# ----------------------------------------------------------------------------------------------------


@dataclass
class NBits:
    """One ``MatMulNBits`` weight: packed blocks (N, n_blocks, blob), scales (N*n_blocks,), packed zero points."""

    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    block: int
    n: int
    k: int
    order: np.ndarray | None  # input columns to gather first (act-order layers), or None


def container_bits(bits: int) -> int:
    return 4 if bits <= 4 else 8


def block_size_for(group_size: int) -> int | None:
    """The largest ONNX Runtime block (16..128, a power of two) that tiles a group exactly."""
    for block in (128, 64, 32, 16):
        if group_size % block == 0:
            return block
    return None


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values along the last axis, low bits first (4 bits: two per byte)."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def nbits_weight(layer: QuantLinear) -> NBits | None:
    """leanml's codes of ``layer`` laid out for ``MatMulNBits``, or None when no block size tiles its groups."""
    block = block_size_for(layer.group_size)
    if block is None:
        return None
    codes = layer.codes()
    qmin, _ = qrange(layer.bits, layer.symmetric)
    unsigned = (codes - qmin).numpy()  # 0 .. 2**bits - 1
    zeros = (layer.zero_points.to(torch.int64) - qmin).numpy()  # (N, n_groups), -qmin when symmetric
    scales = layer.scales.numpy().astype(np.float32)
    order = None
    if layer.g_idx is not None:
        g_idx = layer.group_index()
        sorted_idx = torch.argsort(g_idx, stable=True)
        counts = torch.bincount(g_idx, minlength=layer.in_features // layer.group_size)
        if not bool((counts == layer.group_size).all()):
            return None
        order = sorted_idx.numpy()
        unsigned = unsigned[:, order]
    n, k = unsigned.shape
    reps = layer.group_size // block
    n_blocks = k // block
    scales_b = np.repeat(scales, reps, axis=1)  # (N, n_blocks)
    zeros_b = np.repeat(zeros, reps, axis=1)
    cbits = container_bits(layer.bits)
    packed = _pack_rows(unsigned.reshape(n, n_blocks, block), cbits)
    return NBits(
        packed=np.ascontiguousarray(packed),
        scales=scales_b.reshape(-1).astype(np.float32),
        zeros=_pack_rows(zeros_b, cbits).reshape(-1),
        bits=cbits,
        block=block,
        n=n,
        k=k,
        order=order,
    )


def fuse_nbits(parts: list[NBits]) -> NBits | None:
    """Stack weights that read the same input in the same layout along N (one product for q/k/v)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    for p in parts[1:]:
        same_order = (p.order is None and first.order is None) or (
            p.order is not None and first.order is not None and np.array_equal(p.order, first.order)
        )
        if (p.bits, p.block, p.k) != (first.bits, first.block, first.k) or not same_order:
            return None
    return NBits(
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        zeros=np.concatenate([p.zeros for p in parts]),
        bits=first.bits,
        block=first.block,
        n=sum(p.n for p in parts),
        k=first.k,
        order=first.order,
    )


def permute_rows(q: NBits, rows: np.ndarray) -> NBits:
    """The same weight with its output features (rows) reordered: ``y[..., j] = old_y[..., rows[j]]``."""
    n_blocks = q.k // q.block
    return NBits(
        packed=q.packed[rows],
        scales=q.scales.reshape(q.n, n_blocks)[rows].reshape(-1),
        zeros=q.zeros.reshape(q.n, -1)[rows].reshape(-1),
        bits=q.bits,
        block=q.block,
        n=q.n,
        k=q.k,
        order=q.order,
    )


# ----------------------------------------------------------------------------------------------------
# graph builder
# ----------------------------------------------------------------------------------------------------


class _Graph:
    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self.names = [], [], set()
        self.ops: dict[str, int] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        """A constant; a name given twice must carry the same array (a tensor shared by two nodes)."""
        if name in self.names:
            return name
        self.names.add(name)
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str, domain: str = "", **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        self.ops[op] = self.ops.get(op, 0) + 1
        return outputs


@dataclass
class _Options:
    accuracy_level: int


def _float_linear(g: _Graph, x: str, weights: list[torch.Tensor], biases: list[torch.Tensor | None], name: str) -> str:
    w = torch.cat([t.detach().float() for t in weights], 0)
    y = g.node("MatMul", [x, g.init(f"{name}.weight_t", w.t().contiguous().numpy())], 1, name)[0]
    if any(b is not None for b in biases):
        b = torch.cat(
            [bb.detach().float() if bb is not None else torch.zeros(t.shape[0]) for bb, t in zip(biases, weights, strict=True)]
        )
        y = g.node("Add", [y, g.init(f"{name}.bias", b.numpy())], 1, f"{name}/bias")[0]
    return y


def _nbits_linear(
    g: _Graph,
    x: str,
    q: NBits,
    biases: list[torch.Tensor | None],
    sizes: list[int],
    name: str,
    opts: _Options,
    input_ordered: bool = False,
) -> str:
    if q.order is not None and not input_ordered:
        # gather whole rows of the transposed activations: 5x faster than a Gather on the last axis for a
        # 128-token prefill here, about 1 us slower for one token
        t = g.node("Transpose", [x], 1, f"{name}/order_t", perm=[2, 0, 1])[0]
        t = g.node("Gather", [t, g.init(f"{name}.order", q.order.astype(np.int64))], 1, f"{name}/order", axis=0)[0]
        x = g.node("Transpose", [t], 1, f"{name}/order_tt", perm=[1, 2, 0])[0]
    inputs = [x, g.init(f"{name}.qweight", q.packed), g.init(f"{name}.scales", q.scales), g.init(f"{name}.zeros", q.zeros)]
    if any(b is not None for b in biases):
        b = torch.cat([bb.detach().float() if bb is not None else torch.zeros(n) for bb, n in zip(biases, sizes, strict=True)])
        inputs += ["", g.init(f"{name}.bias", b.numpy())]
    return g.node(
        "MatMulNBits", inputs, 1, name, MS, K=q.k, N=q.n, bits=q.bits, block_size=q.block, accuracy_level=opts.accuracy_level
    )[0]


def _linear(
    g: _Graph,
    x: str,
    layers: list[torch.nn.Module],
    name: str,
    opts: _Options,
    report: dict,
    out_orders: list[np.ndarray | None] | None = None,
    input_ordered: bool = False,
) -> list[str]:
    """One product for ``layers`` (fused along N when their layouts allow), split back into one output each.

    ``out_orders``: per layer, a reordering of its output features (rows) or None. ``input_ordered``: the
    input already arrives in the act-order column order of the (single) layer, so no Gather is needed."""
    sizes = [m.out_features for m in layers]
    orders = out_orders or [None] * len(layers)
    biases = [
        None if m.bias is None else (m.bias if o is None else m.bias[torch.from_numpy(o)])
        for m, o in zip(layers, orders, strict=True)
    ]
    if all(isinstance(m, QuantLinear) for m in layers):
        parts = [nbits_weight(m) for m in layers]
        parts = [p if p is None or o is None else permute_rows(p, o) for p, o in zip(parts, orders, strict=True)]
        fused = fuse_nbits(parts) if all(p is not None for p in parts) else None
        if fused is not None:
            report["nbits"] += len(layers)
            y = _nbits_linear(g, x, fused, biases, sizes, name, opts, input_ordered)
            return _split(g, y, sizes, name)
        if len(layers) > 1:
            return [
                out
                for i, (m, o) in enumerate(zip(layers, orders, strict=True))
                for out in _linear(g, x, [m], f"{name}.{i}", opts, report, [o])
            ]
        report["dequantized"].append(name)
        return [_float_linear(g, x, [_rows(layers[0].weight, orders[0])], biases, name)]
    if any(isinstance(m, QuantLinear) for m in layers):
        return [
            out
            for i, (m, o) in enumerate(zip(layers, orders, strict=True))
            for out in _linear(g, x, [m], f"{name}.{i}", opts, report, [o])
        ]
    for m in layers:
        if type(m) is not torch.nn.Linear:
            raise LeanmlError(
                f"layer {name} is a {type(m).__name__}; the ONNX Runtime LLM graph takes Linear and "
                "QuantLinear layers (weight-only recipes)"
            )
    report["float"] += len(layers)
    y = _float_linear(g, x, [_rows(m.weight, o) for m, o in zip(layers, orders, strict=True)], biases, name)
    return _split(g, y, sizes, name)


def _rows(w: torch.Tensor, order: np.ndarray | None) -> torch.Tensor:
    return w if order is None else w[torch.from_numpy(order)]


def _split(g: _Graph, y: str, sizes: list[int], name: str) -> list[str]:
    if len(sizes) == 1:
        return [y]
    return g.node("Split", [y, g.init(f"{name}.split", np.array(sizes, np.int64))], len(sizes), f"{name}/split", axis=-1)


def _rope(config, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type != "default":
        raise LeanmlError(f"rope_type {rope_type!r} is not supported by the ONNX Runtime LLM graph (accepted: default)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise LeanmlError(f"partial_rotary_factor {partial} is not supported by the ONNX Runtime LLM graph (accepted: 1.0)")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return freqs.cos().numpy(), freqs.sin().numpy()


def _embedding(g: _Graph, emb: torch.nn.Module, report: dict) -> str:
    if isinstance(emb, QuantEmbedding):
        q = nbits_weight(emb.head)
        if q is not None and q.order is None:
            report["embedding"] = f"GatherBlockQuantized {emb.head.bits}-bit (rows of {emb.tied_to})"
            n_blocks = q.k // q.block
            # the same packed codes as the head's MatMulNBits (one copy in the file), viewed as
            # (rows, blocks, block bytes) and quantized along the last axis
            data = g.init(f"{emb.tied_to}.qweight", q.packed) if emb.tied_to == "lm_head" else g.init("embed.qweight", q.packed)
            rows = g.node(
                "GatherBlockQuantized",
                [
                    data,
                    "input_ids",
                    g.init("embed.scales", q.scales.reshape(q.n, n_blocks, 1)),
                    g.init("embed.zeros", q.zeros.reshape(q.n, n_blocks, -1)),
                ],
                1,
                "embed",
                MS,
                bits=q.bits,
                block_size=q.block,
                gather_axis=0,
                quantize_axis=2,
            )[0]
            shape = g.init("embed.shape", np.array([0, 0, q.k], np.int64))
            return g.node("Reshape", [rows, shape], 1, "embed/reshape")[0]
        report["embedding"] = "Gather float (dequantized head rows)"
        table = emb.head.dequantize().float()
    elif isinstance(emb, torch.nn.Embedding):
        report["embedding"] = "Gather float"
        table = emb.weight.detach().float()
    else:
        raise LeanmlError(f"the input embedding is a {type(emb).__name__}; accepted: Embedding, QuantEmbedding")
    return g.node("Gather", [g.init("embed.weight", table.numpy()), "input_ids"], 1, "embed", axis=0)[0]


def _check_model(handle: ModelHandle):
    if handle.task != "causal-lm":
        raise LeanmlError(f"the ONNX Runtime LLM graph is for causal LMs; this model's task is {handle.task!r}")
    arch = type(handle.module).__name__
    if arch not in SUPPORTED:
        raise LeanmlError(
            f"architecture {arch} is not supported by the ONNX Runtime LLM graph (accepted: {', '.join(SUPPORTED)})"
        )
    return handle.module.config


def build_llm_onnx(handle: ModelHandle, path: str | os.PathLike, *, accuracy_level: int = 4) -> dict:
    """Write the ONNX graph of a Llama-family causal LM (float or weight-only quantized) to ``path``.

    ``accuracy_level`` is ``MatMulNBits``'s compute type (4: int8 products of the activations, quantized
    per block at run time; 0/1: float). Returns a report of what each part became.
    """
    import onnx
    from onnx import TensorProto, helper

    config = _check_model(handle)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LeanmlError(f"accuracy_level {accuracy_level} is not one of 0, 1, 2, 3, 4")
    model = handle.module.model
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if head_dim % 16:
        raise LeanmlError(f"head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's GroupQueryAttention needs")
    eps = float(config.rms_norm_eps)
    opts = _Options(accuracy_level)
    report = {"nbits": 0, "float": 0, "dequantized": [], "embedding": None, "head": None}
    g = _Graph()
    cos, sin = _rope(config, head_dim)
    g.init("cos_cache", cos.astype(np.float32))
    g.init("sin_cache", sin.astype(np.float32))

    h = _embedding(g, model.embed_tokens, report)
    layers = list(model.layers)
    ln0 = g.init("l0.ln_in", layers[0].input_layernorm.weight.detach().float().numpy())
    normed = g.node("SimplifiedLayerNormalization", [h, ln0], ["l0/ln_in"], "l0/ln_in", axis=-1, epsilon=eps)[0]
    residual = h
    inputs, outputs = [], []
    for i, layer in enumerate(layers):
        att = layer.self_attn
        q, k, v = _linear(g, normed, [att.q_proj, att.k_proj, att.v_proj], f"l{i}.qkv", opts, report)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        inputs += [past_k, past_v]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
        attn = g.node(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            [f"l{i}/attn", f"present.{i}.key", f"present.{i}.value"],
            f"l{i}.gqa",
            MS,
            num_heads=n_heads,
            kv_num_heads=n_kv,
            do_rotary=1,
            rotary_interleaved=0,
            scale=1.0 / math.sqrt(head_dim),
        )[0]
        o = _linear(g, attn, [att.o_proj], f"l{i}.o", opts, report)[0]
        post = layer.post_attention_layernorm.weight.detach().float().numpy()
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization", [o, residual, g.init(f"l{i}.ln_post", post)], 4, f"l{i}/ln_post", MS, epsilon=eps
        )
        mlp = layer.mlp
        # an act-order down projection reads its inputs in group order: emit the gate/up features in that
        # order (a row permutation of their weights, exact) instead of gathering the activations every call
        down_q = nbits_weight(mlp.down_proj) if isinstance(mlp.down_proj, QuantLinear) else None
        order = None if down_q is None else down_q.order
        gate, up = _linear(
            g,
            normed,
            [mlp.gate_proj, mlp.up_proj],
            f"l{i}.gate_up",
            opts,
            report,
            out_orders=None if order is None else [order, order],
        )
        sig = g.node("Sigmoid", [gate], 1, f"l{i}/sigmoid")[0]
        act = g.node("Mul", [gate, sig], 1, f"l{i}/silu")[0]
        prod = g.node("Mul", [act, up], 1, f"l{i}/gated")[0]
        down = _linear(g, prod, [mlp.down_proj], f"l{i}.down", opts, report, input_ordered=order is not None)[0]
        nxt = layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else model.norm.weight
        name = f"l{i + 1}.ln_in" if i + 1 < len(layers) else "final_norm"
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [down, residual, g.init(name, nxt.detach().float().numpy())],
            4,
            f"{name}/skip",
            MS,
            epsilon=eps,
        )
    head = handle.module.lm_head
    logits = _linear(g, normed, [head], "lm_head", opts, report)[0]
    report["head"] = f"MatMulNBits {head.bits}-bit" if isinstance(head, QuantLinear) else "MatMul float"
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    graph_inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"])]
    graph_inputs += [helper.make_tensor_value_info(n, f32, ["batch", n_kv, "past", head_dim]) for n in inputs]
    graph_inputs += [
        helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", i32, []),
    ]
    graph_outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", config.vocab_size])]
    graph_outputs += [helper.make_tensor_value_info(n, f32, ["batch", n_kv, "total", head_dim]) for n in outputs]
    graph = helper.make_graph(g.nodes, handle.name or "llm", graph_inputs, graph_outputs, g.inits)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], producer_name="leanml"
    )
    proto.ir_version = 8
    meta = {
        "num_layers": len(layers),
        "kv_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_positions": config.max_position_embeddings,
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"leanml.{key}", str(value)
    _save_atomic(onnx, proto, Path(path))
    report["ops"] = dict(sorted(g.ops.items()))
    report["bytes"] = sum(p.stat().st_size for p in _model_files(Path(path)))
    return report


def _model_files(path: Path) -> list[Path]:
    files = [path]
    data = path.with_name(path.name + ".data")
    return files + ([data] if data.exists() else [])


def point_external_data(onnx, graph: Path, data_name: str) -> None:
    """Rewrite the ONNX file ``graph`` so that its initializers read their bytes from ``data_name``."""
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save_model(model, str(graph))


def _save_atomic(onnx, proto, path: Path) -> None:
    """Write ``path`` (and its ``.data`` file of weights) via temporary names and renames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    data_name = path.name + ".data"
    tmp_data = path.parent / f".{data_name}.tmp"
    try:
        onnx.save_model(
            proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024
        )
        os.replace(tmp_data, path.parent / data_name)
        # the graph names its data file; point it at the final name before the graph itself lands
        point_external_data(onnx, tmp, data_name)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()


# ----------------------------------------------------------------------------------------------------
# runtime wrapper
# ----------------------------------------------------------------------------------------------------


class OrtKVCache:
    """Keys and values of every layer (numpy, BNSH) and the number of positions they hold."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def get_seq_length(self) -> int:
        return int(self.arrays[0].shape[2]) if self.arrays else 0


class OrtCausalLM(torch.nn.Module):
    """An ONNX Runtime session of :func:`build_llm_onnx`'s graph with a transformers-like call signature."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, providers: list | None = None):
        super().__init__()
        import onnx
        import onnxruntime as ort

        from .devices import ort_providers

        self.path = Path(path)
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        try:
            self.n_layers = int(meta["leanml.num_layers"])
            self.kv_heads, self.head_dim = int(meta["leanml.kv_heads"]), int(meta["leanml.head_dim"])
            self.max_positions = int(meta["leanml.max_positions"])
        except KeyError:
            raise LeanmlError(f"'{path}' is not a leanml LLM graph (no leanml.* metadata)") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.providers = providers or ort_providers()
        self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        self.config = SimpleNamespace(is_encoder_decoder=False, model_type="onnxruntime-llm")

    def _empty(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.n_layers)]

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: OrtKVCache | None = None,
        use_cache: bool = False,
        **_: object,
    ) -> SimpleNamespace:
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        batch, seq = ids.shape
        past = past_key_values.arrays if isinstance(past_key_values, OrtKVCache) else self._empty(batch)
        past_len = int(past[0].shape[2])
        total = past_len + seq
        if total > self.max_positions:
            raise LeanmlError(f"{total} positions exceed the model's {self.max_positions}")
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise LeanmlError("the ONNX Runtime LLM graph runs unpadded batches; attention_mask must be all ones")
        feed = {
            "input_ids": ids,
            "seqlens_k": np.full((batch,), total - 1, np.int32),
            "total_sequence_length": np.array(total, np.int32),
        }
        for i in range(self.n_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.session.run(None, feed)
        logits = torch.from_numpy(out[0])
        return SimpleNamespace(logits=logits, past_key_values=OrtKVCache(out[1:]) if use_cache else None)


def ort_llm_handle(
    handle: ModelHandle, path: str | os.PathLike, *, threads: int | None = None, accuracy_level: int = 4
) -> ModelHandle:
    """Build the graph of ``handle`` at ``path`` and return a handle that runs it on ONNX Runtime."""
    from .runtimes import _twin

    report = build_llm_onnx(handle, path, accuracy_level=accuracy_level)
    module = OrtCausalLM(path, threads=threads)
    return _twin(handle, module, "onnxruntime", {"graph": str(path), "providers": module.providers, **report})
