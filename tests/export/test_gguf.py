"""GGUF export: leanml's own codes written as GGUF blocks, read back by gguf-py and transformers.

Tolerances (why they are what they are):

* weights: GGUF stores each block's scale ``d`` (and offset ``m``) in fp16, so a weight read back differs from
  leanml's by at most ``(|q - offset| + |zero|) * 2**-11`` quantization steps (< 0.015 for 4 bits, < 0.031 for
  asymmetric 5 bits, < 0.063 for symmetric 8 bits); the tests allow 0.02 / 0.035 / 0.07 steps. Float
  matrices written as F32 are bit-exact.
* logits: those weight differences move the tiny model's logits by up to ~7e-4 of their largest value (a
  wrong q/k row order moves them by ~6e-3); the tests allow ``2e-3 * max|logits|`` and also compare the
  loaded weights themselves. The float F32 export is checked to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanml.config import WeightOnly
from leanml.errors import LeanmlError
from leanml.export.gguf import export_gguf
from leanml.models import ModelHandle

gguf = pytest.importorskip("gguf")

SENTENCES = [f"sentence number {i} says the quick brown fox jumps over the lazy dog." for i in range(40)] + [
    "Hello world, this is a GGUF export test with digits 12345 and punctuation!?"
]
TEXT = "the quick brown fox says hello to the lazy dog 42 times."


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE fast tokenizer trained here (offline, < 1 s), 300 tokens, <|endoftext|> = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny_llama(tokenizer, seed: int = 0) -> ModelHandle:
    """hidden 64, 2 layers, 4 heads / 2 kv heads (head_dim 16), 320 embedding rows (20 more than tokens), tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms so that a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    handle = ModelHandle(module=model, task="causal-lm", name="tiny-llama-bpe", tokenizer=tokenizer)
    handle.example_inputs = {"input_ids": torch.tensor([tokenizer(TEXT)["input_ids"]])}
    return handle


def quantized(tokenizer, bits: int, group_size: int | None, symmetric: bool, head_bits: int | None = None) -> ModelHandle:
    import leanml

    handle = tiny_llama(tokenizer)
    cfg = WeightOnly(bits=bits, group_size=group_size, symmetric=symmetric, method="rtn", mse_clip=False, head_bits=head_bits)
    return leanml.quantize(handle, cfg)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.to(torch.float32)


def read_tensors(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, reader


def gguf_weight(t) -> torch.Tensor:
    """A GGUF tensor dequantized by gguf-py, in torch (rows, cols) order."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def hf_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation (what transformers' loader does)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def steps(layer) -> torch.Tensor:
    """Each weight's quantization step (its group's scale)."""
    return layer.scales[:, layer.group_index()]


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "expected", "tol_steps"),
    [
        (4, 32, False, "Q4_1", 0.02),
        (4, 64, True, "Q4_0", 0.02),
        (8, None, True, "Q8_0", 0.07),
        (5, 32, False, "Q5_1", 0.035),
        (3, 64, False, "Q4_1", 0.02),
        (5, 64, True, "Q5_0", 0.02),
        (6, 32, False, "Q8_0", 0.035),
    ],
)
def test_blocks_hold_leanml_codes(tmp_path, bpe_tokenizer, bits, group, symmetric, expected, tol_steps):
    handle = quantized(bpe_tokenizer, bits, group, symmetric, head_bits=8)
    report = export_gguf(handle, tmp_path / "m.gguf")
    tensors, reader = read_tensors(tmp_path / "m.gguf")
    model = handle.module
    assert report["fallback"] == [] and report["tied"] and report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert "output.weight" not in tensors  # the quantized head is tied to the embedding: written once
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"  # head_bits=8: symmetric per channel
    head = model.lm_head
    assert (gguf_weight(tensors["token_embd.weight"]) - head.dequantize()).abs().le(0.07 * steps(head)).all()
    for i, layer in enumerate(model.model.layers):
        for gname, module, n_head in (
            ("attn_q", layer.self_attn.q_proj, 4),
            ("attn_k", layer.self_attn.k_proj, 2),
            ("attn_v", layer.self_attn.v_proj, None),
            ("attn_output", layer.self_attn.o_proj, None),
            ("ffn_gate", layer.mlp.gate_proj, None),
            ("ffn_up", layer.mlp.up_proj, None),
            ("ffn_down", layer.mlp.down_proj, None),
        ):
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type.name == expected, gname
            w = gguf_weight(t)
            w = w if n_head is None else hf_rows(w, n_head)
            err = (w - module.dequantize()).abs()
            assert err.le(tol_steps * steps(module)).all(), (gname, float((err / steps(module)).max()))
            assert report["tensors"][f"blk.{i}.{gname}.weight"]["max_err_steps"] <= tol_steps
        for gname, norm in (("attn_norm", layer.input_layernorm), ("ffn_norm", layer.post_attention_layernorm)):
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type.name == "F32" and torch.equal(gguf_weight(t), norm.weight.detach())
    assert report["types"][expected] == 14 + (expected == "Q8_0") and report["types"]["F32"] == 5
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.vocab_size"].contents() == 320
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"].data) == 320


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fast_unpack_matches_codes(bits):
    from leanml.export.gguf import _codes
    from leanml.quantize.gptq import rtn_quantize_weight
    from leanml.quantize.modules import QuantLinear

    linear = torch.nn.Linear(96, 5)
    for symmetric in (False, True):
        layer = QuantLinear.from_quantized(linear, rtn_quantize_weight(linear.weight.detach(), bits, 32, symmetric))
        assert torch.equal(_codes(layer), layer.codes())


def test_transformers_round_trip_logits(tmp_path, bpe_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    handle = quantized(bpe_tokenizer, 4, 32, False, head_bits=8)
    export_gguf(handle, tmp_path / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = handle.example_inputs["input_ids"]
    assert tok(TEXT)["input_ids"] == ids[0].tolist()  # same vocabulary, merges and split
    ref, got = logits(handle.module, ids), logits(model, ids)
    assert (got - ref).abs().max() <= 2e-3 * ref.abs().max()
    # the loaded weights are leanml's, rows of q/k back in Hugging Face order (the rotary permutation undone)
    for name, module in handle.module.named_modules():
        if type(module).__name__ == "QuantLinear":
            loaded = model.get_submodule(name).weight.detach()
            assert (loaded - module.dequantize()).abs().le(0.07 * steps(module)).all(), name


def test_leanml_load_round_trip_untied_and_float(tmp_path, bpe_tokenizer, monkeypatch):
    """An asymmetric 4-bit model whose float head is untied (written as output.weight in F32), loaded back by
    leanml.load (transformers + gguf, converted to fp32)."""
    from transformers import LlamaForCausalLM

    import leanml

    monkeypatch.setenv("LEANML_CACHE", str(tmp_path / "cache"))
    handle = tiny_llama(bpe_tokenizer)
    model: LlamaForCausalLM = handle.module
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)  # untie
    leanml.quantize(handle, WeightOnly(bits=4, group_size=64, method="rtn", mse_clip=False))
    report = export_gguf(handle, tmp_path / "untied.gguf")
    assert not report["tied"] and report["tensors"]["output.weight"]["type"] == "F32"
    assert report["tensors"]["token_embd.weight"]["type"] == "F32"
    back = leanml.load(tmp_path / "untied.gguf")
    assert not back.module.config.tie_word_embeddings
    ids = handle.example_inputs["input_ids"]
    ref, got = logits(model, ids), logits(back.module, ids)
    assert (got - ref).abs().max() <= 2e-3 * ref.abs().max()
    assert back.tokenizer(TEXT)["input_ids"] == ids[0].tolist()


def test_float_model_exports_exactly(tmp_path, bpe_tokenizer):
    from transformers import AutoModelForCausalLM

    handle = tiny_llama(bpe_tokenizer)
    report = export_gguf(handle, tmp_path / "f.gguf")
    assert report["types"] == {"F32": 20} and report["tied"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f.gguf", dtype=torch.float32).eval()
    ids = handle.example_inputs["input_ids"]
    assert torch.allclose(logits(model, ids), logits(handle.module, ids), atol=1e-5, rtol=0)
    report16 = export_gguf(handle, tmp_path / "f16.gguf", float_type="f16")
    assert report16["types"] == {"F16": 15, "F32": 5} and report16["bytes"] < report["bytes"]


def test_act_order_and_odd_groups_fall_back_to_f16(tmp_path, bpe_tokenizer):
    from leanml.quantize.gptq import gptq_quantize_weight, rtn_quantize_weight
    from leanml.quantize.modules import QuantLinear

    handle = tiny_llama(bpe_tokenizer)
    attn, mlp = handle.module.model.layers[0].self_attn, handle.module.model.layers[0].mlp
    torch.manual_seed(1)
    X = torch.randn(256, 64) * torch.linspace(0.1, 3.0, 64)[torch.randperm(64)]  # distinct diag H: act order permutes
    qw = gptq_quantize_weight(attn.v_proj.weight.detach(), X.T @ X / 256, 4, 32, act_order=True, static_groups=False)
    attn.v_proj = QuantLinear.from_quantized(attn.v_proj, qw)
    assert attn.v_proj.g_idx is not None  # groups are not contiguous
    mlp.up_proj = QuantLinear.from_quantized(mlp.up_proj, rtn_quantize_weight(mlp.up_proj.weight.detach(), 4, 16))
    mlp.gate_proj = QuantLinear.from_quantized(mlp.gate_proj, rtn_quantize_weight(mlp.gate_proj.weight.detach(), 8, None))
    report = export_gguf(handle, tmp_path / "fb.gguf")
    reasons = {f["tensor"]: f["reason"] for f in report["fallback"]}
    assert set(reasons) == {"blk.0.attn_v.weight", "blk.0.ffn_up.weight", "blk.0.ffn_gate.weight"}
    assert "act-order" in reasons["blk.0.attn_v.weight"]
    assert "group size 16 is not a multiple" in reasons["blk.0.ffn_up.weight"]
    assert "int8" in reasons["blk.0.ffn_gate.weight"] and "symmetric" in reasons["blk.0.ffn_gate.weight"]
    tensors, _ = read_tensors(tmp_path / "fb.gguf")
    t = tensors["blk.0.attn_v.weight"]
    assert t.tensor_type.name == "F16"
    ref = attn.v_proj.dequantize()
    assert torch.allclose(gguf_weight(t), ref, rtol=2**-10, atol=0)  # fp16 rounding of the dequantized weight
    with pytest.raises(LeanmlError, match=r"blk\.0\.attn_v\.weight .*act-order.*and 2 more"):
        export_gguf(handle, tmp_path / "exact.gguf", exact_only=True)
    assert not (tmp_path / "exact.gguf").exists()


def test_refuses_overwrite_and_other_architectures(tmp_path, bpe_tokenizer, mlp):
    handle = tiny_llama(bpe_tokenizer)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(LeanmlError, match="exists; pass --force") as err:
        export_gguf(handle, target)
    assert "\n" not in str(err.value) and target.read_bytes() == b"old"
    export_gguf(handle, target, force=True)
    assert target.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)).eval()
    for model in (neox, mlp):
        with pytest.raises(LeanmlError, match="GGUF export supports the model families llama, .*gpt2") as err:
            export_gguf(ModelHandle(module=model, task="generic", name="x"), tmp_path / "x.gguf")
        assert "\n" not in str(err.value)
    with pytest.raises(LeanmlError, match="float_type 'bf16'"):
        export_gguf(handle, tmp_path / "y.gguf", float_type="bf16")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_tokenizer_copied_from_source_gguf(tmp_path, bpe_tokenizer):
    """A model first loaded from a GGUF keeps that file's tokenizer metadata when its handle has no tokenizer."""
    from transformers import AutoTokenizer

    handle = tiny_llama(bpe_tokenizer)
    export_gguf(handle, tmp_path / "src.gguf")
    bare = ModelHandle(module=handle.module, task="causal-lm", name="bare", source=str(tmp_path / "src.gguf"))
    report = export_gguf(bare, tmp_path / "out" / "copy.gguf")
    assert report["tokenizer"] == "copied" and "copied from the source GGUF src.gguf" in report["notes"][0]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="copy.gguf")
    assert tok(TEXT)["input_ids"] == bpe_tokenizer(TEXT)["input_ids"]
    report = export_gguf(ModelHandle(module=handle.module, task="causal-lm", name="none"), tmp_path / "none.gguf")
    assert report["tokenizer"] is None and "carries no vocabulary" in report["notes"][0]


def test_other_leanml_layers(tmp_path, bpe_tokenizer):
    """W8A8 int8 weights are exact Q8_0 (activation quantization is the runtime's); fp16-cast layers are F16;
    NF4 codebooks have no GGUF block type and fall back to F16."""
    import leanml
    from leanml.config import Codebook, FloatCast, Int8Dynamic

    handle = tiny_llama(bpe_tokenizer)
    leanml.quantize(handle, Int8Dynamic(targets=["re:.*self_attn\\.(q|k|v|o)_proj"]))
    leanml.quantize(handle, FloatCast(targets=["re:.*mlp\\.(gate|up)_proj"]))
    leanml.quantize(handle, Codebook(method="nf4", block_size=32, targets=["re:.*mlp\\.down_proj"]))
    report = export_gguf(handle, tmp_path / "mixed.gguf")
    types = {name: info["type"] for name, info in report["tensors"].items()}
    assert types["blk.0.attn_q.weight"] == types["blk.1.attn_output.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "F16"
    assert [f["tensor"] for f in report["fallback"]] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert "nf4 codebook" in report["fallback"][0]["reason"]
    assert any("W8A8" in note for note in report["notes"])
    tensors, _ = read_tensors(tmp_path / "mixed.gguf")
    q = handle.module.model.layers[0].self_attn.q_proj
    w = hf_rows(gguf_weight(tensors["blk.0.attn_q.weight"]), 4)
    assert (w - q.weight).abs().le(0.07 * q.w_scale[:, None]).all()
    gate = handle.module.model.layers[0].mlp.gate_proj
    assert torch.equal(gguf_weight(tensors["blk.0.ffn_gate.weight"]), gate.weight.float())


@pytest.mark.real
def test_real_smollm2_w4_rtn_round_trip(tmp_path):
    """SmolLM2-135M with its first 10 blocks 4-bit asymmetric RTN g64 (all 30 would triple the ~40 s of quantizing
    and dequantizing, not the export's checks) and an 8-bit head: those linear layers exact Q4_1, the tied
    head/embedding Q8_0, the rest F32; transformers' perplexity on the GGUF matches leanml's within 1 % (measured
    0.08 % here, 0.25 % with all 30 blocks quantized: SmolLM2 is that sensitive - random weight noise of the same
    size, 0.006 quantization steps, moves it as much)."""
    from transformers import AutoModelForCausalLM

    import leanml

    handle = leanml.load("smollm2-135m")
    leanml.quantize(
        handle,
        WeightOnly(bits=4, group_size=64, method="rtn", mse_clip=False, head_bits=8, targets=["re:^model\\.layers\\.[0-9]\\."]),
    )
    report = export_gguf(handle, tmp_path / "smol.gguf")
    assert report["fallback"] == [] and report["tied"]
    assert report["types"] == {"Q8_0": 1, "Q4_1": 70, "F32": 61 + 140}
    assert report["tokenizer"] == "gpt2"
    reader = gguf.GGUFReader(str(tmp_path / "smol.gguf"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"  # taken from the source GGUF
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smol.gguf", dtype=torch.float32).eval()
    text = (
        "The quick brown fox jumps over the lazy dog. Machine learning models can be compressed by quantizing "
        "their weights to four bits, which makes them smaller and faster to run on ordinary computers."
    )
    ids = torch.tensor([handle.tokenizer(text)["input_ids"]])

    def ppl(m):
        with torch.no_grad():
            return float(torch.exp(m(input_ids=ids, labels=ids).loss))

    ref, got = ppl(handle.module), ppl(model)
    assert abs(got - ref) <= 1e-2 * ref, (got, ref)
