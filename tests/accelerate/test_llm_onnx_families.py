"""The ONNX Runtime LLM graph of every decoder family (tests/families.py's tiny models) against torch.

Each family is checked on a 16-token prompt (longer than the sliding window of 8 of Gemma 2/3) as one
prefill and as a 13-token prefill followed by 3 cached decode steps, float and after leanml's
weight-only quantization (the graph then computes in float on the stored integers, accuracy_level 0,
and is compared with torch running the same quantized model). Observed max |logit diff|: 3e-7.
"""

from __future__ import annotations

import copy

import pytest
import torch

import leanml
from leanml.accelerate.llm_onnx import build_llm_onnx, ort_llm_handle
from leanml.accelerate.runtimes import prepare
from leanml.config import WeightOnly
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from leanml.models.arch import module_at, resolve
from leanml.quantize.modules import QuantEmbedding
from tests.conftest import CharTokenizer
from tests.families import DECODERS, VOCAB, no_adapter_model, tiny_model, tokens

ATOL = 1e-4  # on logits of magnitude ~0.2-1.5; observed 3e-7
PROMPT = 16
DECODE = 3


class FamilyTokenizer(CharTokenizer):
    """Characters folded into the tiny models' vocabulary (ids 3 .. VOCAB - 1)."""

    vocab_size = VOCAB

    def __call__(self, text, add_special_tokens=True, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


def family_model(family: str) -> torch.nn.Module:
    """The family's tiny model with non-zero biases (transformers initialises them to 0), so that the
    q/k/v biases of Qwen2 and GPT-2's biases and LayerNorm shifts are really exercised."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def handle_of(model: torch.nn.Module, family: str) -> ModelHandle:
    return ModelHandle(module=copy.deepcopy(model), task="causal-lm", name=family, tokenizer=FamilyTokenizer())


def restore_embedding_scale(model: torch.nn.Module) -> None:
    """A torch reference that keeps Gemma's sqrt(hidden) embedding scale after quantization.

    ``leanml.quantize`` with ``head_bits`` replaces an embedding tied to the head by a ``QuantEmbedding``,
    which drops the scale of Gemma's scaled embedding module (torch then computes a different model). The
    graph follows the family adapter (``embed_scale``); this hook puts the scale back on the torch side
    only while the quantized embedding really lacks it."""
    found = resolve(model)
    emb = module_at(model, found.embed)
    if found.arch.embed_scale != "sqrt_hidden" or not isinstance(emb, QuantEmbedding):
        return
    ids = tokens(4)
    if not torch.equal(emb(ids), torch.nn.functional.embedding(ids, emb.weight)):
        return  # the embedding applies its scale itself
    scale = torch.tensor(found.hidden**0.5).to(emb.weight.dtype)
    emb.register_forward_hook(lambda _m, _i, out: out * scale)


def compare(reference: torch.nn.Module, ort, x: torch.Tensor) -> float:
    """Max |logit diff| of the graph against ``reference`` on a full prefill and on a prefill followed by
    cached decode steps (each step against torch's logits at that position of the whole prompt)."""
    with torch.no_grad():
        ref = reference(input_ids=x).logits
    full = ort.module(input_ids=x).logits
    diffs = [(full - ref).abs().max().item()]
    n = x.shape[1] - DECODE
    out = ort.module(input_ids=x[:, :n], use_cache=True)
    diffs.append((out.logits - ref[:, :n]).abs().max().item())
    past = out.past_key_values
    for t in range(n, x.shape[1]):
        step = ort.module(input_ids=x[:, t : t + 1], past_key_values=past, use_cache=True)
        past = step.past_key_values
        assert past.get_seq_length() == t + 1
        diffs.append((step.logits[:, 0] - ref[:, t]).abs().max().item())
    return max(diffs)


def n_linears(model: torch.nn.Module) -> int:
    found = resolve(model)
    return sum(len(b.linears) for b in found.blocks) + 1  # + the head


@pytest.mark.parametrize("family", DECODERS)
def test_float_graph_matches_torch(family, tmp_path):
    model = family_model(family)
    ort = ort_llm_handle(handle_of(model, family), tmp_path / "m.onnx", threads=1)
    report = ort.meta["runtime_report"]
    assert report["ops"]["GroupQueryAttention"] == len(resolve(model).blocks)
    assert report["float"] == n_linears(model) and report["nbits"] == 0
    x = tokens(PROMPT, batch=2)
    assert compare(model, ort, x) < ATOL


QUANT = [
    WeightOnly(bits=4, group_size=32, method="rtn", head_bits=8, mse_clip=False),
    WeightOnly(bits=4, group_size=16, method="gptq", act_order=True, head_bits=8, calib_windows=4, window=64, mse_clip=False),
    WeightOnly(bits=8, group_size=None, method="rtn", head_bits=8, mse_clip=False),
]


@pytest.mark.parametrize("cfg", QUANT, ids=["w4-rtn", "w4-gptq-act-order", "w8-channel"])
@pytest.mark.parametrize("family", DECODERS)
def test_quantized_graph_matches_torch(family, cfg, tiny_text, tmp_path):
    handle = handle_of(family_model(family), family)
    leanml.quantize(handle, cfg, tiny_text)
    ort = ort_llm_handle(handle, tmp_path / "q.onnx", threads=1, accuracy_level=0)
    report = ort.meta["runtime_report"]
    assert report["nbits"] == n_linears(handle.module) and report["float"] == 0 and not report["dequantized"]
    restore_embedding_scale(handle.module)
    assert compare(handle.module, ort, tokens(PROMPT, seed=3)) < ATOL


def test_gemma2_soft_capping_is_applied(tmp_path):
    """Caps small enough to change the logits (the defaults 50/30 barely act on a tiny random model)."""
    model = family_model("gemma2")
    model.config.final_logit_softcapping = 0.2
    for mod in model.modules():
        if hasattr(mod, "attn_logit_softcapping"):
            mod.attn_logit_softcapping = 0.02
    ort = ort_llm_handle(handle_of(model, "gemma2"), tmp_path / "m.onnx", threads=1)
    assert ort.meta["runtime_report"]["ops"]["Tanh"] == 1
    x = tokens(PROMPT)
    assert compare(model, ort, x) < ATOL
    with torch.no_grad():  # the caps matter here: without them torch's logits move by far more than ATOL
        capped = model(input_ids=x).logits
        model.config.final_logit_softcapping = None
        assert (model(input_ids=x).logits - capped).abs().max() > 100 * ATOL


VARIANTS = {
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-rope-yarn": (
        "llama",
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 32}),
    ),
    "qwen2-sliding-layer": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "phi3-sliding": ("phi3", dict(sliding_window=6)),
    "gemma3-rope-linear-global": (
        "gemma3",
        dict(
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            }
        ),
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants_match_torch(variant, tmp_path):
    """Rotary scalings (transformers' own frequencies, yarn's cos/sin factor) and sliding windows set by config."""
    family, overrides = VARIANTS[variant]
    model = tiny_model(family, **overrides)
    ort = ort_llm_handle(handle_of(model, family), tmp_path / "m.onnx", threads=1)
    assert compare(model, ort, tokens(PROMPT + 4)) < ATOL


def test_length_dependent_rope_is_refused(tmp_path):
    model = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(LeanmlError, match="rope_type 'dynamic' is not supported"):
        build_llm_onnx(handle_of(model, "llama"), tmp_path / "m.onnx")


def test_runtime_prepare_uses_the_graph_for_other_families(tmp_path):
    model = family_model("gemma3")
    ort = prepare(handle_of(model, "gemma3"), "onnxruntime", threads=1, workdir=tmp_path)
    assert ort.runtime == "onnxruntime" and ort.meta["runtime_report"]["ops"]["GroupQueryAttention"] == 3
    assert compare(model, ort, tokens(PROMPT)) < ATOL


def _no_adapter_lm() -> torch.nn.Module:
    return no_adapter_model(layers=1)


@pytest.mark.parametrize("which", ["bert", "gpt-neox"])
def test_unsupported_models_get_one_line_errors(which, tmp_path):
    module = tiny_model("bert") if which == "bert" else _no_adapter_lm()
    handle = ModelHandle(module=module, task="causal-lm", name=which)
    with pytest.raises(LeanmlError, match="the ONNX Runtime LLM graph supports the model families") as err:
        build_llm_onnx(handle, tmp_path / "m.onnx")
    assert "\n" not in str(err.value) and "is not one" in str(err.value)
    assert not (tmp_path / "m.onnx").exists()
