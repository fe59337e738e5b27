"""Runtimes run the same model as torch: outputs within stated tolerances, measured the same way."""

from __future__ import annotations

import copy

import pytest
import torch

import leanml
from leanml.accelerate.runtimes import float_twin, prepare
from leanml.config import Int8Dynamic, WeightOnly
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from tests.accelerate.test_llm_onnx import _llama
from tests.conftest import CharTokenizer


def _mlp_handle(mlp):
    handle = ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp")
    handle.example_inputs = (torch.randn(4, 20),)
    return handle


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def test_unknown_runtime_is_a_one_line_error(mlp):
    with pytest.raises(LeanmlError, match="runtime 'tensorrt' is not one of torch, torch-compile, onnxruntime"):
        prepare(_mlp_handle(mlp), "tensorrt")


def test_torch_runtime_folds_batchnorm_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    handle = ModelHandle(module=net, task="generic", name="cnn")
    handle.example_inputs = (torch.randn(2, 3, 8, 8),)
    fused = prepare(handle, "torch")
    assert fused.meta["runtime_report"]["fusions"] and fused.module is not net
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused.module(x), net(x), rtol=0, atol=1e-5)


def test_torch_compile_matches_eager(mlp):
    compiled = prepare(_mlp_handle(mlp), "torch-compile")
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(x), mlp(x), rtol=0, atol=1e-5)
    assert compiled.runtime == "torch-compile"


def test_onnxruntime_fp32_matches_torch(mlp):
    ort = prepare(_mlp_handle(mlp), "onnxruntime", threads=1)
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(ort.call((x,)), mlp(x), rtol=0, atol=1e-4)
    assert ort.runtime == "onnxruntime" and ort.meta["torch_handle"].module is not None


def test_onnxruntime_int8_dynamic_uses_leanml_codes(mlp):
    handle = _mlp_handle(mlp)
    leanml.quantize(handle, Int8Dynamic())
    ort = prepare(handle, "onnxruntime", threads=1)
    report = ort.meta["runtime_report"]["int8"]
    assert report  # the int8 kernels were placed
    x = torch.randn(64, 20)
    with torch.no_grad():
        ref_float, sim = mlp(x), handle.module(x)
    out = ort.call((x,))
    # ORT quantizes activations per tensor (uint8) where leanml's simulation is per token: observed ~40 dB
    assert _sqnr(ref_float, out) > 30 and _sqnr(sim, out) > 30


def test_float_twin_holds_the_dequantized_weights(tiny_llama, tiny_text):
    leanml.quantize(tiny_llama, WeightOnly(bits=4, group_size=16, method="rtn", head_bits=8), tiny_text)
    twin = float_twin(tiny_llama.module)
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=x).logits, tiny_llama.module(input_ids=x).logits, rtol=0, atol=1e-5)
    assert all(type(m).__name__ in ("Linear", "Embedding") or not hasattr(m, "qweight") for m in twin.modules())


def test_profile_on_onnxruntime_names_the_runtime(tiny_text):
    handle = ModelHandle(module=_llama(), task="causal-lm", name="tiny", tokenizer=CharTokenizer())
    m = leanml.profile(handle, data=tiny_text, runtime="onnxruntime", threads=1, repeats=1, new_tokens=4, seq_len=16)
    ref = leanml.profile(handle, data=tiny_text, threads=1, repeats=1, new_tokens=4, seq_len=16)
    assert m.runtime == "onnxruntime" and ref.runtime == "torch"
    assert m.decode_tokens_per_s > 0 and m.flops_per_item == ref.flops_per_item
    assert abs(m.quality["value"] / ref.quality["value"] - 1) < 1e-4  # fp32 graph: the same perplexity
    assert any("GroupQueryAttention" in n for n in m.notes)


def test_runtime_of_a_runtime_handle_is_refused(mlp):
    ort = prepare(_mlp_handle(mlp), "onnxruntime", threads=1)
    assert prepare(ort, "onnxruntime") is ort
    with pytest.raises(LeanmlError, match="already runs on onnxruntime"):
        prepare(ort, "torch-compile")
