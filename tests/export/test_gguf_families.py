"""GGUF export and load for every decoder family (tests/families.py's tiny random models).

Each family is exported F32 and as leanml's W8 (symmetric per channel -> Q8_0) and W4 RTN group 32
(asymmetric -> Q4_1, symmetric -> Q4_0) models, then read back three ways:

* the ``gguf`` package's reader: tensor names (mapped here, independently of the exporter, from the Hugging
  Face parameter names), shapes and types, and the values (F32 bit-exact but for Gemma's ``1 + w`` norms;
  quantized blocks within the fp16 rounding of their scales: <= 0.02 steps for Q4, <= 0.07 for Q8_0);
* transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``). It rebuilds llama, mistral, qwen2 and
  phi3 from the metadata alone; for qwen3 (no head_dim read), gemma2 (no query_pre_attn_scalar), gemma3 (no
  sliding pattern, query scalar or local rope base) and gpt2 (no n_inner, n_positions) its config mapping is
  lossy, so the original config is handed over and only its tensor mapping is tested; gemma it does not
  support at all. It also cannot load a llama-architecture file whose name says "mistral" (it asks gguf-py for
  a "mistral" architecture that gguf 0.19 does not have), so mistral is exported under a neutral name there;
* ``leanml.load_model`` (leanml's own reader, from the metadata alone, every family).

Logit tolerances: F32 files 1e-4 absolute (measured <= 4e-7). Quantized files, against torch running the
quantized model: a tenth of what quantization itself moved the logits (``max|quantized - float|``), since
the fp16 rounding of the block scales (and of Q4_1's offsets) is the only difference left; measured at most
0.042 of it (Q8_0), 0.013 (Q4_1), 0.003 (Q4_0); that is <= 2e-3 of max|logits|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leanml.config import WeightOnly
from leanml.errors import LeanmlError
from leanml.export.gguf import export_gguf
from leanml.models import ModelHandle
from tests.families import DECODERS, VOCAB, config_for, tiny_model, tokens

gguf = pytest.importorskip("gguf")

ARCH = {"mistral": "llama", "llama": "llama"}
TRANSFORMERS_FROM_METADATA = ("llama", "mistral", "qwen2", "phi3")
TRANSFORMERS_NEEDS_CONFIG = ("qwen3", "gemma2", "gemma3", "gpt2")
F32_TOL = 1e-4
Q_LOGIT_FRACTION = 0.1
QUANT = {  # name: (config, GGUF type, tolerance in quantization steps)
    "w8": (dict(bits=8, group_size=None, symmetric=True), "Q8_0", 0.07),
    "w4": (dict(bits=4, group_size=32, symmetric=False), "Q4_1", 0.02),
    "w4sym": (dict(bits=4, group_size=32, symmetric=True), "Q4_0", 0.02),
}

# Hugging Face names -> GGUF names (llama.cpp's tensor_mapping), written out here on purpose
_LLAMA_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA2_BLOCK = {
    **_LLAMA_BLOCK,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_PHI3_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GPT2_BLOCK = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_HF_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
}


def gguf_name(family: str, hf_param: str) -> str:
    module, _, leaf = hf_param.rpartition(".")
    if module in _HF_GLOBAL:
        return f"{_HF_GLOBAL[module]}.{leaf}"
    block = {"gemma2": _GEMMA2_BLOCK, "gemma3": _GEMMA2_BLOCK, "phi3": _PHI3_BLOCK, "gpt2": _GPT2_BLOCK}.get(family, _LLAMA_BLOCK)
    parts = module.split(".")  # model.layers.N.<rest> / transformer.h.N.<rest>
    return f"blk.{parts[2]}.{block['.'.join(parts[3:])]}.{leaf}"


def hf_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation (what transformers' loader does)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_hf(family: str, name: str, w: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor in the Hugging Face layout of its parameter."""
    if ARCH.get(family) == "llama" and (".attn_q." in name or ".attn_k." in name):
        w = hf_rows(w, 4 if ".attn_q." in name else 2)
    if family.startswith("gemma") and "norm.weight" in name:
        w = w - 1
    return w


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE fast tokenizer of 96 tokens trained here (offline, well under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)], trainer)
    assert tok.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


TEXT = "the lazy dog jumps over the quick brown fox 42"


def handle_of(family: str, tokenizer, name: str | None = None) -> ModelHandle:
    return ModelHandle(module=tiny_model(family), task="causal-lm", name=name or family, tokenizer=tokenizer)


def quantized(family: str, tokenizer, which: str) -> ModelHandle:
    import leanml

    handle = handle_of(family, tokenizer)
    return leanml.quantize(handle, WeightOnly(**QUANT[which][0], method="rtn", mse_clip=False))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.to(torch.float32)


def read(path) -> tuple[dict, gguf.GGUFReader]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, reader


def dequantized(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def transformers_model(family: str, folder, file: str):
    from transformers import AutoModelForCausalLM

    kwargs = {"config": config_for(family)} if family in TRANSFORMERS_NEEDS_CONFIG else {}
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("family", DECODERS)
def test_float_export_reloads_exactly(tmp_path, tokenizer, family, monkeypatch):
    import leanml

    monkeypatch.setenv("LEANML_CACHE", str(tmp_path / "cache"))
    handle = handle_of(family, tokenizer)
    model = handle.module
    report = export_gguf(handle, tmp_path / "f.gguf")
    assert report["fallback"] == [] and set(report["types"]) == {"F32"} and report["arch"] == ARCH.get(family, family)
    tensors, reader = read(tmp_path / "f.gguf")
    assert reader.fields["general.architecture"].contents() == ARCH.get(family, family)
    params = dict(model.named_parameters())  # a tied head is its embedding, named once
    assert set(tensors) == {gguf_name(family, n) for n in params}
    for hf, p in params.items():
        t = tensors[gguf_name(family, hf)]
        assert t.tensor_type.name == "F32" and tuple(reversed(t.shape.tolist())) == tuple(p.shape), hf
        got = to_hf(family, t.name, dequantized(t).reshape(p.shape))
        assert torch.allclose(got, p.detach(), rtol=0, atol=1e-6 if family.startswith("gemma") else 0), hf
    ids = tokens(24)
    ref = logits(model, ids)
    # leanml's loader rebuilds every family from the metadata alone
    back = leanml.load_model(tmp_path / "f.gguf")
    assert type(back.module).__name__ == type(model).__name__
    assert (logits(back.module, ids) - ref).abs().max() <= F32_TOL
    assert back.tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    # transformers' loader
    if family == "gemma":
        with pytest.raises(ValueError, match="architecture gemma is not supported"):
            transformers_model(family, tmp_path, "f.gguf")
        return
    if family == "mistral":  # transformers maps a "mistral" name to a gguf-py architecture that does not exist
        export_gguf(handle_of(family, tokenizer, name="tiny"), tmp_path / "tiny.gguf")
        other = transformers_model(family, tmp_path, "tiny.gguf")
    else:
        other = transformers_model(family, tmp_path, "f.gguf")
    assert (logits(other, ids) - ref).abs().max() <= F32_TOL


@pytest.mark.parametrize("which", list(QUANT))
@pytest.mark.parametrize("family", DECODERS)
def test_quantized_export_holds_leanml_codes(tmp_path, tokenizer, family, which, monkeypatch):
    import leanml
    from leanml.quantize.modules import QuantLinear

    monkeypatch.setenv("LEANML_CACHE", str(tmp_path / "cache"))
    _, expected, tol_steps = QUANT[which]
    handle = quantized(family, tokenizer, which)
    model = handle.module
    report = export_gguf(handle, tmp_path / "q.gguf", exact_only=True)
    tensors, _ = read(tmp_path / "q.gguf")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers and report["types"][expected] == len(layers)
    for name, layer in layers.items():
        t = tensors[gguf_name(family, f"{name}.weight")]
        assert t.tensor_type.name == expected, name
        w = to_hf(family, t.name, dequantized(t))
        steps = layer.scales[:, layer.group_index()]
        err = (w - layer.dequantize()).abs() / steps
        assert float(err.max()) <= tol_steps, (name, float(err.max()))
        assert report["tensors"][t.name]["max_err_steps"] <= tol_steps
    ids = tokens(24)
    ref = logits(model, ids)
    budget = Q_LOGIT_FRACTION * (ref - logits(tiny_model(family), ids)).abs().max()  # the same float weights
    back = leanml.load_model(tmp_path / "q.gguf")
    assert (logits(back.module, ids) - ref).abs().max() <= budget
    if family in TRANSFORMERS_FROM_METADATA + TRANSFORMERS_NEEDS_CONFIG and family != "mistral":
        other = transformers_model(family, tmp_path, "q.gguf")
        assert (logits(other, ids) - ref).abs().max() <= budget


def test_metadata_per_family(tmp_path, tokenizer):
    """The llama.cpp keys that differ between families."""
    fields = {}
    for family in ("gemma2", "gemma3", "gpt2", "qwen3", "phi3"):
        report = export_gguf(handle_of(family, tokenizer), tmp_path / f"{family}.gguf")
        fields[family] = ({k: f.contents() for k, f in read(tmp_path / f"{family}.gguf")[1].fields.items()}, report)
    g2, _ = fields["gemma2"]
    assert g2["gemma2.attn_logit_softcapping"] == 50.0 and g2["gemma2.final_logit_softcapping"] == 30.0
    assert g2["gemma2.attention.sliding_window"] == 8 and g2["gemma2.attention.key_length"] == 16
    assert g2["gemma2.attention.sliding_window_pattern"] == [True, False]
    g3, report = fields["gemma3"]
    assert g3["gemma3.rope.freq_base"] == 1e6 and g3["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert "gemma3.attn_logit_softcapping" not in g3
    assert any("llama.cpp's fixed gemma3 pattern [0, 1, 2]" in n for n in report["notes"])  # llama.cpp: every 6th global
    gpt2, _ = fields["gpt2"]
    cfg = config_for("gpt2")
    assert gpt2["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon, rel=1e-6)
    assert gpt2["gpt2.feed_forward_length"] == cfg.n_inner and gpt2["gpt2.context_length"] == cfg.n_positions
    assert "gpt2.rope.freq_base" not in gpt2 and "gpt2.attention.layer_norm_rms_epsilon" not in gpt2
    assert fields["qwen3"][0]["qwen3.attention.key_length"] == 16
    assert fields["phi3"][0]["tokenizer.ggml.padding_token_id"] == 0  # the config's, the tokenizer has none


def test_refusals_are_one_line(tmp_path, tokenizer):
    for module, task in ((tiny_model("bert"), "generic"), (torch.nn.Sequential(torch.nn.Linear(4, 4)), "generic")):
        with pytest.raises(
            LeanmlError, match=r"GGUF export supports the model families llama, mistral, .*gpt2; .* is not one"
        ) as err:
            export_gguf(ModelHandle(module=module, task=task, name="x"), tmp_path / "x.gguf")
        assert "\n" not in str(err.value)
    # llama.cpp's gemma architecture has no output tensor: an untied head cannot be written
    handle = handle_of("gemma", tokenizer)
    head = handle.module.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone() * 0.5)
    with pytest.raises(LeanmlError, match="always reuses token_embd as the output head") as err:
        export_gguf(handle, tmp_path / "g.gguf")
    assert "\n" not in str(err.value)
    handle = handle_of("llama", tokenizer)
    handle.module.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(LeanmlError, match="rope_type 'yarn'"):
        export_gguf(handle, tmp_path / "y.gguf")
    assert not any(tmp_path.iterdir())


def test_mistral_sliding_window_is_noted(tmp_path, tokenizer):
    model = tiny_model("mistral")
    model.config.sliding_window = 8
    report = export_gguf(ModelHandle(module=model, task="causal-lm", name="m", tokenizer=tokenizer), tmp_path / "m.gguf")
    assert any("no sliding-window attention" in n for n in report["notes"])


@pytest.mark.parametrize("family", DECODERS)
def test_f16_export(tmp_path, tokenizer, family, monkeypatch):
    """Float matrices in F16 (norms and biases stay F32): the weights are their fp16 roundings."""
    import leanml

    monkeypatch.setenv("LEANML_CACHE", str(tmp_path / "cache"))
    handle = handle_of(family, tokenizer)
    report = export_gguf(handle, tmp_path / "h.gguf", float_type="f16")
    tensors, _ = read(tmp_path / "h.gguf")
    for hf, p in handle.module.named_parameters():
        t = tensors[gguf_name(family, hf)]
        assert t.tensor_type.name == ("F16" if p.dim() == 2 else "F32"), hf
        if p.dim() == 2:
            assert torch.equal(to_hf(family, t.name, dequantized(t)), p.detach().half().float()), hf
    assert set(report["types"]) == {"F16", "F32"} and report["fallback"] == []
    ids = tokens(24)
    ref = logits(handle.module, ids)
    got = logits(leanml.load_model(tmp_path / "h.gguf").module, ids)
    assert (got - ref).abs().max() <= 5e-3 * ref.abs().max()  # measured <= 1.1e-3 (gemma3)


def test_per_layer_widths_are_refused(tmp_path, tokenizer):
    handle = handle_of("llama", tokenizer)
    mlp = handle.module.model.layers[1].mlp
    hidden, width = handle.module.config.hidden_size, mlp.down_proj.in_features // 2
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(hidden, width, bias=False), torch.nn.Linear(hidden, width, bias=False)
    mlp.down_proj = torch.nn.Linear(width, hidden, bias=False)
    with pytest.raises(LeanmlError, match="block 1 of this model differs from block 0") as err:
        export_gguf(handle, tmp_path / "p.gguf")
    assert "\n" not in str(err.value)


def test_a_loaded_gguf_file_is_measured_on_disk_as_the_file(tmp_path, tokenizer, monkeypatch):
    """Not the fp32 folder it is converted to and cached in."""
    import leanml
    from leanml.measure.cost import disk_bytes

    monkeypatch.setenv("LEANML_CACHE", str(tmp_path / "cache"))
    export_gguf(quantized("llama", tokenizer, next(iter(QUANT))), tmp_path / "q.gguf")
    back = leanml.load_model(tmp_path / "q.gguf")
    size, where = disk_bytes(back)
    assert (size, where) == ((tmp_path / "q.gguf").stat().st_size, str(tmp_path / "q.gguf"))
    cache = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert cache > 2 * size  # the dequantised cache is far larger: measuring it would be wrong
