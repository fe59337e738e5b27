"""ONNX Runtime's int8 graph is checked against leanml's simulated int8 model on held-out inputs: the
agreement is in the runtime report, and a graph that diverges beyond the stated bound is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanml
from leanml.accelerate import runtimes
from leanml.accelerate.runtimes import prepare
from leanml.config import Int8Dynamic, Int8Static
from leanml.data import TensorData
from leanml.errors import LeanmlError
from leanml.models import ModelHandle

pytest.importorskip("onnxruntime")


def _quantized(config):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    x = torch.rand(240, 1, 8, 8)
    data = TensorData(name="toy", x=x, y=net(x).argmax(-1))
    handle = ModelHandle(module=net, task="generic", name="cnn", example_inputs=(x[:4],))
    return leanml.quantize(handle, config, data), data


@pytest.mark.parametrize("config, mode", [(Int8Static(observer="minmax"), "static"), (Int8Dynamic(), "dynamic")])
def test_the_agreement_is_measured_on_the_check_split(config, mode, tmp_path):
    handle, data = _quantized(config)
    rt = prepare(handle, "onnxruntime", data=data, workdir=tmp_path)
    agreement = rt.meta["runtime_report"]["agreement"]
    assert agreement["inputs"] == f"{len(data.tensors('check')[0])} inputs of the data's check split"
    assert agreement["sqnr_db"] >= runtimes.INT8_AGREEMENT_DB and agreement["top1_agreement"] >= 0.9  # observed ≥ 25 dB
    # the figure is the SQNR of the runtime's output against the simulated model's, computed here again
    (x,) = runtimes._agreement_inputs(handle, data)[0]
    with torch.no_grad():
        sim, got = handle.module(x).double(), rt.module(x).double()
    by_hand = 10 * torch.log10(sim.pow(2).sum() / (sim - got).pow(2).sum())
    assert abs(agreement["sqnr_db"] - float(by_hand)) < 1e-6


def test_a_graph_that_diverges_is_refused(monkeypatch, tmp_path):
    from leanml.models.onnx_module import OrtModule

    handle, data = _quantized(Int8Static(observer="minmax"))
    real = OrtModule.forward
    monkeypatch.setattr(OrtModule, "forward", lambda self, *a, **k: real(self, *a, **k).flip(0))  # rows out of order
    with pytest.raises(LeanmlError, match=r"static int8 graph of 'cnn' diverges from leanml's simulated int8 model") as info:
        prepare(handle, "onnxruntime", data=data, workdir=tmp_path)
    assert "\n" not in str(info.value) and "dB <" in str(info.value) and "--runtime torch" in str(info.value)
