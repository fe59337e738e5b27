"""Structured pruning of Hugging Face transformers (tiny llama with grouped-query attention, tiny BERT):
FFN neurons, attention heads and whole layers; exact removal of zeroed units, exact parameter counts,
config updates, artifact round trip, generation with a key/value cache after dropping layers."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import leanml
from leanml.artifact import load_artifact, save_artifact
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from leanml.prune import StructuredPrune
from leanml.prune.structured import prune_ffn_neurons
from leanml.prune.transformer import detect_layout
from tests.conftest import CharTokenizer

HIDDEN, HEADS, KV, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 128, 3
CALIB = {"calib_windows": 2, "window": 32}


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def make_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return BertModel(config).eval()


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))


def llama_handle(model) -> ModelHandle:
    return ModelHandle(
        module=model, task="causal-lm", name="tiny-llama", tokenizer=CharTokenizer(), example_inputs={"input_ids": IDS}
    )


def bert_handle(model) -> ModelHandle:
    return ModelHandle(module=model, task="sentence-embedding", name="tiny-bert", example_inputs={"input_ids": IDS})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def states(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def span(units: list[int], size: int) -> torch.Tensor:
    return (torch.tensor(units)[:, None] * size + torch.arange(size)).reshape(-1)


def needs_data(criterion: str, text):
    return text if criterion in ("taylor", "activation") else None


# ----------------------------------------------------------------------------------------------------
# llama
# ----------------------------------------------------------------------------------------------------

FFN_ZEROED = [sorted(torch.randperm(FFN, generator=torch.Generator().manual_seed(i))[:32].tolist()) for i in range(LAYERS)]


@torch.no_grad()
def zero_ffn(model, zeroed):
    for layer, idx in zip(model.model.layers, zeroed, strict=True):
        layer.mlp.gate_proj.weight[idx] = 0
        layer.mlp.up_proj.weight[idx] = 0
        layer.mlp.down_proj.weight[:, idx] = 0


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "activation"])
def test_llama_ffn_zeroed_neurons_removed_exactly(criterion, tiny_text):
    model = make_llama()
    zero_ffn(model, FFN_ZEROED)
    before, params = logits(model), n_params(model)
    handle = llama_handle(model)
    leanml.prune(
        handle, StructuredPrune(unit="neurons", ratio=0.25, criterion=criterion, **CALIB), needs_data(criterion, tiny_text)
    )
    report = handle.meta["reports"]["prune.json"]
    assert [report["layers"][f"model.layers.{i}"]["removed_indices"] for i in range(LAYERS)] == FFN_ZEROED
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    assert model.config.intermediate_size == 96 and report["intermediate_size"] == 96
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (96, HIDDEN)
        assert layer.mlp.down_proj.weight.shape == (HIDDEN, 96)
    assert params - n_params(model) == LAYERS * 32 * 3 * HIDDEN == report["params_removed"]


@torch.no_grad()
def zero_query_heads(model, heads_per_layer, kv_per_layer=None):
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        rows = span(heads_per_layer[i], HEAD_DIM)
        attn.q_proj.weight[rows] = 0
        attn.o_proj.weight[:, rows] = 0
        if kv_per_layer is not None:
            kv = span(kv_per_layer[i], HEAD_DIM)
            attn.k_proj.weight[kv] = 0
            attn.v_proj.weight[kv] = 0


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "activation"])
def test_llama_kv_groups_zeroed_removed_exactly(criterion, tiny_text):
    model = make_llama()
    groups = [[1], [0], [1]]  # per layer: the kv head to remove, with its query heads (2 per group)
    zero_query_heads(model, [[2 * g, 2 * g + 1] for (g,) in groups], groups)
    before, params = logits(model), n_params(model)
    handle = llama_handle(model)
    leanml.prune(handle, StructuredPrune(unit="heads", ratio=0.5, criterion=criterion, **CALIB), needs_data(criterion, tiny_text))
    report = handle.meta["reports"]["prune.json"]
    assert [report["layers"][f"model.layers.{i}"]["removed_kv_heads"] for i in range(LAYERS)] == groups
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, HEAD_DIM)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == attn.v_proj.out_features == 16
        assert attn.o_proj.in_features == 32 and attn.num_key_value_groups == 2
    per_layer = 2 * HEAD_DIM * HIDDEN + 2 * HEAD_DIM * HIDDEN + HIDDEN * 2 * HEAD_DIM  # q rows, k+v rows, o columns
    assert params - n_params(model) == LAYERS * per_layer


def test_llama_query_heads_per_group_zeroed_removed_exactly():
    model = make_llama()
    heads = [[1, 2], [0, 3], [1, 3]]  # one query head from each of the two groups per layer
    zero_query_heads(model, heads)
    before, params = logits(model), n_params(model)
    handle = llama_handle(model)
    leanml.prune(handle, StructuredPrune(unit="heads", ratio=0.5, gqa="queries"))
    report = handle.meta["reports"]["prune.json"]
    assert [report["layers"][f"model.layers.{i}"]["removed_heads"] for i in range(LAYERS)] == heads
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 2, HEAD_DIM)
    assert all(layer.self_attn.num_key_value_groups == 1 for layer in model.model.layers)
    assert params - n_params(model) == LAYERS * (2 * HEAD_DIM * HIDDEN + HIDDEN * 2 * HEAD_DIM)


@torch.no_grad()
def make_identity_layer(model, i):
    """Zero the two projections that write into the residual stream: the layer becomes the identity."""
    model.model.layers[i].self_attn.o_proj.weight.zero_()
    model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("criterion", ["l1", "taylor", "activation"])
def test_llama_layer_drop_is_exact_and_generation_uses_the_cache(criterion, tiny_text):
    model = make_llama()
    make_identity_layer(model, 1)
    before, params = logits(model), n_params(model)
    prompt = IDS[:1, :6]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    handle = llama_handle(model)
    leanml.prune(
        handle, StructuredPrune(unit="layers", ratio=0.34, criterion=criterion, **CALIB), needs_data(criterion, tiny_text)
    )
    report = handle.meta["reports"]["prune.json"]
    assert report["removed_layers"] == ["model.layers.1"] and report["num_hidden_layers"] == 2
    assert model.config.num_hidden_layers == len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    one_layer = 4 * HIDDEN * HIDDEN - 2 * HIDDEN * (HIDDEN - KV * HEAD_DIM) + 3 * HIDDEN * FFN + 2 * HIDDEN
    assert params - n_params(model) == one_layer
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    without = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(with_cache, without) and torch.equal(with_cache, generated)


@pytest.mark.parametrize(
    "cfg",
    [
        {"unit": "neurons", "ratio": 0.25},
        {"unit": "heads", "ratio": 0.5},
        {"unit": "heads", "ratio": 0.5, "gqa": "queries"},
        {"unit": "layers", "ratio": 0.5},
    ],
)
def test_pruned_llama_round_trips_through_the_artifact(tmp_path, cfg):
    model = make_llama()
    handle = llama_handle(model)
    leanml.prune(handle, StructuredPrune(**cfg))
    expected = logits(model)
    save_artifact(handle, tmp_path / "llama")
    again = load_artifact(tmp_path / "llama").module
    assert torch.equal(logits(again), expected)
    assert again.config.to_dict()["intermediate_size"] == model.config.intermediate_size
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}


def test_ffn_25_recipe_step_from_yaml_on_llama(tiny_text):
    from leanml.pipeline import apply_recipe
    from leanml.recipe import Recipe, load_recipe

    assert load_recipe("ffn-25").steps == [StructuredPrune(unit="neurons", ratio=0.25, criterion="activation", calib_windows=16)]
    model = make_llama()
    apply_recipe(llama_handle(model), "ffn-25", tiny_text)
    assert model.config.intermediate_size == 96
    recipe = Recipe.from_yaml("steps:\n  - kind: prune-structured\n    unit: heads\n    ratio: 0.5\n    gqa: queries\n")
    model = make_llama()
    apply_recipe(llama_handle(model), recipe)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2


def test_compress_saves_the_pruned_model_and_its_report(tmp_path, tiny_text):
    import json

    from leanml.pipeline import compress

    model = make_llama()
    compress(llama_handle(model), "ffn-25", data=tiny_text, out=tmp_path / "out", measure=False)
    report = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert report["unit"] == "neurons" and report["params_removed"] == LAYERS * 32 * 3 * HIDDEN
    assert torch.equal(logits(load_artifact(tmp_path / "out").module), logits(model))


# ----------------------------------------------------------------------------------------------------
# BERT
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["l2", "activation"])
def test_bert_ffn_zeroed_neurons_removed_exactly(criterion):
    model = make_bert()
    with torch.no_grad():
        for layer, idx in zip(model.encoder.layer, FFN_ZEROED[:2], strict=True):
            layer.intermediate.dense.weight[idx] = 0
            layer.intermediate.dense.bias[idx] = 0  # GELU(0) = 0: the neuron is silent
            layer.output.dense.weight[:, idx] = 0
    before, params = states(model), n_params(model)
    handle = bert_handle(model)
    cfg = StructuredPrune(unit="neurons", ratio=0.25, criterion=criterion)
    if criterion == "activation":  # the tiny BERT has no tokenizer: calibration batches are given directly
        prune_ffn_neurons(handle, detect_layout(model), cfg, [{"input_ids": IDS}, {"input_ids": IDS.flip(1)}])
    else:
        leanml.prune(handle, cfg)
    torch.testing.assert_close(states(model), before, atol=1e-5, rtol=1e-5)
    assert model.config.intermediate_size == 96
    assert all(layer.intermediate.dense.out_features == layer.output.dense.in_features == 96 for layer in model.encoder.layer)
    assert params - n_params(model) == 2 * 32 * (HIDDEN + 1 + HIDDEN)


def test_bert_heads_zeroed_removed_exactly_and_reload(tmp_path):
    model = make_bert()
    heads = [[0], [3]]
    with torch.no_grad():
        for layer, h in zip(model.encoder.layer, heads, strict=True):
            rows = span(h, HEAD_DIM)
            for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            layer.attention.output.dense.weight[:, rows] = 0
    before, params = states(model), n_params(model)
    handle = bert_handle(model)
    leanml.prune(handle, StructuredPrune(unit="heads", ratio=0.25, criterion="l1"))
    report = handle.meta["reports"]["prune.json"]
    assert [report["layers"][f"encoder.layer.{i}"]["removed_heads"] for i in range(2)] == heads
    assert "head count" in report["note"]
    torch.testing.assert_close(states(model), before, atol=1e-5, rtol=1e-5)
    for layer in model.encoder.layer:
        assert layer.attention.self.query.out_features == 48 and layer.attention.output.dense.in_features == 48
        assert layer.attention.self.num_attention_heads == 3 and layer.attention.self.all_head_size == 48
    assert params - n_params(model) == 2 * (3 * (HEAD_DIM * HIDDEN + HEAD_DIM) + HIDDEN * HEAD_DIM)
    save_artifact(handle, tmp_path / "bert")
    assert torch.equal(states(load_artifact(tmp_path / "bert").module), states(model))


def test_bert_layer_drop_updates_the_config_and_reloads(tmp_path):
    model = make_bert()
    handle = bert_handle(model)
    leanml.prune(handle, StructuredPrune(unit="layers", ratio=0.5, criterion="l2"))
    assert model.config.num_hidden_layers == len(model.encoder.layer) == 1
    assert states(model).shape == (2, 12, HIDDEN)
    save_artifact(handle, tmp_path / "bert")
    assert torch.equal(states(load_artifact(tmp_path / "bert").module), states(model))


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------


def test_bad_input_on_transformers_is_a_one_line_error():
    cases = [
        ({"unit": "heads", "ratio": 0.75}, "ratio 0.75 would remove all 2 units of the key/value heads"),
        ({"unit": "heads", "ratio": 0.75, "gqa": "queries"}, "would remove all 2 units of the 2 query heads"),
        ({"unit": "filters"}, "unit 'filters' does not apply to transformer 'tiny-llama'"),
        ({"unit": "neurons", "targets": ["re:layers\\.0\\."]}, "leave out 'model.layers.1.mlp.gate_proj'"),
        ({"unit": "neurons", "ignore": ["re:nothing"]}, "'re:nothing' matches no"),
        ({"unit": "layers", "targets": ["model.layers.0"], "ratio": 0.5}, "would remove all 1 units of the 1 selected"),
        ({"unit": "neurons", "criterion": "activation"}, "needs calibration data"),
    ]
    for cfg, message in cases:
        model = make_llama()
        with pytest.raises(LeanmlError, match=message) as info:
            leanml.prune(llama_handle(model), StructuredPrune(**cfg))
        assert "\n" not in str(info.value)
        assert model.config.intermediate_size == FFN and len(model.model.layers) == LAYERS  # nothing changed


def test_quantized_layers_are_refused():
    from leanml.config import WeightOnly

    model = make_llama()
    handle = llama_handle(model)
    leanml.quantize(handle, WeightOnly(bits=8, group_size=None, method="rtn", mse_clip=False))
    with pytest.raises(LeanmlError, match="apply structured pruning before quantization"):
        leanml.prune(handle, StructuredPrune(unit="neurons"))


def test_wrong_config_type_is_refused():
    from leanml.config import Int8Dynamic

    with pytest.raises(LeanmlError, match="accepted kinds: .*prune-structured"):
        leanml.prune(llama_handle(make_llama()), Int8Dynamic())
