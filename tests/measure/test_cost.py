"""Size, FLOPs and decoding against independent computations."""

from __future__ import annotations

import pytest
import torch

from leanml.measure.cost import (
    count_flops,
    count_params,
    decode_benchmark,
    disk_bytes,
    greedy_decode,
    weight_bytes,
)
from leanml.measure.profile import bytes_read_per_token
from leanml.models import ModelHandle


def test_mlp_flops_match_formula(mlp):
    handle = ModelHandle(module=mlp, task="generic", name="mlp")
    batch = 7
    # a Linear layer (in → out) costs 2·in·out FLOPs per row (multiply + add)
    expected = 2 * batch * (20 * 16 + 16 * 5)
    assert count_flops(handle, (torch.randn(batch, 20),)) == expected


def test_conv_flops_match_formula():
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, kernel_size=3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, kernel_size=3, stride=2)
    )
    handle = ModelHandle(module=conv, task="generic", name="cnn")
    b, h, w = 2, 16, 16
    out1 = h * w  # padding 1 keeps 16×16
    out2 = ((h - 3) // 2 + 1) ** 2  # 7×7
    expected = 2 * b * (8 * out1 * 3 * 9 + 4 * out2 * 8 * 9)
    assert count_flops(handle, (torch.randn(b, 3, h, w),)) == expected


def test_params_and_bytes_count_tied_weights_once(tiny_llama):
    m = tiny_llama.module
    assert m.lm_head.weight is m.model.embed_tokens.weight
    by_hand = sum(p.numel() for n, p in m.named_parameters(remove_duplicate=True))
    assert count_params(m) == by_hand
    # only persistent buffers are stored weights (the rotary inv_freq cache is not saved, so not counted)
    assert weight_bytes(m) == 4 * by_hand
    assert weight_bytes(m.half()) == 2 * by_hand
    m.register_buffer("stored", torch.zeros(10))
    assert weight_bytes(m) == 2 * by_hand + 40  # fp32 buffer registered after the cast


def test_bytes_read_per_token_skips_untied_embeddings():
    emb = torch.nn.Embedding(100, 8)
    model = torch.nn.Sequential(emb, torch.nn.Linear(8, 4))
    assert bytes_read_per_token(model) == (8 * 4 + 4) * 4
    tied = torch.nn.Sequential(emb, torch.nn.Linear(8, 100, bias=False))
    tied[1].weight = emb.weight
    assert bytes_read_per_token(tied) == 100 * 8 * 4


def test_disk_bytes_serialises_modified_models(mlp):
    handle = ModelHandle(module=mlp, task="generic", name="mlp")
    size, source = disk_bytes(handle)
    raw = sum(p.numel() * 4 for p in mlp.parameters())
    assert source.startswith("safetensors") and raw <= size < raw + 4096  # header of a few hundred bytes


def test_greedy_decode_matches_generate(tiny_llama):
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    _, steps, ids = greedy_decode(tiny_llama.module, prompt, new_tokens=10)
    ref = tiny_llama.module.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(ids, ref[:, 12:]) and len(steps) == 9


def test_decode_benchmark_reports_speeds(tiny_llama):
    prompt = torch.randint(0, 128, (1, 8))
    d = decode_benchmark(tiny_llama, prompt, new_tokens=6, repeats=2)
    assert d["step_s"]["n"] == 10 and d["decode_tokens_per_s"] > 0 and d["prefill_tokens_per_s"] > 0
    assert d["decode_tokens_per_s"] == pytest.approx(5 / (d["step_s"]["mean"] * 5), rel=0.5)
