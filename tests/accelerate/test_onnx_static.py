"""Static int8 QDQ ONNX: leanml's calibration and weight codes, run by ONNX Runtime's integer kernels."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from leanml.accelerate.fusion import fold_batchnorm
from leanml.accelerate.onnx_static import optimized_op_counts, quantize_static_onnx
from leanml.errors import LeanmlError
from leanml.measure.system import torch_threads
from leanml.quantize.primitives import fake_quantize, qparams_for

ort = pytest.importorskip("onnxruntime")


class TinyCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block (Add), MaxPool, GlobalAveragePool, Flatten, Linear."""

    def __init__(self, cin: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cin, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, classes),
        )

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.block(x))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
    return model.eval()


def export(model: nn.Module, x: torch.Tensor, path, opset: int = 17) -> None:
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )


def run_ort(path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - out) ** 2).sum()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A BN-folded TinyCNN exported to ONNX, quantized with 8 calibration batches."""
    tmp = tmp_path_factory.mktemp("onnx_static")
    torch.manual_seed(0)
    model = randomize_bn(TinyCNN())
    folded, fusions = fold_batchnorm(model)
    gen = torch.Generator().manual_seed(1)
    export(folded, torch.randn(2, 3, 16, 16, generator=gen), tmp / "float.onnx")
    feeds = [{"x": torch.randn(4, 3, 16, 16, generator=gen).numpy()} for _ in range(8)]
    report = quantize_static_onnx(tmp / "float.onnx", tmp / "int8.onnx", feeds)
    return {"model": model, "folded": folded, "fusions": fusions, "dir": tmp, "report": report, "feeds": feeds}


def test_report(tiny):
    r = tiny["report"]
    assert len(tiny["fusions"]) == 4
    assert r["ops_quantized"] == {"Add": 1, "Conv": 4, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "MaxPool": 1, "Relu": 4}
    assert r["relu_fused"] == 4 and r["float_ops"] == {} and r["calibration_items"] == 8
    assert r["per_channel"] is True and r["weight_bits"] == 8 and r["observer"] == "minmax" and r["bias_clipped"] == 0
    leftovers = [p for p in os.listdir(tiny["dir"]) if p.endswith(".tmp")]
    assert leftovers == []  # written through a temp file + os.replace


def test_int8_output_close_to_fp32_torch(tiny):
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiny["model"](x).numpy()  # the unfolded fp32 torch model
    out = run_ort(tiny["dir"] / "int8.onnx", x.numpy())
    # observed 39.6 dB (per-channel int8 weights, uint8 min/max activations); the float ONNX path: 132.7 dB
    assert sqnr_db(ref, out) >= 33.0
    assert sqnr_db(ref, run_ort(tiny["dir"] / "float.onnx", x.numpy())) >= 100.0


def test_ort_runs_integer_kernels(tiny):
    ops = optimized_op_counts(tiny["dir"] / "int8.onnx")
    qconv = ops.get("com.microsoft.QLinearConv", 0) + ops.get("QLinearConv", 0)
    assert qconv == 4, ops
    assert ops.get("com.microsoft.QLinearAdd", 0) == 1
    assert ops.get("com.microsoft.QGemm", 0) == 1
    assert ops.get("com.microsoft.QLinearGlobalAveragePool", 0) == 1
    # activations stay int8 between layers: no float conv, no DequantizeLinear left, one Q on the float input
    assert "Conv" not in ops and "DequantizeLinear" not in ops and ops.get("QuantizeLinear", 0) == 1, ops


def _dq_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}


def test_weights_dequantize_to_leanml_codes_exactly(tiny):
    model = onnx.load(str(tiny["dir"] / "int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = _dq_nodes(model)
    float_model = onnx.load(str(tiny["dir"] / "float.onnx"))
    float_w = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        wdq = dq[node.input[1]]
        codes, scale, zero = (inits[i] for i in wdq.input)
        assert codes.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()
        axis = next(a.i for a in wdq.attribute if a.name == "axis")
        assert axis == 0 and scale.shape == (codes.shape[0],)
        deq = codes.astype(np.float32) * scale.reshape([-1] + [1] * (codes.ndim - 1))
        w = torch.from_numpy(float_w[wdq.input[0].removesuffix("_quantized")].copy())
        qp = qparams_for(w, 8, True, "channel", axis=0)  # leanml's own per-channel symmetric int8
        np.testing.assert_array_equal(deq, fake_quantize(w, qp).numpy())
        np.testing.assert_array_equal(scale, qp.scale.reshape(-1).numpy())
        # int32 bias with scale = x_scale * w_scale, zero point 0
        bdq = dq[node.input[2]]
        bias, bscale, bzero = (inits[i] for i in bdq.input)
        xdq = dq[node.input[0]]
        x_scale = inits[xdq.input[1]]
        assert bias.dtype == np.int32 and not bzero.any()
        np.testing.assert_array_equal(bscale, (x_scale * scale).astype(np.float32))
        assert inits[xdq.input[2]].dtype == np.uint8  # activations: uint8 asymmetric
        checked += 1
    assert checked == 5


def test_per_tensor_and_other_observers(tiny, tmp_path):
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny["model"](x).numpy()
    for kwargs in ({"per_channel": False}, {"observer": "percentile"}, {"weight_bits": 6}):
        out_path = tmp_path / "q.onnx"
        report = quantize_static_onnx(tiny["dir"] / "float.onnx", out_path, iter(tiny["feeds"][:4]), **kwargs)
        assert report["calibration_items"] == 4
        # observed: per-tensor 39.6 dB, percentile 38.3 dB, 6-bit weights 29.6 dB
        assert sqnr_db(ref, run_ort(out_path, x.numpy())) >= (24.0 if "weight_bits" in kwargs else 32.0), kwargs
    model = onnx.load(str(out_path))
    codes = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert codes and all(np.abs(c).max() <= 31 for c in codes)  # 6-bit symmetric codes in the int8 container


class MatMulNet(nn.Module):
    """Linear (Gemm), MatMul with a constant weight, MatMul of two activations, Transpose/Reshape, AveragePool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(128, 16)
        self.w = nn.Parameter(0.3 * torch.randn(16, 12))

    def forward(self, x):
        y = self.pool(torch.relu(self.conv(x))).transpose(1, 2).reshape(x.shape[0], -1)
        z = torch.relu(self.fc(y)) @ self.w
        return z @ z.transpose(0, 1)


def test_matmul_pool_reshape(tmp_path):
    torch.manual_seed(0)
    net = MatMulNet().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    torch.onnx.export(net, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    feeds = [{"x": torch.randn(4, 3, 8, 8, generator=gen)} for _ in range(8)]  # torch tensors are accepted too
    report = quantize_static_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds)
    assert report["ops_quantized"] == {
        "AveragePool": 1,
        "Conv": 1,
        "Gemm": 1,
        "MatMul": 2,
        "Relu": 2,
        "Reshape": 1,
        "Transpose": 2,
    }
    ops = optimized_op_counts(tmp_path / "q.onnx")
    assert ops.get("QLinearMatMul") == 1 and ops.get("com.microsoft.QLinearAveragePool") == 1, ops
    with torch.no_grad():
        ref = net(x).numpy()
    assert sqnr_db(ref, run_ort(tmp_path / "q.onnx", x.numpy())) >= 30.0  # observed 35.6 dB


def test_bad_inputs(tiny, tmp_path):
    src, out = tiny["dir"] / "float.onnx", tmp_path / "q.onnx"
    feeds = tiny["feeds"][:1]
    cases = [
        ((tmp_path / "missing.onnx", out, feeds), {}, "missing.onnx' does not exist"),
        ((src, out, []), {}, "calib_feeds is empty"),
        ((src, out, iter(())), {}, "calib_feeds is empty"),
        ((src, out, feeds), {"weight_bits": 16}, "weight_bits 16 is not supported; use an integer from 2 to 8"),
        ((src, out, feeds), {"weight_bits": True}, "weight_bits True is not supported"),
        ((src, out, feeds), {"observer": "max"}, "observer 'max' is not supported; use one of"),
        ((src, out, [{"input": feeds[0]["x"]}]), {}, r"calibration item 0 has inputs \['input'\]; the model takes \['x'\]"),
        ((src, out, [feeds[0]["x"]]), {}, "calibration item 0 is a ndarray"),
        ((src, out, feeds[0]), {}, "calib_feeds of type dict is not supported"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(LeanmlError, match=match):
            quantize_static_onnx(*args, **kwargs)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(LeanmlError, match="is not a readable ONNX model"):
        quantize_static_onnx(tmp_path / "junk.onnx", out, feeds)
    export(tiny["folded"], torch.randn(1, 3, 16, 16), tmp_path / "old.onnx", opset=11)
    with pytest.raises(LeanmlError, match="opset 11 is too old"):
        quantize_static_onnx(tmp_path / "old.onnx", out, feeds)
    assert not out.exists()


def test_digits_accuracy_int8_within_one_point(tmp_path):
    import leanml

    data = leanml.load_data("digits")
    x, y = data.tensors("calib")
    xe, ye = data.tensors("eval")
    torch.manual_seed(0)
    net = TinyCNN(cin=1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    with torch_threads(1):  # tiny ops: more threads only add synchronisation (and the cores are shared)
        for _ in range(12):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                idx = order[i : i + 64]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()
    folded, _ = fold_batchnorm(net)
    export(folded, x[:2], tmp_path / "digits.onnx")
    feeds = [{"x": x[i : i + 64].numpy()} for i in range(0, 512, 64)]
    quantize_static_onnx(tmp_path / "digits.onnx", tmp_path / "digits.int8.onnx", feeds)
    with torch.no_grad():
        acc32 = (net(xe).argmax(1) == ye).float().mean().item()
    acc8 = float((run_ort(tmp_path / "digits.int8.onnx", xe.numpy()).argmax(1) == ye.numpy()).mean())
    assert acc32 >= 0.95  # observed: fp32 0.9916, int8 ORT 0.9916 (359 eval images)
    print(f"digits accuracy fp32 {acc32:.4f} int8 ORT {acc8:.4f}")
    assert abs(acc8 - acc32) <= 0.01, (acc32, acc8)
