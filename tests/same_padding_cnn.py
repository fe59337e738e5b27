"""A small mobile CNN in the style of EfficientNet/MobileNetV3 ported from TensorFlow, trained on
sklearn's digits (seconds on a CPU), for the pruning and quantization tests of "SAME" padding.

What it has, as timm's TF ports have it:

* ``Conv2dSame``: an ``nn.Conv2d`` subclass whose forward computes TensorFlow "SAME" padding from the
  input size at run time (``math.ceil``, ``F.pad``) - torch.fx cannot trace it (Python control flow on
  the input's shape);
* ``PadSame``: the same padding as a separate module in front of a plain ``nn.Conv2d`` (``padding=0``);
* depthwise convs, a grouped conv (``groups=4``), squeeze-excite gates (hard-sigmoid), ReLU6 and
  hard-swish, BatchNorm, residual adds, global pooling, dropout and a Linear classifier.

Inputs are digits (8x8) upsampled bilinearly to 16x16 (the calibration size) and 20x20 (the second
size; it is odd after the strides, 20 -> 10 -> 5, so "SAME" pads unevenly there). Small sizes keep the
training to seconds on two CPU cores; the network is trained on both sizes.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def same_pads(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def pad_same(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """TensorFlow "SAME" padding of ``x`` for a conv with kernel ``k``, stride ``s``, dilation ``d``."""
    ih, iw = x.size()[-2:]
    ph, pw = same_pads(ih, k[0], s[0], d[0]), same_pads(iw, k[1], s[1], d[1])
    if ph > 0 or pw > 0:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TensorFlow-like "SAME" padding computed in forward."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class PadSame(nn.Module):
    """The padding alone, as a module (a plain ``nn.Conv2d`` with ``padding=0`` follows it)."""

    def __init__(self, k: int, stride: int = 1):
        super().__init__()
        self.k, self.stride = (k, k), (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, self.k, self.stride)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, r, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * F.hardsigmoid(s)


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expansion, depthwise kxk ("SAME" padded), squeeze-excite, 1x1 projection, residual."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, separate_pad: bool = False):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish())
        if separate_pad:
            dw = nn.Sequential(PadSame(k, stride), nn.Conv2d(mid, mid, k, stride, padding=0, groups=mid, bias=False))
        else:
            dw = Conv2dSame(mid, mid, k, stride, groups=mid)
        self.dw = nn.Sequential(dw, nn.BatchNorm2d(mid), nn.ReLU6())
        self.se = SqueezeExcite(mid, max(4, mid // 4))
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileSame(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(Conv2dSame(1, 16, 3, stride=2), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 2, 3, 1),
            InvertedResidual(16, 24, 3, 3, 2),
            InvertedResidual(24, 24, 3, 5, 1, separate_pad=True),
        )
        self.grouped = nn.Sequential(nn.Conv2d(24, 48, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
        self.head = nn.Sequential(Conv2dSame(48, 64, 1, bias=True), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.grouped(self.blocks(self.stem(x))))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 digits (8x8, values 0..16) upsampled to ``size`` x ``size``, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean()) * 100


SIZES = (16, 20)


def train(model: nn.Module, xs: list[torch.Tensor], y: torch.Tensor, steps: int, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam on random mini-batches of 64, cosine-decayed learning rate; the input sizes ``xs`` (the same
    items at several sizes) take turns."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(xs[step % len(xs)][idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def _trained_state() -> tuple[dict, torch.Tensor]:
    from leanml.data import TensorData

    torch.manual_seed(0)
    (x, y), (x2, _) = digits(SIZES[0]), digits(SIZES[1])
    train_idx = torch.tensor(TensorData(name="digits", x=x, y=y).indices("calib"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: one thread is faster than two contended ones (about 45 s)
    try:
        model = train(MobileSame(), [x[train_idx], x2[train_idx]], y[train_idx], steps=400)
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in model.state_dict().items()}, train_idx


def trained_model() -> nn.Module:
    """A fresh copy of the trained network (trained once per test session, on the calibration split)."""
    state, _ = _trained_state()
    model = MobileSame()
    model.load_state_dict(state)
    return model.eval()


def digits_data():
    """The digits at the calibration size as leanml data (seeded split: the network trained on the
    ``calib`` items), and the held-out ``eval`` items and labels at both sizes."""
    from leanml.data import TensorData

    (x, y), (x2, _) = digits(SIZES[0]), digits(SIZES[1])
    data = TensorData(name="digits", x=x, y=y)
    held = torch.tensor(data.indices("eval"))
    return data, x[held], x2[held], y[held]
