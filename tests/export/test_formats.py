"""`leanml export`: each format reloads and gives the same outputs; targets are never clobbered."""

from __future__ import annotations

import copy

import pytest
import torch

import leanml
from leanml.accelerate.llm_onnx import OrtCausalLM
from leanml.config import WeightOnly
from leanml.errors import LeanmlError
from leanml.export.formats import export
from leanml.models import ModelHandle
from tests.accelerate.test_llm_onnx import _llama
from tests.conftest import CharTokenizer


@pytest.fixture(scope="module")
def w4_llama():
    from leanml.data import TextCorpus

    body = " ".join(f"sentence number {i} says the quick brown fox jumps over the lazy dog." for i in range(80))
    handle = ModelHandle(module=_llama(), task="causal-lm", name="tiny", tokenizer=CharTokenizer())
    leanml.quantize(
        handle,
        WeightOnly(bits=4, group_size=32, method="gptq", act_order=True, head_bits=8, calib_windows=4, window=64),
        TextCorpus(name="t", text=body, eval_tokens=600, calib_start=1200),
    )
    return handle


def test_onnx_export_of_a_quantized_llm_reloads_with_same_logits(w4_llama, tmp_path):
    report = export(w4_llama, "onnx", tmp_path / "m.onnx", accuracy_level=0)
    # a small graph is one self-contained file (published by one rename); nothing else is left beside it
    assert report["nbits"] == 15 and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert report["bytes"] == (tmp_path / "m.onnx").stat().st_size
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ref = w4_llama.module(input_ids=x).logits
    torch.testing.assert_close(OrtCausalLM(tmp_path / "m.onnx", threads=1)(input_ids=x).logits, ref, rtol=0, atol=2e-5)
    with pytest.raises(LeanmlError, match="exists; pass --force"):
        export(w4_llama, "onnx", tmp_path / "m.onnx")


def test_a_large_llm_graph_keeps_a_weights_file_and_replaces_the_old_pair(w4_llama, tmp_path, monkeypatch):
    from leanml.export import formats

    monkeypatch.setattr(formats, "SINGLE_FILE_LIMIT", 0)  # as if the graph were over protobuf's 2 GB
    export(w4_llama, "onnx", tmp_path / "m.onnx", accuracy_level=0)
    (first,) = [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")]
    export(w4_llama, "onnx", tmp_path / "m.onnx", accuracy_level=0, force=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and "m.onnx" in names and first not in names  # the old weights file went with its graph
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ref = w4_llama.module(input_ids=x).logits
    torch.testing.assert_close(OrtCausalLM(tmp_path / "m.onnx", threads=1)(input_ids=x).logits, ref, rtol=0, atol=2e-5)


def test_safetensors_export_reloads(w4_llama, tmp_path):
    report = export(w4_llama, "safetensors", tmp_path / "art")
    back = leanml.load(str(tmp_path / "art"))
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back.module(input_ids=x).logits, w4_llama.module(input_ids=x).logits, rtol=0, atol=1e-5)
    assert report["bytes"] > 0


def test_onnx_export_of_a_generic_model(mlp, tmp_path):
    handle = ModelHandle(module=copy.deepcopy(mlp), task="generic", name="mlp")
    handle.example_inputs = (torch.randn(4, 20),)
    export(handle, "onnx", tmp_path / "mlp.onnx")
    back = leanml.load(str(tmp_path / "mlp.onnx"))
    x = torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(back.call((x,)), mlp(x), rtol=0, atol=1e-4)


def test_bad_export_requests(mlp, w4_llama, tmp_path):
    handle = ModelHandle(module=mlp, task="generic", name="mlp")
    with pytest.raises(LeanmlError, match="format 'tflite' is not one of onnx, safetensors, gguf"):
        export(handle, "tflite", tmp_path / "x")
    with pytest.raises(LeanmlError, match="GGUF holds causal LMs"):
        export(handle, "gguf", tmp_path / "x.gguf")
    with pytest.raises(LeanmlError, match="dtype 'int3'"):
        export(handle, "onnx", tmp_path / "x.onnx", dtype="int3")
    with pytest.raises(LeanmlError, match="fp16 is offered for other models"):
        export(w4_llama, "onnx", tmp_path / "y.onnx", dtype="fp16")


def test_cli_export_refuses_to_clobber(tmp_path, capsys):
    from leanml.cli import main

    target = tmp_path / "exists.onnx"
    target.write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["export", "no-such-model-folder", "--format", "onnx", "--out", str(target)])
    assert exc.value.code == 2 and target.read_text() == "mine"
    assert "exists" in capsys.readouterr().err
