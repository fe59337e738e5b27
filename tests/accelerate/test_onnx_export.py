"""ONNX export of non-causal handles and ONNX Runtime graph fusions, on a tiny BERT built here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from leanml.accelerate.onnx_export import export_onnx, read_metadata
from leanml.accelerate.ort_optimize import CPU_INT8_SKIP, fused_ops_report, op_histogram, optimize_onnx
from leanml.errors import LeanmlError
from leanml.models import ModelHandle

ort = pytest.importorskip("onnxruntime")


def tiny_bert_handle(seed: int = 0, initializer_range: float = 0.1) -> ModelHandle:
    """A 2-layer BERT (hidden 64, 4 heads) with random weights; init range 0.1 so the layers change the
    output as much as the embeddings do (at BERT's 0.02 the output is ~96 % the embedding LayerNorm)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        initializer_range=initializer_range,
    )
    module = BertModel(config, add_pooling_layer=False).eval()
    handle = ModelHandle(module=module, task="sentence-embedding", name="tiny-bert")
    handle.example_inputs = text_batch(3, 16, seed=1)
    return handle


def text_batch(batch: int, seq: int, seed: int = 0) -> dict:
    """Token ids with right padding in some rows (attention_mask 0 at the end)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch, 2):
        mask[row, seq // 2 + row % 3 :] = 0
    return {"token_type_ids": torch.zeros_like(ids), "input_ids": ids, "attention_mask": mask}


def ort_run(path, feed: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {k: v.numpy() for k, v in feed.items() if k in names})[0]


@torch.no_grad()
def torch_run(handle: ModelHandle, feed: dict) -> np.ndarray:
    return handle.module(**feed).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(handle, folder, plain export, fully fused graph, fusion report)."""
    folder = tmp_path_factory.mktemp("onnx_export")
    handle = tiny_bert_handle()
    plain = export_onnx(handle, folder / "tiny.onnx")
    report = optimize_onnx(plain, folder / "tiny.fused.onnx")
    return handle, folder, plain, folder / "tiny.fused.onnx", report


def test_export_matches_torch_with_dynamic_batch_and_sequence(exported):
    handle, folder, plain, _, _ = exported
    sess = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    assert sess.get_inputs()[0].shape == ["batch", "sequence"]
    feed = text_batch(5, 24, seed=7)  # other batch and length than the traced 3 x 16
    np.testing.assert_allclose(ort_run(plain, feed), torch_run(handle, feed), atol=1e-4, rtol=0)
    # the temporary eager attention is restored, and the export metadata carries the shape of the heads
    assert handle.module.config._attn_implementation == "sdpa"
    meta = read_metadata(onnx.load(str(plain)))
    assert (meta["num_heads"], meta["hidden_size"], meta["model_type"], meta["task"]) == ("4", "64", "bert", "sentence-embedding")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_bert_fusions_keep_the_output(exported):
    handle, _, _, fused, report = exported
    assert report[:2] == ["SkipLayerNormalization ×4", "Attention ×2"]
    assert "BiasGelu ×2" in report and "EmbedLayerNormalization ×1" in report
    model = onnx.load(str(fused))
    assert any(o.domain == "com.microsoft" for o in model.opset_import)  # a valid model for other ONNX tools too
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ops = op_histogram(model)
    assert ops["com.microsoft.Attention"] == 2 and ops["com.microsoft.SkipLayerNormalization"] == 4
    assert "Softmax" not in ops and "LayerNormalization" not in ops
    feed = text_batch(4, 20, seed=3)
    np.testing.assert_allclose(ort_run(fused, feed), torch_run(handle, feed), atol=1e-4, rtol=0)
    # what ONNX Runtime runs after its own session optimisations
    assert fused_ops_report(fused)["Attention"] == 2
    session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    assert fused_ops_report(session)["SkipLayerNormalization"] == 4


def test_cpu_int8_skip_keeps_layernorm_unfused_at_run_time(exported, tmp_path):
    handle, _, plain, _, _ = exported
    report = optimize_onnx(plain, tmp_path / "cpu.onnx", skip=CPU_INT8_SKIP)
    assert "Attention ×2" in report and "Sum ×4" in report
    assert not any(r.startswith(("SkipLayerNormalization", "BiasGelu")) for r in report)
    runtime = fused_ops_report(tmp_path / "cpu.onnx")  # ORT's SkipLayerNormFusion does not fuse the Sums back
    assert "SkipLayerNormalization" not in runtime and runtime["Attention"] == 2
    feed = text_batch(4, 20, seed=4)
    np.testing.assert_allclose(ort_run(tmp_path / "cpu.onnx", feed), torch_run(handle, feed), atol=1e-4, rtol=0)


def test_heads_detected_without_metadata(exported, tmp_path):
    _, _, plain, _, _ = exported
    model = onnx.load(str(plain))
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "bare.onnx")
    report = optimize_onnx(tmp_path / "bare.onnx", tmp_path / "bare.fused.onnx")
    assert "Attention ×2" in report


def test_fp16_export_keeps_float_io(exported, tmp_path):
    handle, _, _, _, _ = exported
    path = export_onnx(handle, tmp_path / "half.onnx", dtype="fp16")
    model = onnx.load(str(path))
    big = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 64 * 64]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    feed = text_batch(2, 12, seed=5)
    np.testing.assert_allclose(ort_run(path, feed), torch_run(handle, feed), atol=2e-2, rtol=0)


def test_sequence_classifier_exports_logits(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    module = BertForSequenceClassification(config).eval()
    feed = text_batch(2, 10, seed=9)
    handle = ModelHandle(module=module, task="sequence-classification", name="tiny-cls", example_inputs=feed)
    path = export_onnx(handle, tmp_path / "cls.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits"] and sess.get_outputs()[0].shape == ["batch", 3]
    other = text_batch(5, 14, seed=10)
    with torch.no_grad():
        ref = module(**other).logits.numpy()
    np.testing.assert_allclose(ort_run(path, other), ref, atol=1e-4, rtol=0)


def test_generic_module_export_and_basic_optimisation(mlp, tmp_path):
    handle = ModelHandle(module=mlp, task="generic", name="mlp", example_inputs=(torch.randn(4, 20),))
    path = export_onnx(handle, tmp_path / "mlp.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and sess.get_inputs()[0].shape[0] == "batch"
    x = torch.randn(7, 20)
    with torch.no_grad():
        ref = mlp(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, atol=1e-5, rtol=0)
    report = optimize_onnx(path, tmp_path / "mlp.opt.onnx")
    assert isinstance(report, list)
    out = ort.InferenceSession(str(tmp_path / "mlp.opt.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out[0], ref, atol=1e-5, rtol=0)


def one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(LeanmlError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_give_one_line_errors(tiny_llama, exported, tmp_path):
    handle, _, plain, _, _ = exported
    message = one_line_error(export_onnx, tiny_llama, tmp_path / "llm.onnx", match="causal LM")
    assert "leanml.accelerate.llm_onnx" in message
    assert not (tmp_path / "llm.onnx").exists()
    one_line_error(export_onnx, handle, tmp_path / "x.onnx", dtype="int4", match="dtype 'int4'")
    one_line_error(export_onnx, handle, tmp_path / "x.onnx", opset=7, match="opset 7")
    bare = ModelHandle(module=handle.module, task="sentence-embedding", name="no-inputs")
    one_line_error(export_onnx, bare, tmp_path / "x.onnx", match="no example inputs")
    one_line_error(optimize_onnx, tmp_path / "missing.onnx", tmp_path / "o.onnx", match="does not exist")
    one_line_error(optimize_onnx, plain, tmp_path / "o.onnx", model_type="bogus", match="model_type 'bogus'")
    one_line_error(optimize_onnx, plain, tmp_path / "o.onnx", skip=("Flash",), match="skip")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    one_line_error(optimize_onnx, tmp_path / "junk.onnx", tmp_path / "o.onnx", match="not a readable ONNX model")
    assert not (tmp_path / "o.onnx").exists()
