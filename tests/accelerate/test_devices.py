"""Device and execution-provider choice, including the paths for hardware this machine lacks."""

from __future__ import annotations

import pytest
import torch

from leanml.accelerate.devices import ort_providers, torch_device
from leanml.errors import LeanmlError


def test_ort_providers_prefer_accelerators_and_end_with_cpu():
    offered = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert ort_providers("auto", offered) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cuda", offered)[-1] == "CPUExecutionProvider"
    assert ort_providers("cpu", offered) == ["CPUExecutionProvider"]
    assert ort_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(LeanmlError, match="onnxruntime offers only"):
        ort_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(LeanmlError, match="not one of"):
        ort_providers("tpu", offered)


def test_torch_device_falls_back_to_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert torch_device("auto").type in ("cpu", "mps")
    with pytest.raises(LeanmlError, match="no CUDA GPU"):
        torch_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_device_when_present():
    assert torch_device("auto").type == "cuda"
