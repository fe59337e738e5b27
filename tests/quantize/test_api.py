"""Module surgery: each technique on tiny models, layer targeting, artifacts that reload exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import leanml
from leanml.config import Codebook, FloatCast, Int8Dynamic, Int8Static, SmoothQuant, WeightOnly
from leanml.data import TensorData
from leanml.errors import LeanmlError
from leanml.models import ModelHandle, output_tensor
from leanml.pipeline import apply_recipe, compress
from leanml.quantize.api import quantize
from leanml.quantize.modules import CastLinear, CodebookLinear, Int8ActConv2d, Int8ActLinear, QuantLinear
from leanml.quantize.packing import pack_bits, unpack_bits


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits):
    v = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(v, bits)
    assert packed.numel() == (1001 * bits + 7) // 8 and torch.equal(unpack_bits(packed, bits, 1001), v)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_byte_packing_is_the_bit_stream_layout(bits):
    """The in-bytes path for widths dividing 8 writes the general bit stream's bytes (odd lengths too)."""
    from leanml.quantize.packing import _pack_bitstream

    for n in (1, 7, 1001):
        v = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
        assert torch.equal(pack_bits(v.to(torch.int32), bits), _pack_bitstream(v.to(torch.int64), bits))


@pytest.fixture
def cnn_and_data():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10)
    ).eval()
    x = torch.rand(64, 1, 8, 8)
    return net, TensorData(name="toy", x=x, y=net(x).argmax(-1))


def test_int8_static_on_a_cnn(cnn_and_data):
    net, data = cnn_and_data
    x, _ = data.tensors("eval")
    ref = net(x)
    handle = quantize(ModelHandle(module=copy.deepcopy(net), task="generic", name="cnn"), Int8Static(observer="minmax"), data)
    assert isinstance(handle.module[0], Int8ActConv2d) and isinstance(handle.module[3], Int8ActLinear)
    assert sqnr_db(ref, handle.module(x)) > 30  # observed ≈ 38 dB
    # the calibrated input range of the first conv covers the calibration inputs (values in [0, 1])
    conv = handle.module[0]
    assert float(conv.act_zero_point) == 0 and abs(float(conv.act_scale) * 255 - 1.0) < 0.02


@pytest.mark.parametrize(
    "config, layer_type, min_db",
    [
        (Int8Dynamic(), Int8ActLinear, 30),  # observed ≈ 40 dB
        (WeightOnly(bits=8, group_size=None, method="rtn", mse_clip=False), QuantLinear, 35),  # observed ≈ 45 dB
        (WeightOnly(bits=4, group_size=4, method="rtn"), QuantLinear, 15),  # observed ≈ 21 dB
        (Codebook(method="kmeans", bits=4), CodebookLinear, 18),  # observed ≈ 24 dB
        (Codebook(method="nf4", block_size=4), CodebookLinear, 15),  # observed ≈ 20 dB
        (Codebook(method="log2", bits=5), CodebookLinear, 7),  # observed 9.7 dB: power-of-two levels are coarse
        (FloatCast(dtype="bf16"), CastLinear, 35),  # observed ≈ 48 dB
    ],
)
def test_linear_techniques_keep_outputs_close(mlp, config, layer_type, min_db):
    x = torch.randn(32, 20)
    ref = mlp(x)
    handle = quantize(ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp"), config)
    assert isinstance(handle.module[0], layer_type) and isinstance(handle.module[2], layer_type)
    assert sqnr_db(ref, handle.module(x)) > min_db


def test_targets_and_ignore(mlp):
    handle = quantize(
        ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp"),
        WeightOnly(bits=8, method="rtn", group_size=None, targets=["re:^0$"]),
    )
    assert isinstance(handle.module[0], QuantLinear) and isinstance(handle.module[2], torch.nn.Linear)
    handle = quantize(
        ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp"),
        WeightOnly(bits=8, method="rtn", group_size=None, ignore=["0"]),
    )
    assert isinstance(handle.module[0], torch.nn.Linear) and isinstance(handle.module[2], QuantLinear)


@pytest.mark.parametrize(
    "config, message",
    [
        (WeightOnly(bits=4, group_size=7, method="rtn"), "group_size 7 does not divide the 20 inputs"),
        (WeightOnly(method="rtn", targets=["re:attn"]), "layer pattern 're:attn' matches no Linear"),
        (WeightOnly(method="rtn", ignore=["decoder"]), "layer pattern 'decoder' matches no Linear"),
        (Int8Static(), "needs calibration data"),
    ],
)
def test_bad_targets_and_groups(mlp, config, message):
    with pytest.raises(LeanmlError, match=message):
        quantize(ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp"), config)


def test_lm_head_is_ignored_by_default(tiny_llama):
    quantize(tiny_llama, WeightOnly(bits=8, method="rtn", group_size=None))
    assert isinstance(tiny_llama.module.lm_head, torch.nn.Linear)
    assert isinstance(tiny_llama.module.model.layers[0].mlp.down_proj, QuantLinear)


def test_smoothquant_folds_into_rms_norms_without_changing_float_outputs(tiny_llama, tiny_text):
    from leanml.quantize.api import norm_producers

    p = "model.layers.0"
    qkv = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
    gate_up = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
    ids = {"input_ids": torch.randint(0, 128, (1, 12))}
    producers = norm_producers(tiny_llama, [*qkv, *gate_up, f"{p}.self_attn.o_proj"])
    assert producers == {
        **dict.fromkeys(qkv, (f"{p}.input_layernorm", 0.0)),
        **dict.fromkeys(gate_up, (f"{p}.post_attention_layernorm", 0.0)),
    }
    # a norm that also feeds a layer left in float cannot absorb the scale
    assert norm_producers(tiny_llama, [qkv[0], gate_up[1]]) == {}
    ref = output_tensor(tiny_llama.call(ids))
    quantize(tiny_llama, SmoothQuant(alpha=0.5, calib_windows=2), tiny_text)
    assert isinstance(tiny_llama.module.model.layers[1].mlp.gate_proj, Int8ActLinear)
    assert sqnr_db(ref, output_tensor(tiny_llama.call(ids))) > 25  # observed ≈ 35 dB


def test_static_smoothquant_ranges_are_those_of_the_smoothed_inputs(tiny_llama, tiny_text):
    """Each static range is the min/max of what its int8 layer quantizes: the original model's input
    to that layer divided by s (s kept as an input scale on o_proj/down_proj, folded into the norm
    elsewhere), recomputed here on an untouched copy with hooks."""
    from leanml.calibrate.batches import calibration_batches, run_batches
    from leanml.quantize.api import make_observer

    original = copy.deepcopy(tiny_llama)
    batches = calibration_batches(tiny_llama, tiny_text, 2)
    quantize(tiny_llama, SmoothQuant(alpha=0.5, calib_windows=2, activations="static"), tiny_text)
    model, ref = tiny_llama.module, original.module
    checked_self = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, Int8ActLinear):
            continue
        block = name.rsplit(".", 2)[0]
        if layer.smooth_inv is not None:
            inv, checked_self = layer.smooth_inv, checked_self + 1
        else:
            norm = "input_layernorm" if ".self_attn." in name else "post_attention_layernorm"
            inv = model.get_submodule(f"{block}.{norm}").weight / ref.get_submodule(f"{block}.{norm}").weight
        observer = make_observer("minmax")
        hook = ref.get_submodule(name).register_forward_pre_hook(lambda _m, a, o=observer, i=inv: o.observe(a[0] * i))
        run_batches(original, batches)
        hook.remove()
        expected = observer.qparams(8, False)
        assert float(layer.act_scale) == pytest.approx(float(expected.scale), rel=1e-5), name
        assert float(layer.act_zero_point) == float(expected.zero_point), name
    assert checked_self == 4  # o_proj and down_proj of both blocks


def test_compress_writes_everything_and_reloads_exactly(tmp_path, cnn_and_data):
    net, data = cnn_and_data
    out = tmp_path / "out"
    result = compress(
        ModelHandle(module=net, task="generic", name="cnn"), "int8-static", data=data, out=out, threads=1, repeats=2
    )
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "leanml.json", "recipe.yaml", "before.json", "after.json"}
    again = leanml.load(out)
    x, _ = data.tensors("eval")
    assert torch.equal(again.module(x), result.handle.module(x))
    assert result.after.disk_bytes < result.before.disk_bytes * 0.75  # int8 weights and pickled skeleton
    with pytest.raises(LeanmlError, match="not empty; pass --force"):
        compress(ModelHandle(module=net, task="generic", name="cnn"), "int8-static", data=data, out=out)


def test_llm_artifact_reloads_with_tied_embeddings(tmp_path, tiny_llama, tiny_text):
    from tests.conftest import CharTokenizer

    apply_recipe(tiny_llama, [WeightOnly(bits=4, group_size=16, method="rtn")])
    from leanml.artifact import save_artifact

    save_artifact(tiny_llama, tmp_path / "a")
    again = leanml.load(tmp_path / "a")
    again.tokenizer = CharTokenizer()
    ids = {"input_ids": torch.randint(0, 128, (1, 20))}
    assert torch.equal(output_tensor(again.call(ids)), output_tensor(tiny_llama.call(ids)))
    assert again.module.lm_head.weight is again.module.model.embed_tokens.weight


def test_gptq_through_the_api_saves_and_reloads(tmp_path, tiny_llama, tiny_text):
    from leanml.artifact import save_artifact
    from tests.conftest import CharTokenizer

    cfg = WeightOnly(bits=4, group_size=16, method="awq+gptq", act_order=True, outlier_factor=8.0, window=64, calib_windows=4)
    quantize(tiny_llama, cfg, tiny_text)
    layer = tiny_llama.module.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.g_idx is not None  # act-order layout kept
    save_artifact(tiny_llama, tmp_path / "q")
    again = leanml.load(tmp_path / "q")
    again.tokenizer = CharTokenizer()
    ids = {"input_ids": torch.randint(0, 128, (1, 20))}
    assert torch.equal(output_tensor(again.call(ids)), output_tensor(tiny_llama.call(ids)))


# ----------------------------------------------------------------------------------------------------
# The Python entry points: a config object or a dict with a kind; anything else is a one-line error
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        (
            "w4",
            r"^leanml\.quantize takes a config object \(WeightOnly, Int8Dynamic, .*\) or a dict with a 'kind' "
            r"\(weight-only, int8-dynamic, .*\), got str 'w4'$",
        ),
        (None, r"leanml\.quantize takes a config object .*, got NoneType None$"),
        (8, r"got int 8$"),
        ({"bits": 8}, r"^leanml\.quantize got a config dict without a 'kind'; accepted kinds: weight-only, int8-dynamic"),
        ({"kind": "weight-only", "bits": 12}, r"^WeightOnly field 'bits' = 12 is not accepted"),
        ({"kind": "prune"}, r"^leanml\.quantize does not apply a Prune config \(kind 'prune'\); accepted kinds: weight-only"),
    ],
)
def test_quantize_refuses_what_is_not_a_config(mlp, config, message):
    handle = ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp")
    for verb in (leanml.quantize, quantize):
        with pytest.raises(LeanmlError, match=message) as info:
            verb(handle, config)
        assert "\n" not in str(info.value)
    assert isinstance(handle.module[0], torch.nn.Linear) and "applied" not in handle.meta


def test_quantize_takes_a_dict_with_a_kind(mlp):
    handle = leanml.quantize(
        ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp"),
        {"kind": "weight-only", "bits": 8, "method": "rtn", "group_size": None},
    )
    assert isinstance(handle.module[0], QuantLinear) and handle.meta["applied"][0]["bits"] == 8


def test_quantize_and_prune_need_a_handle(mlp, tmp_path):
    for verb, cfg in ((leanml.quantize, Int8Dynamic()), (leanml.prune, {"kind": "prune", "method": "magnitude"})):
        for wrong in (mlp, str(tmp_path / "m.pt")):
            with pytest.raises(LeanmlError, match=r"takes a ModelHandle \(from leanml\.load_model\), got (Sequential|str)"):
                verb(wrong, cfg)


@pytest.mark.parametrize(
    "config, message",
    [
        ("sparse-50", r"^leanml\.prune takes a config object \(Prune, GradualPrune, StructuredPrune\) .* got str 'sparse-50'$"),
        (None, r"^leanml\.prune takes a config object .* got NoneType None$"),
        ({"sparsity": 0.5}, r"^leanml\.prune got a config dict without a 'kind'; accepted kinds: prune, gradual-prune"),
        (WeightOnly(), r"^leanml\.prune does not apply a WeightOnly config \(kind 'weight-only'\)"),
    ],
)
def test_prune_refuses_what_is_not_a_config(mlp, config, message):
    with pytest.raises(LeanmlError, match=message) as info:
        leanml.prune(ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp"), config)
    assert "\n" not in str(info.value)


def test_prune_takes_a_dict_with_a_kind(mlp):
    from leanml.prune import SparseLinear

    handle = leanml.prune(
        ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp"), {"kind": "prune", "method": "magnitude"}
    )
    assert isinstance(handle.module[0], SparseLinear)
