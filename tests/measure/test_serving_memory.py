"""`serving_memory`: peak memory of a fresh process that serves only the model.

Every measurement spawns ``python -m leanml.measure.serving``; the Popen it makes is recorded so the
tests can check that the child (and its process group) is gone afterwards, also after a timeout or an
interrupt, and that the temporary folder is removed.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
from pathlib import Path

import pytest
import torch

import leanml
from leanml.accelerate.runtimes import prepare
from leanml.config import WeightOnly
from leanml.errors import LeanmlError
from leanml.measure import serving
from leanml.measure.serving import serving_memory
from leanml.models import ModelHandle
from tests.families import corpus, handle


class Recorder:
    """Keeps every child process ``serving_memory`` starts and the spec it was given."""

    def __init__(self, monkeypatch, interrupt: bool = False):
        self.procs: list[subprocess.Popen] = []
        self.specs: list[dict] = []
        recorder = self

        class Recording(subprocess.Popen):
            def __init__(self, argv, **kwargs):
                recorder.specs.append(json.loads(Path(argv[-1]).read_text()))
                recorder.spec_dirs.append(Path(argv[-1]).parent)
                super().__init__(argv, **kwargs)
                recorder.procs.append(self)

            def wait(self, timeout=None):
                if interrupt and not getattr(self, "_interrupted", False):
                    self._interrupted = True
                    raise KeyboardInterrupt
                return super().wait(timeout)

        self.spec_dirs: list[Path] = []
        monkeypatch.setattr(serving.subprocess, "Popen", Recording)

    def assert_gone(self) -> None:
        assert self.procs, "no child process was started"
        for proc in self.procs:
            assert proc.returncode is not None  # reaped
            with pytest.raises(ProcessLookupError):
                os.kill(proc.pid, 0)
            with pytest.raises(ProcessLookupError):
                os.killpg(proc.pid, 0)  # nor anything of its process group
        for folder in self.spec_dirs:
            assert not folder.exists()


def check_result(result: dict, runtime: str) -> None:
    assert result["runtime"] == runtime
    assert result["method"] == "VmHWM"  # Linux: the kernel's high-water mark
    assert 0 < result["idle_bytes"] <= result["loaded_bytes"] <= result["peak_bytes"]
    assert result["serve_peak_bytes"] is None or result["serve_peak_bytes"] <= result["peak_bytes"]


@pytest.fixture(scope="module")
def w8_llm():
    """A tiny Llama quantized to 8-bit weights (QuantLinear, the head and tied embedding too)."""
    h = handle("llama")
    leanml.quantize(h, WeightOnly(bits=8, group_size=None, method="rtn", head_bits=8, mse_clip=False), corpus())
    return h


def make_mlp() -> ModelHandle:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()
    h = ModelHandle(module=module, task="generic", name="mlp")
    h.example_inputs = (torch.randn(4, 20),)
    return h


@pytest.fixture
def mlp_handle():
    return make_mlp()


@pytest.fixture(scope="module")
def ort_mlp(tmp_path_factory):
    """The MLP on ONNX Runtime (an OrtModule), its files in a folder that outlives the session."""
    return prepare(make_mlp(), "onnxruntime", threads=1, workdir=tmp_path_factory.mktemp("ort-mlp"))


def test_torch_llm_quantized_artifact(w8_llm, monkeypatch):
    rec = Recorder(monkeypatch)
    result = serving_memory(w8_llm, w8_llm.example_inputs, threads=1, new_tokens=2, repeats=1)
    check_result(result, "torch")
    assert rec.specs[0]["kind"] == "artifact" and rec.specs[0]["threads"] == 1
    assert result["timing"]["prompt_tokens"] == w8_llm.example_inputs["input_ids"].shape[1]
    rec.assert_gone()


def test_ort_llm_reopens_the_onnx_file_only(w8_llm, monkeypatch, tmp_path):
    ort = prepare(w8_llm, "onnxruntime", threads=1, workdir=tmp_path)
    rec = Recorder(monkeypatch)
    result = serving_memory(ort, ort.example_inputs, new_tokens=2, repeats=1)
    check_result(result, "onnxruntime")
    spec = rec.specs[0]
    # the same graph, class and thread count; nothing of the torch model it was prepared from
    assert spec["kind"] == "ort-llm" and spec["path"] == str(tmp_path / "model.onnx") and spec["threads"] == 1
    assert not any((folder / "model").exists() for folder in rec.spec_dirs)
    rec.assert_gone()
    assert (tmp_path / "model.onnx").exists()  # the user's file is left alone


def test_torch_and_ort_plain_module(mlp_handle, ort_mlp, monkeypatch):
    rec = Recorder(monkeypatch)
    check_result(serving_memory(mlp_handle, mlp_handle.example_inputs, threads=1, repeats=1), "torch")
    result = serving_memory(ort_mlp, ort_mlp.example_inputs, repeats=2)
    check_result(result, "onnxruntime")
    assert [s["kind"] for s in rec.specs] == ["artifact", "ort-module"]
    assert rec.specs[1]["threads"] == 1  # the session's own count
    assert result["timing"]["call_s"] > 0
    rec.assert_gone()


def test_failing_child_is_one_line(ort_mlp, monkeypatch):
    rec = Recorder(monkeypatch)
    with pytest.raises(LeanmlError, match="failed: ") as info:
        serving_memory(ort_mlp, (torch.randn(4, 7),), repeats=1)  # the wrong width: the session refuses it
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    rec.assert_gone()


def test_timeout_kills_the_child(mlp_handle, monkeypatch):
    rec = Recorder(monkeypatch)
    with pytest.raises(LeanmlError, match="did not finish within 0.2 s"):
        serving_memory(mlp_handle, mlp_handle.example_inputs, timeout=0.2)  # still importing torch
    rec.assert_gone()


def test_interrupt_kills_the_child(mlp_handle, monkeypatch):
    rec = Recorder(monkeypatch, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        serving_memory(mlp_handle, mlp_handle.example_inputs)
    rec.assert_gone()


def test_refusals_start_no_child(mlp_handle, monkeypatch, tmp_path):
    rec = Recorder(monkeypatch)

    class Local(torch.nn.Module):  # a class the child could not import: refused before any spawn
        def forward(self, x):
            return x

    with pytest.raises(LeanmlError, match="cannot be written for the serving-memory process.*local object"):
        serving_memory(ModelHandle(module=Local(), task="generic", name="local"), (torch.ones(1),))
    ort = prepare(mlp_handle, "onnxruntime", workdir=tmp_path / "gone")  # then its files are deleted
    for f in (tmp_path / "gone").iterdir():
        f.unlink()
    with pytest.raises(LeanmlError, match="is gone; prepare the runtime with a workdir"):
        serving_memory(ort, ort.example_inputs)
    compiled = ModelHandle(module=mlp_handle.module, task="generic", name="mlp", runtime="torch-compile")
    with pytest.raises(LeanmlError, match="torch and onnxruntime runtimes"):
        serving_memory(compiled, mlp_handle.example_inputs)
    with pytest.raises(LeanmlError, match="timeout"):
        serving_memory(mlp_handle, mlp_handle.example_inputs, timeout=0)
    assert rec.procs == []


def test_rss_sampler_sees_an_allocation():
    # a fresh anonymous mapping: pages the process already holds (freed heap after earlier tests) cannot be reused
    size = 32 << 20
    sampler = serving._Sampler()
    start = sampler.peak
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):  # every page touched, held to the end
        block[offset] = 1
    sampler.stop()
    block.close()
    assert sampler.peak - start >= 0.9 * size
