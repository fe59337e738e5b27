"""Layer-by-layer reading of a GGUF file: each tensor dequantized on demand, no fp32 copy of the model.

References: leanml's whole-file GGUF reader (``read_gguf_model``, which the in-memory load goes through)
for the lazily opened model, and the in-memory compression of the same file for the artifact written
layer by layer (the same tensors, exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leanml.artifact import load_artifact
from leanml.config import WeightOnly
from leanml.errors import LeanmlError
from leanml.export.gguf import export_gguf, read_gguf_model
from leanml.models import ModelHandle
from leanml.models.lazy import LAZY_KEY, GGUFWeights, materialize, on_meta, open_lazy
from leanml.pipeline import compress, layer_by_layer_plan
from tests.export.test_gguf_families import tokenizer  # noqa: F401 - the byte-level BPE fixture (GGUF has its vocabulary)
from tests.families import TEXT, tiny_model, tokens

pytest.importorskip("gguf")

RTN = {"name": "r", "steps": [{"kind": "weight-only", "bits": 4, "group_size": 16, "method": "rtn"}]}
GPTQ = {"name": "g", "steps": [{"kind": "weight-only", "bits": 4, "group_size": 16, "calib_windows": 4, "window": 64}]}


def _gguf(tmp_path, tok, family: str, quantize: dict | None = None):
    import leanml

    handle = ModelHandle(module=tiny_model(family), task="causal-lm", name=family, tokenizer=tok)
    if quantize is not None:
        handle = leanml.quantize(handle, WeightOnly(**quantize, method="rtn", mse_clip=False))
    path = tmp_path / f"{family}.gguf"
    export_gguf(handle, path)
    return path


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "qwen3"])
def test_lazy_gguf_reads_what_the_whole_reader_reads(tmp_path, tokenizer, family):  # noqa: F811
    # llama: rotary row permutation; gpt2: Conv1D and biases; gemma: 1 + w norms, tied head; qwen3: q/k norms
    path = _gguf(tmp_path, tokenizer, family, dict(bits=8, group_size=None, symmetric=True))  # Q8_0 blocks
    whole, tok = read_gguf_model(path)
    lazy = open_lazy(path)
    weights = lazy.meta[LAZY_KEY]
    assert isinstance(weights, GGUFWeights) and on_meta(lazy.module)
    assert 0 < weights.fp32_bytes() <= 4 * sum(p.numel() for p in whole.parameters()) + 4 * whole.lm_head.weight.numel()
    materialize(lazy.module, "", weights)
    assert not on_meta(lazy.module)
    ref = dict(whole.named_parameters())
    for name, p in lazy.module.named_parameters():
        r = ref[name] if family != "gpt2" or p.dim() != 2 or "wte" in name or "wpe" in name else ref[name].T
        assert torch.equal(p.detach(), r.detach().reshape(p.shape)), name
    ids = tokens(20)
    with torch.no_grad():
        a, b = whole(input_ids=ids).logits, lazy.module(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5)  # gpt2: Conv1D's addmm against nn.Linear's matmul
    if family == "gemma":
        assert lazy.module.lm_head.weight is lazy.module.model.embed_tokens.weight
    assert lazy.tokenizer(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


@pytest.mark.parametrize("recipe", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_layer_by_layer_from_gguf_writes_the_in_memory_result(tmp_path, tokenizer, monkeypatch, recipe):  # noqa: F811
    monkeypatch.setenv("LEANML_CACHE", str(tmp_path / "cache"))  # the in-memory load's fp32 conversion
    path = _gguf(tmp_path, tokenizer, "llama", dict(bits=4, group_size=32, symmetric=False))  # Q4_1 blocks
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    whole = compress(path, recipe, data=text, out=tmp_path / "whole", measure=False, lazy=False)
    lazy = compress(path, recipe, data=text, out=tmp_path / "lazy", measure=False, lazy=True)
    assert whole.out is not None and lazy.out is not None
    meta = json.loads((tmp_path / "lazy" / "leanml.json").read_text())
    assert len(meta["weights"]) == tiny_model("llama").config.num_hidden_layers + 1
    a, b = load_artifact(tmp_path / "whole"), load_artifact(tmp_path / "lazy")
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert b.tokenizer(TEXT)["input_ids"] == a.tokenizer(TEXT)["input_ids"]


def test_gguf_size_decides_and_refusals(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LEANML_CACHE", str(tmp_path / "cache"))
    path = _gguf(tmp_path, tokenizer, "llama")
    assert layer_by_layer_plan(path, RTN) is None  # small: loaded whole
    plan = layer_by_layer_plan(path, RTN, max_memory="1KB")
    assert plan is not None and plan[0] == path and plan[1] > 1000
    # a large GGUF opened lazily never writes the fp32 conversion the whole load caches
    compress(path, RTN, out=tmp_path / "o", measure=False, lazy=True)
    assert not (tmp_path / "cache" / "gguf").exists()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(LeanmlError, match="not a readable GGUF file"):
        layer_by_layer_plan(bad, RTN, lazy=True)
    with pytest.raises(LeanmlError, match="is not one"):
        open_lazy(path, task="sentence-embedding")


def _mapped_rss_kb(path) -> int | None:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps), None off Linux."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_reading_a_gguf_tensor_by_tensor_keeps_no_file_pages_resident(tmp_path, tokenizer):  # noqa: F811
    """The reader maps the whole file; each read unmaps what it touched, so a file larger than memory
    does not pile up in the process's resident memory (--max-memory would count it)."""
    from leanml.export.gguf import gguf_plan

    path = _gguf(tmp_path, tokenizer, "llama", {"bits": 8, "group_size": 32})
    plan = gguf_plan(path)
    if _mapped_rss_kb(path.resolve()) is None:
        pytest.skip("no /proc/self/smaps")
    for slot in plan.slots:
        assert plan.values(slot).numel() > 0
    assert _mapped_rss_kb(path.resolve()) == 0
    plan.by_name[plan.slots[0].name].data.sum()  # touching the map again makes pages resident: the probe sees them
    assert _mapped_rss_kb(path.resolve()) > 0
