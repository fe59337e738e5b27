"""Whole-model weight-only quantization on a tiny llama and a tiny BERT (seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.models.arch import resolve
from leanml.quantize.gptq import dequantize_groups
from leanml.quantize.weight_only import (
    WeightQuantSpec,
    find_producer,
    fold_scales,
    hadamard_matrix,
    quantize_weights,
    random_rotation,
    refit_scales,
    rotate_residual,
)
from tests.conftest import tiny_llama_module


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def llama():
    """The tiny llama with non-trivial norm weights (so that folding them is actually tested)."""
    model = tiny_llama_module()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def windows(n: int = 8, length: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def targets(model: torch.nn.Module, under: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(under)]


def outputs(model: torch.nn.Module, ws: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        outs = [model(input_ids=w[None]) for w in ws]
    return torch.cat(
        [getattr(o, "logits", None) if getattr(o, "logits", None) is not None else o.last_hidden_state for o in outs]
    )


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * math.log10(float(ref.double().pow(2).sum() / (ref - out).double().pow(2).sum()))


def assert_records_exact(model: torch.nn.Module, records: dict) -> None:
    modules = dict(model.named_modules())
    for name, qw in records.items():
        deq = dequantize_groups(qw.codes, qw.scales, qw.zero_points, qw.g_idx).to(qw.weight.dtype)
        assert torch.equal(deq, modules[name].weight), name
        assert torch.equal(qw.weight, modules[name].weight), name
        qmin, qmax = (0, 2**qw.bits - 1) if not qw.symmetric else (-(2 ** (qw.bits - 1)), 2 ** (qw.bits - 1) - 1)
        assert qw.codes.dtype == torch.int32 and int(qw.codes.min()) >= qmin and int(qw.codes.max()) <= qmax


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq+gptq"])
def test_w8_per_channel_matches_float(method: str) -> None:
    model, ws = llama(), windows()
    ref = outputs(model, ws)
    spec = WeightQuantSpec(bits=8, group_size=None, method=method)
    records = quantize_weights(model, ws, spec, targets(model, "model.layers."))
    # observed about 44-46 dB for every method (W8 per channel on the tiny random llama)
    assert sqnr_db(ref, outputs(model, ws)) > 38
    assert_records_exact(model, records)


@pytest.mark.parametrize(
    "spec",
    [
        WeightQuantSpec(
            bits=4, group_size=16, method="awq+gptq", act_order=True, mse_clip=True, refine_scales=True, outlier_factor=4.0
        ),
        WeightQuantSpec(bits=3, group_size=16, method="gptq", act_order=True, static_groups=True, true_sequential=False),
        WeightQuantSpec(bits=4, group_size=None, method="awq", symmetric=True),
        WeightQuantSpec(bits=4, group_size=8, method="awq+gptq", act_order=True, rotate=True),
    ],
)
def test_codes_dequantize_exactly_to_module_weights(spec: WeightQuantSpec) -> None:
    model = llama()
    names = targets(model, "model.layers.")
    records = quantize_weights(model, windows(), spec, names)
    assert list(records) == names
    assert_records_exact(model, records)


def test_bert_codes_exact_and_w8_close() -> None:
    model, ws = tiny_bert(), windows()
    ref = outputs(model, ws)
    names = targets(model, "encoder.layer.")
    records = quantize_weights(model, ws, WeightQuantSpec(bits=8, group_size=None, method="awq+gptq"), names)
    assert_records_exact(model, records)
    assert sqnr_db(ref, outputs(model, ws)) > 38  # observed about 47 dB


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_calibration_data(bits: int) -> None:
    ws = windows()
    ref = outputs(llama(), ws)
    errors = {}
    for method in ("rtn", "gptq"):
        model = llama()
        quantize_weights(model, ws, WeightQuantSpec(bits=bits, group_size=16, method=method), targets(model, "model.layers."))
        errors[method] = float((outputs(model, ws) - ref).pow(2).mean())
    assert errors["gptq"] <= errors["rtn"]


def random_scales(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.25


def test_llama_folds_leave_float_outputs_unchanged() -> None:
    model, ws = llama(), windows(3)
    ref = outputs(model, ws)
    modules = dict(model.named_modules())
    kinds = {}
    for i in range(len(model.model.layers)):
        prefix = f"model.layers.{i}"
        for k, stage in enumerate(
            (
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"],
                ["mlp.down_proj"],
            )
        ):
            producer = find_producer(modules, resolve(model), prefix, [f"{prefix}.{n}" for n in stage])
            assert producer is not None
            kinds[stage[0]] = producer.kind
            n_src = producer.module.weight.shape[0]
            fold_scales(modules, producer, random_scales(n_src, 10 * i + k), {})
    assert kinds == {"self_attn.q_proj": "norm", "self_attn.o_proj": "heads", "mlp.gate_proj": "norm", "mlp.down_proj": "rows"}
    torch.testing.assert_close(outputs(model, ws), ref, rtol=1e-5, atol=1e-5)


def test_gqa_scales_are_shared_by_query_heads() -> None:
    model = llama()
    producer = find_producer(dict(model.named_modules()), resolve(model), "model.layers.0", ["model.layers.0.self_attn.o_proj"])
    assert (producer.rep, producer.head_dim) == (2, 8)  # 4 query heads of 8 channels on 2 kv heads
    s = producer.expand(torch.arange(16.0))
    assert torch.equal(s.view(2, 2, 8)[:, 0], s.view(2, 2, 8)[:, 1])
    assert torch.equal(producer.reduce(s), torch.arange(16.0))


def test_bert_fold_value_into_output_dense_only() -> None:
    model, ws = tiny_bert(), windows(3)
    ref = outputs(model, ws)
    mods, found = dict(model.named_modules()), resolve(model)
    p = "encoder.layer.0"
    # LayerNorm outputs also feed the residual connections: no exact producer for these stages
    qkv = [f"{p}.attention.self.query", f"{p}.attention.self.key", f"{p}.attention.self.value"]
    assert find_producer(mods, found, p, qkv) is None
    assert find_producer(mods, found, p, [f"{p}.intermediate.dense"]) is None
    assert find_producer(mods, found, p, [f"{p}.output.dense"]) is None
    producer = find_producer(mods, found, p, [f"{p}.attention.output.dense"])
    assert producer is not None and producer.name == f"{p}.attention.self.value"
    fold_scales(dict(model.named_modules()), producer, random_scales(32, 3), {})
    torch.testing.assert_close(outputs(model, ws), ref, rtol=1e-5, atol=1e-5)


def test_awq_scaling_keeps_float_outputs_when_bits_are_high() -> None:
    """AWQ with 8-bit per-channel: the folded scales are exact, so outputs stay close to float."""
    model, ws = llama(), windows()
    ref = outputs(model, ws)
    quantize_weights(model, ws, WeightQuantSpec(bits=8, group_size=None, method="awq"), targets(model, "model.layers."))
    assert sqnr_db(ref, outputs(model, ws)) > 38  # observed about 45 dB


def test_hadamard_and_rotation() -> None:
    for n in (1, 2, 12, 20, 32, 36, 64, 576, 1536):
        H = hadamard_matrix(n)
        assert H is not None and torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    assert hadamard_matrix(9) is None
    for n in (576, 9):
        R = random_rotation(n, seed=3)
        torch.testing.assert_close(R @ R.T, torch.eye(n, dtype=torch.float64))


def test_rotation_leaves_float_outputs_unchanged_and_unties_embeddings() -> None:
    model, ws = llama(), windows(3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = outputs(model, ws)
    rotate_residual(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(outputs(model, ws), ref, rtol=1e-5, atol=1e-5)


def test_rotation_needs_llama() -> None:
    with pytest.raises(LeanmlError, match="rotate=True supports the model families llama, .*BertModel"):
        rotate_residual(tiny_bert())


def test_refit_scales_never_worse() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    X = torch.randn(200, 32, generator=g) * torch.linspace(0.1, 3, 32)
    H = 2 / 200 * X.T.double() @ X.double()
    from leanml.quantize.gptq import gptq_quantize_weight

    qw = gptq_quantize_weight(W, H, 3, 8, act_order=True)
    refit = refit_scales(qw, W, H)
    err = lambda w: float(((W.double() - w.double()) @ H * (W.double() - w.double())).sum())  # noqa: E731
    assert err(refit.weight) <= err(qw.weight)
    assert torch.equal(refit.codes, qw.codes)
    assert torch.equal(dequantize_groups(refit.codes, refit.scales, refit.zero_points, refit.g_idx), refit.weight)


def test_bad_input() -> None:
    with pytest.raises(LeanmlError, match="method"):
        WeightQuantSpec(method="fancy")
    with pytest.raises(LeanmlError, match="bits"):
        WeightQuantSpec(bits=1)
    with pytest.raises(LeanmlError, match="group_size"):
        WeightQuantSpec(group_size=0)
    with pytest.raises(LeanmlError, match="outlier_factor"):
        WeightQuantSpec(outlier_factor=0.5)
    model = llama()
    with pytest.raises(LeanmlError, match="not an nn.Linear"):
        quantize_weights(model, windows(1), WeightQuantSpec(), ["model.norm"])
    with pytest.raises(LeanmlError, match="does not divide"):
        quantize_weights(model, windows(1), WeightQuantSpec(group_size=24), ["model.layers.0.mlp.up_proj"])
