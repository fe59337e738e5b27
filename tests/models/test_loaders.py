"""Loading every accepted model format, and one-line errors for the rest."""

from __future__ import annotations

import pytest
import torch

from leanml.errors import LeanmlError
from leanml.models import ModelHandle, load_model, mean_pool, output_tensor
from leanml.models.loaders import cache_dir


def test_pickled_module_round_trip(tmp_path, mlp):
    path = tmp_path / "mlp.pt"
    torch.save(mlp, path)
    handle = load_model(path)
    assert handle.task == "generic" and handle.runtime == "torch"
    x = torch.randn(4, 20)
    torch.testing.assert_close(handle.call((x,)), mlp(x))
    # no data: the input shape is inferred from the first Linear layer, and the handle says so
    assert handle.example_inputs[0].shape == (8, 20) and "inferred" in handle.meta["example_inputs"]


def test_torchscript_file(tmp_path, mlp):
    path = tmp_path / "mlp.torchscript"
    torch.jit.trace(mlp, torch.randn(2, 20)).save(str(path))
    handle = load_model(path)
    x = torch.randn(3, 20)
    torch.testing.assert_close(handle.call((x,)), mlp(x))


def test_onnx_file_runs_on_onnxruntime(tmp_path, mlp):
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(mlp, (torch.randn(2, 20),), str(path), input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    handle = load_model(path)
    assert handle.runtime == "onnxruntime"
    x = torch.randn(3, 20)
    torch.testing.assert_close(handle.call((x,)), mlp(x), atol=1e-5, rtol=1e-4)
    assert handle.example_inputs["x"].shape[1] == 20


def test_hf_causal_lm_folder(tmp_path):
    from tests.conftest import tiny_llama_module

    module = tiny_llama_module()
    module.save_pretrained(tmp_path / "llama")
    handle = load_model(tmp_path / "llama")
    assert handle.task == "causal-lm" and handle.tokenizer is None
    ids = handle.example_inputs["input_ids"]
    assert ids.shape == (1, 64) and int(ids.max()) < 128
    torch.testing.assert_close(output_tensor(handle.call({"input_ids": ids})), module(input_ids=ids).logits)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_handle_rejects_unknown_task(mlp):
    with pytest.raises(ValueError, match="task 'vision'"):
        ModelHandle(module=mlp, task="vision", name="x")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: "no-such-model", "unknown model name 'no-such-model'"),
        (lambda p: str(p / "missing.pt"), "does not exist"),
        (lambda p: (p / "notes.txt").write_text("hello") and str(p / "notes.txt"), "unrecognised format '.txt'"),
        (lambda p: (p / "empty.pt").write_bytes(b"") or str(p / "empty.pt"), "is empty"),
        (lambda p: (p / "junk.pt").write_bytes(b"not a pickle") and str(p / "junk.pt"), "not a pickled nn.Module"),
        (lambda p: p.joinpath("d").mkdir() or str(p / "d"), "holds no config.json"),
    ],
)
def test_bad_model_inputs_give_one_line_errors(tmp_path, make, message):
    with pytest.raises(LeanmlError, match=message) as info:
        load_model(make(tmp_path))
    assert "\n" not in str(info.value)
    assert "accepted" in str(info.value) or "empty" in str(info.value) or "pickled" in str(info.value)


def test_state_dict_is_refused_with_a_hint(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(LeanmlError, match="state dict"):
        load_model(tmp_path / "sd.pt")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANML_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


@pytest.mark.real
def test_builtin_models_load_offline():
    lm = load_model("smollm2-135m")
    assert lm.task == "causal-lm" and lm.module.config.num_hidden_layers == 30
    assert sum(p.numel() for p in lm.module.parameters()) == 134_515_008
    enc = load_model("minilm-l6")
    assert enc.task == "sentence-embedding" and enc.max_length == 128
    assert enc.embed(["a sentence", "another one"]).shape == (2, 384)
