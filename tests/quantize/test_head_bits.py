"""The output head of a causal LM quantized with ``head_bits``, and the embedding tied to it."""

from __future__ import annotations

import torch

import leanml
from leanml.artifact import load_artifact, save_artifact
from leanml.config import WeightOnly
from leanml.quantize.modules import QuantEmbedding, QuantLinear


def test_head_bits_quantizes_tied_head_and_embedding_once(tiny_llama, tmp_path):
    emb_before = tiny_llama.module.model.embed_tokens.weight.detach().clone()
    leanml.quantize(tiny_llama, WeightOnly(bits=4, group_size=16, method="rtn", head_bits=8))
    model = tiny_llama.module
    head, emb = model.lm_head, model.model.embed_tokens
    assert isinstance(head, QuantLinear) and head.bits == 8 and head.symmetric
    assert isinstance(emb, QuantEmbedding) and emb.head is head
    # 8-bit symmetric per-row: every row is within half a step of the float row
    step = emb_before.abs().amax(1, keepdim=True) / 127
    assert ((emb.weight - emb_before).abs() <= step / 2 + 1e-7).all()
    ids = torch.tensor([[3, 9, 27]])
    assert torch.equal(emb(ids)[0], head.dequantize()[ids[0]])
    # the shared table is saved once and the reloaded model gives the same logits
    save_artifact(tiny_llama, tmp_path / "art")
    back = load_artifact(tmp_path / "art")
    assert isinstance(back.module.model.embed_tokens, QuantEmbedding)
    assert back.module.model.embed_tokens.head is back.module.lm_head
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back.module(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_head_bits_ignored_without_causal_head(mlp):
    from leanml.models import ModelHandle

    handle = ModelHandle(module=mlp, task="generic", name="mlp")
    handle.example_inputs = torch.randn(2, 20)
    leanml.quantize(handle, WeightOnly(bits=8, group_size=None, method="rtn", head_bits=8))
    assert all(isinstance(m, QuantLinear) for m in handle.module if isinstance(m, torch.nn.Module) and hasattr(m, "bits"))
