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


@pytest.mark.parametrize("technique", ["w4-g4", "w8", "int8-dynamic", "int8-static", "kmeans4", "torch-dynamic"])
def test_a_quantized_model_has_as_many_params_as_its_float_original(technique):
    """Quantized layers store their weights as integer codes in buffers: they still count, by hand."""
    import copy

    from leanml.config import Codebook, Int8Dynamic, Int8Static, WeightOnly
    from leanml.data import TensorData
    from leanml.quantize.api import quantize

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 12), torch.nn.ReLU()
    )
    net.append(torch.nn.Linear(12, 4, bias=False)).eval()
    by_hand = (8 * 9 + 8) + (8 * 64 * 12 + 12) + 12 * 4
    assert count_params(net) == by_hand
    x = torch.rand(32, 1, 8, 8)
    if technique == "torch-dynamic":
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(net), {torch.nn.Linear}, dtype=torch.qint8)
        assert type(q[3]).__module__.startswith("torch.ao.nn.quantized")
    else:
        config = {
            "w4-g4": WeightOnly(bits=4, group_size=4, method="rtn"),
            "w8": WeightOnly(bits=8, group_size=None, method="rtn"),
            "int8-dynamic": Int8Dynamic(),
            "int8-static": Int8Static(observer="minmax"),
            "kmeans4": Codebook(method="kmeans", bits=4),
        }[technique]
        data = TensorData(name="toy", x=x, y=net(x).argmax(-1))
        q = quantize(ModelHandle(module=copy.deepcopy(net), task="generic", name="cnn"), config, data).module
        assert type(q[3]).__name__ != "Linear"
    assert count_params(q) == by_hand
    assert weight_bytes(q) < weight_bytes(net)  # fewer bytes, the same number of weights


def test_a_quantized_tied_head_counts_once(tiny_llama):
    import copy

    from leanml.config import WeightOnly
    from leanml.quantize.api import quantize

    before = count_params(tiny_llama.module)
    cfg = WeightOnly(bits=8, group_size=None, method="rtn", mse_clip=False, head_bits=8)  # the tied head too
    q = quantize(copy.deepcopy(tiny_llama), cfg)
    assert type(q.module.lm_head).__name__ == "QuantLinear"
    assert count_params(q.module) == before


def test_memory_bandwidth_counts_the_bytes_read_once_per_pass(monkeypatch):
    """Read bandwidth = buffer bytes / best pass time (a fake clock: each pass takes 1 ms, the best 0.5
    ms), and the pass reads the buffer: a sum over all of it."""
    import leanml.measure.system as system

    ticks = iter([0.0, 0.001, 1.0, 1.0005, 2.0, 2.001])
    monkeypatch.setattr(system.time, "perf_counter", lambda: next(ticks))
    sums = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: sums.append(self.numel()) or real_sum(self, *a, **k))
    gbs = system.memory_bandwidth_gbs(megabytes=4, repeats=3)
    assert gbs == pytest.approx(4 * 1024 * 1024 / 0.0005 / 1e9)
    assert sums == [1024 * 1024] * 4  # one warm pass, three timed, each over the whole buffer
