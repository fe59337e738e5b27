"""Tiny random models of every supported family, built from transformers configs (no download).

``tiny_model(family)`` returns an eval-mode fp32 model (a causal LM for decoders, the bare encoder for
encoders) of a few hundred kB, with the family's distinctive features switched on: grouped-query
attention, biases (Qwen2), q/k norms (Qwen3, Gemma 3), sliding windows and soft-capping (Gemma 2/3),
fused projections (Phi-3), Conv1D and learned positions (GPT-2).
"""

from __future__ import annotations

import torch

DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2")
ENCODERS = ("bert", "roberta", "distilbert")
FAMILIES = DECODERS + ENCODERS
VOCAB = 96

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=576,
    tie_word_embeddings=False,
)


def config_for(family: str, **overrides):
    import transformers as tf

    c = dict(_COMMON)
    if family == "llama":
        cfg = tf.LlamaConfig(**{**c, "head_dim": 16}, **overrides)
    elif family == "mistral":
        cfg = tf.MistralConfig(**c, sliding_window=None, **overrides)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**c, **overrides)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**c, head_dim=16, **overrides)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**{**c, "tie_word_embeddings": True}, head_dim=16, **overrides)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(
            **{**c, "tie_word_embeddings": True},
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            **overrides,
        )
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **{**c, "tie_word_embeddings": True, "num_hidden_layers": 3},
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **overrides,
        )
    elif family == "phi3":
        cfg = tf.Phi3Config(**c, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    elif family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            n_positions=576,
            bos_token_id=1,
            eos_token_id=2,
            **overrides,
        )
    elif family == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=576,
            **overrides,
        )
    elif family == "roberta":
        cfg = tf.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=578,
            pad_token_id=1,
            **overrides,
        )
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=576, **overrides
        )
    else:
        raise ValueError(family)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of ``family``; weights are scaled so activations stay in a realistic range."""
    import transformers as tf

    cfg = config_for(family, **overrides)
    torch.manual_seed(seed)
    auto = tf.AutoModel if family in ENCODERS else tf.AutoModelForCausalLM
    kwargs = {"attn_implementation": "eager"}
    model = auto.from_config(cfg, **kwargs)
    with torch.no_grad():  # non-trivial norm weights, so scale folding is really exercised
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower() or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            if "post_attention_layernorm" in name and family in ("gemma2", "gemma3") or "post_feedforward" in name:
                # trained Gemma 2/3 post-norms have gains (1 + w) well below 1: a block adds a small
                # update to the residual stream (unit gains make every block overwrite it)
                p.copy_(-0.8 + 0.05 * torch.randn(p.shape, generator=gen))
    from leanml.models.arch import normalise

    normalise(model)  # as every loaded model is: GPT-2's Conv1D layers become nn.Linear
    return model.eval()


def no_adapter_model(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny causal LM of an architecture without an adapter (GPT-NeoX), for the refusals and the
    techniques that need only linear layers."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128
    )
    return GPTNeoXForCausalLM(config).eval()


def tokens(n: int = 24, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=gen)


CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,;:'!?-()"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def tokenizer(bos: bool = False):
    """A real character-level tokenizer (fast, vocabulary < 96); ``bos`` adds "<s>" at the start of every
    text (as Llama 3 and Gemma do)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


TEXT = " ".join(
    f"sentence {i} says the quick brown fox jumps over the lazy dog, and the cheap model runs fast." for i in range(60)
)


def corpus():
    from leanml.data import TextCorpus

    return TextCorpus(name="tiny", text=TEXT, eval_tokens=600, calib_start=1200)


def handle(family: str, seed: int = 0, bos: bool = False, **overrides):
    """A ModelHandle of the tiny ``family`` model with the character tokenizer."""
    from leanml.models import ModelHandle
    from leanml.models.inputs import default_example_inputs

    task = "sentence-embedding" if family in ENCODERS else "causal-lm"
    h = ModelHandle(module=tiny_model(family, seed, **overrides), task=task, name=f"tiny-{family}", tokenizer=tokenizer(bos))
    h.example_inputs = default_example_inputs(h)
    return h
