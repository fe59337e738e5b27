"""The adapters: one entry per model family, keyed by the transformers ``model_type``."""

from __future__ import annotations

from .spec import Arch

_LLAMA_BLOCK = dict(
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)
_DECODER = dict(kind="decoder", layers="layers", embed="embed_tokens", final_norm="norm", head="lm_head")

LLAMA = Arch("llama", ("llama",), **_DECODER, **_LLAMA_BLOCK, rotate=True, gguf="llama", onnx_llm=True)
MISTRAL = Arch("mistral", ("mistral",), **_DECODER, **_LLAMA_BLOCK, rotate=True, gguf="llama", onnx_llm=True)
QWEN2 = Arch("qwen2", ("qwen2",), **_DECODER, **_LLAMA_BLOCK, rotate=True, gguf="qwen2", onnx_llm=True)
QWEN3 = Arch(
    "qwen3",
    ("qwen3",),
    **_DECODER,
    **_LLAMA_BLOCK,
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    rotate=True,
    gguf="qwen3",
    onnx_llm=True,
)
_GEMMA = dict(
    **_DECODER,
    **{**_LLAMA_BLOCK, "mlp_norm": "pre_feedforward_layernorm"},
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    norm="rms+1",
    embed_scale="sqrt_hidden",
)
GEMMA = Arch(
    "gemma",
    ("gemma",),
    **{**_DECODER, **_LLAMA_BLOCK},
    norm="rms+1",
    embed_scale="sqrt_hidden",
    rotate=True,
    gguf="gemma",
    onnx_llm=True,
)
GEMMA2 = Arch("gemma2", ("gemma2",), **_GEMMA, gguf="gemma2", onnx_llm=True)
GEMMA3 = Arch(
    "gemma3",
    ("gemma3_text",),
    **_GEMMA,
    q_norm="self_attn.q_norm",
    k_norm="self_attn.k_norm",
    gguf="gemma3",
    onnx_llm=True,
)
PHI3 = Arch(
    "phi3",
    ("phi3",),
    **_DECODER,
    qkv="self_attn.qkv_proj",
    o="self_attn.o_proj",
    gate_up="mlp.gate_up_proj",
    down="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    rotate=True,
    gguf="phi3",
    onnx_llm=True,
)
GPT2 = Arch(
    "gpt2",
    ("gpt2",),
    kind="decoder",
    layers="h",
    embed="wte",
    final_norm="ln_f",
    head="lm_head",
    positions="wpe",
    attn="attn",
    qkv="attn.c_attn",
    o="attn.c_proj",
    up="mlp.c_fc",
    down="mlp.c_proj",
    attn_norm="ln_1",
    mlp_norm="ln_2",
    norm="layer",
    gated=False,
    cfg_ffn="n_inner",
    cfg_heads="n_head",
    cfg_kv_heads=None,
    cfg_head_dim=None,
    cfg_layers="n_layer",
    cfg_hidden="n_embd",
    cfg_eps="layer_norm_epsilon",
    gguf="gpt2",
    onnx_llm=True,
)
_BERT = dict(
    kind="encoder",
    layers="encoder.layer",
    embed="embeddings.word_embeddings",
    attn="attention.self",
    mlp="intermediate",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
    norm="layer",
    gated=False,
    cfg_kv_heads=None,
    cfg_head_dim=None,
    cfg_eps="layer_norm_eps",
)
BERT = Arch("bert", ("bert",), **_BERT)
ROBERTA = Arch("roberta", ("roberta", "xlm-roberta", "camembert"), **_BERT)
DISTILBERT = Arch(
    "distilbert",
    ("distilbert",),
    kind="encoder",
    layers="transformer.layer",
    embed="embeddings.word_embeddings",
    attn="attention",
    mlp="ffn",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    o="attention.out_lin",
    up="ffn.lin1",
    down="ffn.lin2",
    norm="layer",
    gated=False,
    cfg_ffn="hidden_dim",
    cfg_heads="n_heads",
    cfg_kv_heads=None,
    cfg_head_dim=None,
    cfg_layers="n_layers",
    cfg_hidden="dim",
    cfg_eps="layer_norm_eps",
)

ADAPTERS: tuple[Arch, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3, GPT2, BERT, ROBERTA, DISTILBERT)
BY_MODEL_TYPE: dict[str, Arch] = {t: a for a in ADAPTERS for t in a.model_types}
