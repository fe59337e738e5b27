"""A plain module is exported and timed on the data's inputs, not on a shape guessed from its first layer,
and a saved artifact keeps the input shape it was made for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanml
from leanml.data import TensorData
from leanml.models import ModelHandle


def _cnn():
    torch.manual_seed(0)
    # the classifier's input width fixes the image size: 40×40 works, the guessed 32×32 does not
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 20 * 20, 5)).eval()


@pytest.fixture
def images():
    x = torch.rand(48, 3, 40, 40)
    return TensorData(name="images", x=x, y=_cnn()(x).argmax(-1))


def test_onnxruntime_is_exported_for_the_data_shapes(images):
    from leanml.models.inputs import default_example_inputs

    handle = ModelHandle(module=_cnn(), task="generic", name="cnn")
    handle.example_inputs = default_example_inputs(handle)  # what a loaded file gets: the 32×32 guess
    assert handle.example_inputs[0].shape[-1] == 32 and "pass --data" in handle.meta["example_inputs"]
    m = leanml.profile(handle, data=images, runtime="onnxruntime", repeats=1, threads=1)
    assert m.runtime == "onnxruntime" and m.quality["metric"] == "accuracy" and m.quality["value"] >= 0.97
    assert not [n for n in m.notes if "pass --data" in n]  # the data's inputs were used
    assert handle.example_inputs[0].shape[-1] == 32  # the user's handle is left as it was


def test_a_saved_artifact_keeps_its_input_shape(tmp_path, images):
    handle = ModelHandle(module=_cnn(), task="generic", name="cnn", example_inputs=(images.x[:2],))
    leanml.compress(handle, "int8-dynamic", out=tmp_path / "o", measure=False)
    back = leanml.load_model(tmp_path / "o")
    (x,) = back.example_inputs
    assert x.shape == (8, 3, 40, 40) and x.dtype == torch.float32
    assert back.module(x).shape == (8, 5)
    m = leanml.profile(back, runtime="onnxruntime", repeats=1, threads=1)  # no data: the saved shape, no guess
    assert not [n for n in m.notes if "inferred shape" in n]


def test_compress_checks_and_saves_on_the_data_inputs_when_they_were_guessed(tmp_path, images):
    """The near-lossless check of int8-static runs on the model's example inputs: guessed random 32×32 inputs
    would not even fit this CNN; a few rows of the data are used instead, and saved as its input shape."""
    from leanml.models.inputs import default_example_inputs

    handle = ModelHandle(module=_cnn(), task="generic", name="cnn")
    handle.example_inputs = default_example_inputs(handle)
    result = leanml.compress(handle, "int8-static", data=images, out=tmp_path / "o", measure=False)
    (x,) = result.handle.example_inputs
    assert x.shape[1:] == (3, 40, 40) and "example_inputs" not in result.handle.meta
    assert result.handle.meta["checks"][0]["sqnr_db"] >= 8  # the check ran, on the data's rows
    assert leanml.load_model(tmp_path / "o").example_inputs[0].shape == (8, 3, 40, 40)
    chosen = (torch.rand(2, 3, 40, 40),)
    mine = ModelHandle(module=_cnn(), task="generic", name="cnn", example_inputs=chosen)
    leanml.compress(mine, "int8-dynamic", data=images, measure=False)
    assert mine.example_inputs is chosen  # inputs the user chose are kept
