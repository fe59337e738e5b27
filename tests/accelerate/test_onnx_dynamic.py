"""leanml's dynamic int8 quantization of ONNX graphs onto ONNX Runtime's DynamicQuantizeMatMul / QAttention."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from leanml.accelerate.onnx_dynamic import quantize_dynamic_onnx
from leanml.accelerate.onnx_export import export_onnx
from leanml.accelerate.ort_optimize import CPU_INT8_SKIP, fused_ops_report, optimize_onnx
from leanml.models import ModelHandle
from leanml.quantize.primitives import compute_qparams, dequantize, quantize

from .test_onnx_export import one_line_error, ort_run, text_batch, tiny_bert_handle, torch_run

ort = pytest.importorskip("onnxruntime")

# Observed on the tiny BERT (init range 0.1, 4 x 20 tokens with padding): 37.4 dB for per-channel int8,
# the same on the plain, fused and CPU-fused graphs. The threshold leaves ~5 dB of margin.
MIN_SQNR_DB = 32.0


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """(handle, {"plain", "fused", "cpu"} -> float ONNX path, folder)."""
    folder = tmp_path_factory.mktemp("onnx_dynamic")
    handle = tiny_bert_handle()
    plain = export_onnx(handle, folder / "plain.onnx")
    optimize_onnx(plain, folder / "fused.onnx")
    optimize_onnx(plain, folder / "cpu.onnx", skip=CPU_INT8_SKIP)
    return handle, {"plain": plain, "fused": folder / "fused.onnx", "cpu": folder / "cpu.onnx"}, folder


def valid(feed: dict) -> np.ndarray:
    return feed["attention_mask"].numpy().astype(bool)


@pytest.mark.parametrize("kind", ["plain", "fused", "cpu"])
def test_int8_output_close_to_fp32(graphs, kind, tmp_path):
    handle, paths, _ = graphs
    report = quantize_dynamic_onnx(paths[kind], tmp_path / "q.onnx")
    expected = {"plain": {"MatMul": 12}, "fused": {"Attention": 2, "MatMul": 6}, "cpu": {"Attention": 2, "MatMul": 6}}
    assert report["ops_quantized"] == expected[kind]
    assert report["bias_folded"] == {"plain": 12, "fused": 0, "cpu": 6}[kind]  # fused: the biases sit in SkipLayerNorm/BiasGelu
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    runtime = fused_ops_report(tmp_path / "q.onnx")
    assert runtime["DynamicQuantizeMatMul"] == expected[kind]["MatMul"]
    assert runtime.get("QAttention", 0) == expected[kind].get("Attention", 0)
    feed = text_batch(4, 20, seed=11)
    ref = torch_run(handle, feed)
    assert sqnr_db(ref[valid(feed)], ort_run(tmp_path / "q.onnx", feed)[valid(feed)]) > MIN_SQNR_DB


def _weights_by_int8_name(float_path) -> dict[str, np.ndarray]:
    model = onnx.load(str(float_path))
    return {f"{t.name}_int8": numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_weights_are_leanml_primitives(graphs, per_channel, tmp_path):
    """Every int8 weight (DynamicQuantizeMatMul's B, QAttention's packed QKV) is exactly what
    leanml.quantize.primitives computes: symmetric qparams per output column (or per tensor), codes by
    ``quantize``, zero point 0; codes x scale equals ``dequantize``."""
    _, paths, _ = graphs
    quantize_dynamic_onnx(paths["fused"], tmp_path / "q.onnx", per_channel=per_channel)
    originals = _weights_by_int8_name(paths["fused"])
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    checked = {"DynamicQuantizeMatMul": 0, "QAttention": 0}
    for node in model.graph.node:
        if node.op_type not in checked:
            continue
        b_name, s_name, z_name = (
            (node.input[1], node.input[2], node.input[3])
            if node.op_type == "DynamicQuantizeMatMul"
            else (node.input[1], node.input[4], node.input[7])
        )
        codes, scale, zero = inits[b_name], inits[s_name], inits[z_name]
        w = torch.from_numpy(originals[b_name].copy())
        if per_channel:
            qp = compute_qparams(w.amin(0, keepdim=True), w.amax(0, keepdim=True), 8, symmetric=True, axis=1)
            assert scale.shape == (w.shape[1],)
        else:
            qp = compute_qparams(w.min(), w.max(), 8, symmetric=True)
            assert scale.shape == ()
        assert codes.dtype == np.int8 and zero.dtype == np.int8 and zero.shape == () and zero == 0
        np.testing.assert_array_equal(codes, quantize(w, qp).numpy())
        np.testing.assert_array_equal(scale, qp.scale.reshape(scale.shape).numpy())
        deq = dequantize(torch.from_numpy(codes.astype(np.int32)), qp).numpy()
        np.testing.assert_allclose(codes.astype(np.float32) * scale, deq, rtol=1e-6, atol=0)
        assert np.abs(deq - w.numpy()).max() <= scale.max() / 2 + 1e-7  # round-to-nearest, nothing clipped
        checked[node.op_type] += 1
    assert checked == {"DynamicQuantizeMatMul": 6, "QAttention": 2}


def test_reduce_range_and_float_attention(graphs, tmp_path):
    handle, paths, _ = graphs
    report = quantize_dynamic_onnx(paths["cpu"], tmp_path / "q7.onnx", weight_bits=7, attention="float")
    assert report["ops_quantized"] == {"MatMul": 6} and report["ops_kept_float"] == {"Attention": 2}
    model = onnx.load(str(tmp_path / "q7.onnx"))
    codes = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_int8")]
    assert codes and all(c.min() >= -64 and c.max() <= 63 for c in codes)
    assert "Attention" in fused_ops_report(tmp_path / "q7.onnx")
    feed = text_batch(3, 16, seed=2)
    assert sqnr_db(torch_run(handle, feed)[valid(feed)], ort_run(tmp_path / "q7.onnx", feed)[valid(feed)]) > MIN_SQNR_DB - 6


def test_exclude_keeps_nodes_float(graphs, tmp_path):
    _, paths, _ = graphs
    names = [n.name for n in onnx.load(str(paths["plain"])).graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name]
    report = quantize_dynamic_onnx(paths["plain"], tmp_path / "q.onnx", exclude=tuple(names))
    assert report["ops_quantized"] == {"MatMul": 12 - len(names)} and len(names) == 4


def test_gemm_with_transposed_weight(mlp, tmp_path):
    """nn.Linear on 2-D inputs exports as Gemm(transB=1): the weight is transposed to (K, N) and the bias kept."""
    handle = ModelHandle(module=mlp, task="generic", name="mlp", example_inputs=(torch.randn(4, 20),))
    path = export_onnx(handle, tmp_path / "mlp.onnx")
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"Gemm"}
    report = quantize_dynamic_onnx(path, tmp_path / "mlp.int8.onnx")
    assert report["ops_quantized"] == {"Gemm": 2}
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = mlp(x).numpy()
    out = ort_run(tmp_path / "mlp.int8.onnx", {"input": x})
    assert sqnr_db(ref, out) > 30.0  # observed ~40 dB


def test_bad_inputs_give_one_line_errors(graphs, tmp_path):
    _, paths, folder = graphs
    one_line_error(quantize_dynamic_onnx, tmp_path / "missing.onnx", tmp_path / "q.onnx", match="does not exist")
    one_line_error(quantize_dynamic_onnx, paths["plain"], tmp_path / "q.onnx", weight_bits=3, match="weight_bits 3")
    one_line_error(quantize_dynamic_onnx, paths["plain"], tmp_path / "q.onnx", per_channel="yes", match="per_channel")
    one_line_error(quantize_dynamic_onnx, paths["plain"], tmp_path / "q.onnx", attention="int4", match="attention 'int4'")
    one_line_error(quantize_dynamic_onnx, paths["plain"], tmp_path / "q.onnx", exclude="name", match="exclude")
    relu = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        )
    )
    onnx.save(relu, tmp_path / "relu.onnx")
    one_line_error(quantize_dynamic_onnx, tmp_path / "relu.onnx", tmp_path / "q.onnx", match="nothing|no MatMul")
    assert not (tmp_path / "q.onnx").exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


@pytest.mark.real
def test_minilm_int8_embeddings_close_to_fp32(tmp_path):
    """MiniLM-L6 exported, fused for CPU int8 and quantized: mean-pooled embeddings of lee-sim texts
    (max 128 tokens) keep a mean cosine >= 0.99 with fp32 torch (observed 0.9937 on all 50 texts)."""
    import leanml
    from leanml.models import mean_pool

    handle = leanml.load("minilm-l6")
    texts = leanml.load_data("lee-sim").texts[:24]
    path = export_onnx(handle, tmp_path / "minilm.onnx")
    optimize_onnx(path, tmp_path / "minilm.cpu.onnx", skip=CPU_INT8_SKIP)
    report = quantize_dynamic_onnx(tmp_path / "minilm.cpu.onnx", tmp_path / "minilm.int8.onnx")
    assert report["ops_quantized"] == {"Attention": 6, "MatMul": 18}
    enc = dict(handle.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    with torch.no_grad():
        ref = mean_pool(handle.module(**enc), enc["attention_mask"])
    out = mean_pool(torch.from_numpy(ort_run(tmp_path / "minilm.int8.onnx", enc)), enc["attention_mask"])
    cosine = float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())
    assert cosine >= 0.99, cosine
