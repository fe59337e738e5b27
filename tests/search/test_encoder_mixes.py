"""Encoder int8 mixes: the layers of a role (the FFN's down projection, attention) stay float, by patterns
from the family's layout that hold after layers are removed, and ONNX Runtime quantizes exactly the layers
the simulated model holds in int8."""

from __future__ import annotations

import pytest
import torch

from leanml.accelerate.runtimes import prepare
from leanml.pipeline import apply_recipe
from leanml.quantize.modules import Int8ActLinear
from leanml.search.space import FLOAT_ROLES, build_space, encoder_roles
from tests.families import handle as family_handle


def _int8(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, Int8ActLinear)}


def _linear(module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear | Int8ActLinear)}


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_each_mix_keeps_its_roles_float(family):
    h = family_handle(family)
    space = build_space(h, "torch")
    assert [q for q in space.choices["quant"] if "+fp:" in q] == [f"int8-dynamic+fp:{r}" for r in FLOAT_ROLES]
    from leanml.prune.transformer import detect_layout

    blocks = detect_layout(h.module).blocks
    down = {b.ffn_cols for b in blocks}
    attention = {n for b in blocks for n in b.attn_layers}
    for role, kept in (("ffn-down", down), ("attention", attention), ("attention+ffn-down", down | attention)):
        cand = family_handle(family)
        point = {"quant": f"int8-dynamic+fp:{role}", "ffn": "0", "heads": "0", "layers": "0", "runtime": "torch"}
        apply_recipe(cand, space.recipe(point), None)
        assert _int8(cand.module) == _linear(h.module) - kept, role


def test_the_patterns_hold_after_layers_are_removed():
    h = family_handle("bert")
    space = build_space(h, "torch", n_layers=h.module.config.num_hidden_layers)
    point = {"quant": "int8-dynamic+fp:ffn-down", "ffn": "0", "heads": "0", "layers": "1", "runtime": "torch"}
    cand = family_handle("bert")
    from leanml.data import TextCorpus
    from tests.families import TEXT

    apply_recipe(cand, space.recipe(point), TextCorpus(name="t", text=TEXT, eval_tokens=600, calib_start=1200))
    left = [n for n in _linear(cand.module) if n.endswith(".output.dense") and ".attention." not in n]
    assert left and not (set(left) & _int8(cand.module))  # every remaining FFN down projection is float


def test_onnxruntime_quantizes_the_same_layers(tmp_path):
    h = family_handle("bert")
    space = build_space(h, "onnxruntime")
    cases = {"ffn-down": {"Attention": 1}, "attention": {"MatMul": 2}, "attention+ffn-down": {"MatMul": 1}}
    n_blocks = h.module.config.num_hidden_layers
    for role, per_block in cases.items():
        cand = family_handle("bert")
        point = {"quant": f"int8-dynamic+fp:{role}", "ffn": "0", "heads": "0", "layers": "0", "runtime": "onnxruntime"}
        apply_recipe(cand, space.recipe(point), None)
        rt = prepare(cand, "onnxruntime", workdir=tmp_path / role.replace("+", "-"))
        ops = rt.meta["runtime_report"]["int8"]["ops_quantized"]
        if role == "ffn-down":  # fused attention (q, k, v) int8, its output projection and the FFN's up projection
            assert ops == {"Attention": n_blocks, "MatMul": 2 * n_blocks}, ops
        else:
            assert ops == {k: v * n_blocks for k, v in per_block.items()}, (role, ops)
        assert rt.meta["runtime_report"]["agreement"]["sqnr_db"] >= 8


def test_roles_of_a_model_without_a_layout_are_empty():
    assert encoder_roles(torch.nn.Sequential(torch.nn.Linear(4, 4))) == {}


def test_grouped_options_only_where_the_group_divides_every_layer():
    from leanml.models import ModelHandle
    from tests.conftest import tiny_llama_module

    narrow = ModelHandle(module=tiny_llama_module(), task="causal-lm", name="narrow")  # 32-wide inputs: no group of 64
    wide = family_handle("llama")  # inputs 64 and 128 wide: 64 divides both, 128 not 64
    q_narrow = build_space(narrow, "torch", sensitive=["x"]).choices["quant"]
    q_wide = build_space(wide, "torch", sensitive=["x"]).choices["quant"]
    assert not [q for q in q_narrow if "-g" in q]
    assert "w4-g64-gptq" in q_wide and "w4-g64" in q_wide and "w4-g128-rtn" not in q_wide
    assert [q for q in q_wide if "+8b:" in q]
