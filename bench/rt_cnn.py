"""Benchmark section: a ResNet-18-style CNN on CPU runtimes, fp32 vs static int8.

ResNet-18 layout (BasicBlocks [2, 2, 2, 2], 64-128-256-512 channels, BatchNorm, ReLU, residual adds,
1000 classes), built here with random weights and BatchNorm statistics set from random images (so the
activations have realistic scales), batch 8 x 3 x 224 x 224. Timed with one protocol (warm-up calls,
then rounds calling every variant once, order rotated; p50 and spread) at ``threads`` threads:

a. torch fp32 eager; b. torch fp32 with BatchNorm folded (``leanml.accelerate.fusion``);
c. ONNX Runtime fp32 of the folded model; d. ONNX Runtime static int8 from leanml's
``quantize_static_onnx`` (calibrated on 16 images); e. peer: ``onnxruntime.quantization.quantize_static``
with its defaults (QDQ, per-tensor) on the same float ONNX.

Also a small CNN trained on ``digits`` for a few seconds: fp32 vs leanml int8 ORT accuracy.

    python bench/rt_cnn.py [--threads 1,2] [--quick]     # prints JSON
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  (first: fixes the import path and the environment)
# isort: on

import argparse
import gc
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from leanml.accelerate.fusion import fold_batchnorm
from leanml.accelerate.onnx_static import optimized_op_counts, quantize_static_onnx
from leanml.measure.stats import summarize

BATCH, SIZE, CALIB_IMAGES = 8, 224, 16


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, (n, cout) in enumerate(zip(layers, widths, strict=True)):
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Random-ish images: smooth colour blobs (noise upsampled from 7x7 and 28x28) plus fine noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = nn.functional.interpolate(torch.randn(n, 3, 7, 7, generator=gen), size=size, mode="bicubic")
    mid = nn.functional.interpolate(torch.randn(n, 3, 28, 28, generator=gen), size=size, mode="bilinear")
    return coarse + 0.5 * mid + 0.2 * torch.randn(n, 3, size, size, generator=gen)


@torch.no_grad()
def resnet18(seed: int = 0) -> nn.Module:
    """ResNet-18 with random weights; BN running stats measured on random images, random affine params."""
    torch.manual_seed(seed)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
    model.train()
    for i in range(2):
        model(images(8, 100 + i, 128))
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.copy_(0.2 * torch.randn(c, generator=gen))
            m.running_mean.mul_(1 + 0.1 * torch.randn(c, generator=gen))
            m.running_var.mul_(0.8 + 0.4 * torch.rand(c, generator=gen))
    return model.eval()


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(10 * np.log10((ref**2).sum() / max(((ref - out) ** 2).sum(), 1e-30)))


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting between ops: idle spinning threads of one session would steal the cores of the others (and
    # of torch) on a small host; measured on this host it costs < 2% at 1-2 threads when the machine is idle
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def export(model: nn.Module, x: torch.Tensor, path: str) -> None:
    torch.onnx.export(
        model,
        (x,),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )


def _stats(samples: list[float]) -> dict:
    s = summarize(samples)
    return {
        "p50_ms": round(s["p50"] * 1e3, 2),
        "min_ms": round(s["min"] * 1e3, 2),
        "max_ms": round(s["max"] * 1e3, 2),
        "spread_pct": round(100 * (s["p95"] - s["min"]) / s["p50"], 1),
        "n": s["n"],
    }


def timing_interleaved(fns: dict, warmup: int, repeats: int) -> dict:
    """The same protocol for every variant: ``warmup`` untimed calls each, then ``repeats`` rounds in which
    every variant is called once (order rotated each round), so a load change on a shared host hits all
    variants alike. p50 / min / max / spread (p95 - min, % of p50) of each variant's calls."""
    keys = list(fns)
    for k in keys:
        for _ in range(warmup):
            fns[k]()
    samples: dict = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return {k: _stats(v) for k, v in samples.items()}


class _Reader:
    """CalibrationDataReader for onnxruntime.quantization (duck-typed: get_next / rewind)."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def digits_accuracy(threads: int, tmp: str, seconds: float) -> dict:
    """A small CNN (conv-BN-ReLU, residual add, pools, linear) trained on digits; fp32 vs int8 ORT accuracy."""
    import leanml

    data = leanml.load_data("digits")
    x, y = data.tensors("calib")
    xe, ye = data.tensors("eval")
    torch.manual_seed(0)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    started, epochs = time.perf_counter(), 0
    while time.perf_counter() - started < seconds and epochs < 30:
        order = torch.randperm(len(x), generator=gen)
        net.train()
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
    net.eval()
    folded, _ = fold_batchnorm(net)
    f32, q8 = os.path.join(tmp, "digits.onnx"), os.path.join(tmp, "digits.int8.onnx")
    export(folded, x[:4], f32)
    quantize_static_onnx(f32, q8, [{"x": x[i : i + 64].numpy()} for i in range(0, 512, 64)])
    with torch.no_grad():
        acc32 = (net(xe).argmax(1) == ye).float().mean().item()
    acc8 = float((ort_session(q8, threads).run(None, {"x": xe.numpy()})[0].argmax(1) == ye.numpy()).mean())
    return {"train_epochs": epochs, "eval_items": len(ye), "fp32_torch": round(acc32, 4), "int8_ort_leanml": round(acc8, 4)}


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.conv(x))


def run(threads: int, quick: bool = False) -> dict:
    """Time the five variants at ``threads`` threads; returns a JSON-able dict."""
    from onnxruntime.quantization import quantize_static

    torch.set_num_threads(threads)
    warmup, repeats = (2, 5) if quick else (3, 10)
    model = resnet18()
    folded, fusions = fold_batchnorm(model)
    x = images(BATCH, 1)
    calib = images(CALIB_IMAGES, 2)
    with torch.no_grad():
        ref = model(x).numpy()
        ref_folded = folded(x).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        f32, q8, peer = (os.path.join(tmp, n) for n in ("resnet18.onnx", "resnet18.int8.onnx", "resnet18.peer.onnx"))
        export(folded, x, f32)
        feeds = [{"x": calib[i : i + 1].numpy()} for i in range(CALIB_IMAGES)]
        t0 = time.perf_counter()
        report = quantize_static_onnx(f32, q8, feeds)
        quant_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantize_static(f32, peer, _Reader(feeds))
        peer_s = time.perf_counter() - t0
        gc.collect()  # the calibration sessions must be gone before timing
        xn = x.numpy()
        sessions = {k: ort_session(p, threads) for k, p in (("c", f32), ("d", q8), ("e", peer))}
        outs = {k: sess.run(None, {"x": xn})[0] for k, sess in sessions.items()}
        fns = {"a": lambda: model(x), "b": lambda: folded(x)}
        fns.update({k: (lambda s=sess: s.run(None, {"x": xn})) for k, sess in sessions.items()})
        with torch.no_grad():
            times = timing_interleaved(fns, warmup, repeats)
        del sessions, fns
        ops = optimized_op_counts(q8, threads)
        peer_ops = optimized_op_counts(peer, threads)
        digits = digits_accuracy(threads, tmp, 3.0 if quick else 8.0)
    labels = {
        "a": "torch fp32 eager",
        "b": "torch fp32 BN folded",
        "c": "ORT fp32 (folded)",
        "d": "ORT int8 leanml",
        "e": "ORT int8 peer quantize_static",
    }
    base = times["a"]["p50_ms"]
    rows = []
    for k, label in labels.items():
        row = {"variant": k, "label": label, **times[k], "speedup_vs_a": round(base / times[k]["p50_ms"], 2)}
        if k in ("c", "d", "e"):
            row["sqnr_db_vs_fp32"] = round(sqnr_db(ref, outs[k]), 2)
            row["top1_agree_vs_fp32"] = float((outs[k].argmax(1) == ref.argmax(1)).mean())
        rows.append(row)
    import onnxruntime as ort

    from leanml.measure.profile import host_info

    return {
        "host": {**host_info(), "onnxruntime": ort.__version__},
        "threads": threads,
        "batch": BATCH,
        "input": [BATCH, 3, SIZE, SIZE],
        "quick": quick,
        "rows": rows,
        "fusions": fusions,
        "folded_max_abs_diff": float(np.abs(ref - ref_folded).max()),
        "quantize_report": report,
        "quantize_seconds": round(quant_s, 2),
        "peer_quantize_seconds": round(peer_s, 2),
        "ort_settings": "CPUExecutionProvider, ORT_ENABLE_ALL, sequential, inter_op 1, intra_op spinning off",
        "ort_ops_leanml_int8": ops,
        "ort_ops_peer_int8": peer_ops,
        "digits": digits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a shorter digits training")
    args = parser.parse_args()
    results = [run(int(t), args.quick) for t in args.threads.split(",")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
