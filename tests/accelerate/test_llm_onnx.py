"""The ONNX Runtime LLM graph against the torch model it was built from."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import leanml
from leanml.accelerate.llm_onnx import build_llm_onnx, nbits_weight, ort_llm_handle
from leanml.config import WeightOnly
from leanml.errors import LeanmlError
from leanml.measure.cost import greedy_decode
from leanml.models import ModelHandle
from tests.conftest import CharTokenizer


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # head_dim 16: GroupQueryAttention needs a multiple of 16
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _handle(module):
    return ModelHandle(module=copy.deepcopy(module), task="causal-lm", name="tiny", tokenizer=CharTokenizer())


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def test_fp32_graph_matches_torch_prefill_and_cached_decode(llama, tmp_path):
    handle = _handle(llama)
    ort = ort_llm_handle(handle, tmp_path / "m.onnx", threads=1)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = llama(input_ids=x).logits
        ref_next = llama(input_ids=torch.cat([x, x[:, :1]], 1)).logits[:, -1:]
    out = ort.module(input_ids=x, use_cache=True)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-4)
    step = ort.module(input_ids=x[:, :1], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, ref_next, rtol=0, atol=1e-4)
    assert step.past_key_values.get_seq_length() == 13
    # greedy decode with the cache gives the same tokens as torch
    assert torch.equal(greedy_decode(ort.module, x[:1], 12)[2], greedy_decode(llama, x[:1], 12)[2])
    assert ort.runtime == "onnxruntime" and ort.meta["runtime_report"]["ops"]["GroupQueryAttention"] == 2


@pytest.mark.parametrize(
    "cfg",
    [
        WeightOnly(bits=4, group_size=32, method="rtn", head_bits=8),
        WeightOnly(bits=4, group_size=16, method="gptq", act_order=True, head_bits=8, calib_windows=4, window=64),
        WeightOnly(bits=3, group_size=32, method="rtn", symmetric=True, head_bits=4),
        WeightOnly(bits=8, group_size=None, method="rtn", head_bits=8),
    ],
    ids=["w4-rtn", "w4-gptq-act-order", "w3-sym", "w8-channel"],
)
def test_quantized_graph_runs_leanml_integers(llama, tiny_text, tmp_path, cfg):
    handle = _handle(llama)
    leanml.quantize(handle, cfg, tiny_text)
    x = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = handle.module(input_ids=x).logits
    # float compute (accuracy_level 0) on the stored integers: the simulated model to float rounding
    exact = ort_llm_handle(handle, tmp_path / "exact.onnx", threads=1, accuracy_level=0)
    report = exact.meta["runtime_report"]
    assert report["nbits"] == 15 and report["float"] == 0 and not report["dequantized"]
    assert report["embedding"].startswith("GatherBlockQuantized")
    torch.testing.assert_close(exact.module(input_ids=x).logits, ref, rtol=0, atol=2e-5)
    # int8 activations (accuracy_level 4): observed SQNR 43-45 dB on these models
    fast = ort_llm_handle(handle, tmp_path / "fast.onnx", threads=1, accuracy_level=4)
    assert _sqnr(ref, fast.module(input_ids=x).logits) > 35


def test_nbits_layout_dequantizes_to_the_layer(llama, tiny_text):
    handle = _handle(llama)
    leanml.quantize(
        handle, WeightOnly(bits=4, group_size=16, method="gptq", act_order=True, calib_windows=4, window=64), tiny_text
    )
    layer = handle.module.model.layers[0].mlp.down_proj
    q = nbits_weight(layer)
    assert q.order is not None  # act-order groups are gathered into order
    low, high = q.packed & 15, q.packed >> 4
    codes = np.stack([low, high], -1).reshape(q.n, -1).astype(np.float32)
    zeros = np.stack([q.zeros & 15, q.zeros >> 4], -1).reshape(q.n, -1)[:, : q.k // q.block].astype(np.float32)
    scales = q.scales.reshape(q.n, -1)
    w = (codes - np.repeat(zeros, q.block, 1)) * np.repeat(scales, q.block, 1)
    unpermuted = np.empty_like(w)
    unpermuted[:, q.order] = w
    np.testing.assert_allclose(unpermuted, layer.dequantize().numpy(), rtol=0, atol=1e-6)


def test_bad_models_give_one_line_errors(llama, tiny_llama, mlp, tmp_path):
    with pytest.raises(LeanmlError, match="multiple of 16"):
        build_llm_onnx(tiny_llama, tmp_path / "a.onnx")  # head_dim 8
    with pytest.raises(LeanmlError, match="causal LMs"):
        build_llm_onnx(ModelHandle(module=mlp, task="generic", name="mlp"), tmp_path / "b.onnx")
    with pytest.raises(LeanmlError, match="accuracy_level"):
        build_llm_onnx(_handle(llama), tmp_path / "c.onnx", accuracy_level=7)
    ort = ort_llm_handle(_handle(llama), tmp_path / "d.onnx", threads=1)
    with pytest.raises(LeanmlError, match="exceed"):
        ort.module(input_ids=torch.zeros(1, 1100, dtype=torch.long))
