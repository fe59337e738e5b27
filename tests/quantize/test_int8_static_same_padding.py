"""Static int8 quantization of a mobile CNN with TensorFlow-style "SAME" padding (timm's ``Conv2dSame``,
an ``nn.Conv2d`` subclass that pads in its forward): the int8 convs keep the run-time padding, so the
quantized model runs at input sizes other than the calibration size; conv subclasses whose forward the
int8 layer cannot reproduce are refused with a one-line error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanml
from leanml.artifact import load_artifact, save_artifact
from leanml.config import Int8Static
from leanml.data import TensorData
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from leanml.quantize.modules import Int8ActConv2d, same_pad
from tests.same_padding_cnn import SIZES, Conv2dSame, MobileSame, accuracy, digits, digits_data, same_pads, trained_model


def test_int8_static_keeps_accuracy_at_the_calibration_size_and_another(tmp_path):
    data, x_a, x_b, y = digits_data()
    model = trained_model()
    handle = ModelHandle(module=copy.deepcopy(model), task="generic", name="mobile-same")
    leanml.compress(handle, "int8-static", data=data, measure=False)
    q = handle.module
    # strided Conv2dSame: "SAME" padding at run time; at stride 1 it is static padding="same"
    assert isinstance(q.stem[0], Int8ActConv2d) and q.stem[0].pad_same
    assert q.blocks[0].dw[0].conv_args["padding"] == "same" and not q.blocks[0].dw[0].pad_same
    assert isinstance(q.blocks[2].dw[0][1], Int8ActConv2d) and q.blocks[2].dw[0][1].conv_args["padding"] == (0, 0)
    acc = {s: (accuracy(model, x, y), accuracy(q, x, y)) for s, x in zip(SIZES, (x_a, x_b), strict=True)}
    held = torch.tensor(data.indices("eval"))
    x_odd = digits(19)[0][held]  # an odd size, neither trained nor calibrated
    acc[19] = (accuracy(model, x_odd, y), accuracy(q, x_odd, y))
    print("\nheld-out accuracy float/int8: " + ", ".join(f"{s} px {f:.1f}/{i:.1f}" for s, (f, i) in acc.items()))
    # observed: 16 px 98.6/98.6, 20 px 97.8/97.5, 19 px 91.1/91.6
    for size in SIZES:
        f, i = acc[size]
        assert f > 95 and abs(f - i) <= 1.0, (size, f, i)
    assert abs(acc[19][0] - acc[19][1]) <= 2.0
    # the artifact reloads with the same padding and runs at the second size
    out = save_artifact(handle, tmp_path / "q")
    loaded = load_artifact(out).module.eval()
    assert loaded.stem[0].pad_same
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_b[:32]), q(x_b[:32]))


def test_same_pad_matches_tensorflow_arithmetic():
    x = torch.randn(1, 2, 7, 10)
    for k, s, d in ((3, 2, 1), (5, 2, 1), (3, 1, 2), (4, 3, 1)):
        conv = Conv2dSame(2, 3, k, stride=s)
        conv.dilation = (d, d)
        padded = same_pad(x, conv.kernel_size, conv.stride, conv.dilation)
        ref = conv(x)
        torch.testing.assert_close(F.conv2d(padded, conv.weight, None, conv.stride, 0, conv.dilation), ref)
        assert ref.shape[-2:] == (-(-7 // s), -(-10 // s))  # "SAME": ceil(size / stride)


def tiny_data(size: int = 12) -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, size, size, generator=g)
    return TensorData(name="tiny", x=x, y=torch.zeros(48, dtype=torch.long))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_a_padding_mode_survives(padding_mode):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)
    )
    ref = copy.deepcopy(net).eval()
    handle = ModelHandle(module=net.eval(), task="generic", name="pm")
    leanml.quantize(handle, Int8Static(), tiny_data())
    assert handle.module[0].conv_args["padding_mode"] == padding_mode
    for size in (12, 15):
        x = torch.rand(2, 3, size, size)
        assert sqnr_db(ref(x), handle.module(x)) > 30


class BakedPad(nn.Conv2d):
    """timm's ``Conv2dSameExport``: "SAME" padding computed at the first call and kept, so it is right
    at that input size only."""

    def forward(self, x):
        if not hasattr(self, "pad"):
            ph, pw = (same_pads(i, k, s, 1) for i, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True))
            self.pad = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Scaled(nn.Conv2d):
    """A forward that is not a plain convolution at all."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "layer, message",
    [
        (BakedPad(3, 4, 3, stride=2), "which int8-static reproduces only at the calibrated input size 14x14"),
        (Scaled(3, 4, 3), "which int8-static cannot reproduce with a plain convolution/product"),
    ],
)
def test_a_conv_whose_forward_cannot_be_reproduced_is_refused(layer, message):
    net = nn.Sequential(layer, nn.ReLU(), nn.Flatten(1), nn.LazyLinear(2))
    net(torch.rand(1, 3, 14, 14))
    handle = ModelHandle(module=net.eval(), task="generic", name="odd")
    with pytest.raises(LeanmlError, match=message) as info:
        leanml.quantize(handle, Int8Static(), tiny_data(14))
    assert "\n" not in str(info.value) and "ignore: ['0']" in str(info.value)
    assert type(handle.module[0]) is type(layer)  # nothing was replaced
    # leaving it out quantizes the rest
    leanml.quantize(handle, Int8Static(ignore=["0"]), tiny_data(14))
    assert type(handle.module[0]) is type(layer) and not isinstance(handle.module[3], nn.Linear)


def test_an_untrained_same_padding_model_quantizes_and_runs_at_several_sizes():
    torch.manual_seed(0)
    model = MobileSame().eval()
    handle = ModelHandle(module=copy.deepcopy(model), task="generic", name="m")
    leanml.quantize(handle, Int8Static(), TensorData(name="r", x=torch.rand(64, 1, 16, 16)))
    for size in (16, 17, 20, 23):
        x = torch.rand(4, 1, size, size)
        assert sqnr_db(model(x), handle.module(x)) > 15


def test_int8_same_padding_model_runs_on_onnxruntime():
    """The ONNX export of the int8 model keeps the run-time "SAME" padding (float twin pads in forward)."""
    from leanml.accelerate.runtimes import float_twin, prepare

    data, x_a, _, y = digits_data()
    handle = ModelHandle(module=copy.deepcopy(trained_model()), task="generic", name="mobile-same")
    handle.example_inputs = (x_a[:8],)
    leanml.compress(handle, "int8-static", data=data, measure=False)
    twin = float_twin(handle.module)
    with torch.no_grad():  # the float twin is the float conv the int8 layer simulates
        assert accuracy(twin, x_a, y) > 95
    ort = prepare(handle, "onnxruntime", data=data)
    with torch.no_grad():
        got = ort.call((x_a[:64],))
        ref = handle.module(x_a[:64])
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    assert agree >= 0.95, agree  # observed 1.0
