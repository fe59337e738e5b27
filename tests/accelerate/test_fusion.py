"""BatchNorm folding: exact up to float rounding, only where the layer's output feeds the BN alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from leanml.accelerate.fusion import fold_batchnorm, fold_conv_bn_weights, fold_linear_bn_weights


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters (fresh BNs are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=gen))
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


def assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """max |out - ref| <= tol * max |ref| (float32 rounding, relative to the output's scale)."""
    err = (out - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), (err, ref.abs().max().item())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


def test_pure_function_matches_torch_reference():
    torch.manual_seed(0)
    for shape in [(6, 3, 5), (6, 2, 3, 3), (6, 1, 2, 2, 2), (6, 4)]:
        w, b = torch.randn(shape), torch.randn(6)
        mean, var, gamma, beta = torch.randn(6), torch.rand(6) + 0.1, torch.randn(6), torch.randn(6)
        ours = fold_conv_bn_weights(w, b, mean, var, gamma, beta, 1e-5)
        ref = (
            fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
            if len(shape) > 2
            else fuse_linear_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
        )
        for a, r in zip(ours, ref, strict=True):
            assert a.dtype == r.dtype == torch.float32
            torch.testing.assert_close(a, r.detach(), rtol=1e-6, atol=1e-6)
    # no bias, affine=False
    w = torch.randn(4, 3, 3, 3)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    ours = fold_linear_bn_weights(w, None, mean, var, None, None, 1e-3)
    ref = fuse_conv_bn_weights(w, None, mean, var, 1e-3, None, None)
    torch.testing.assert_close(ours[0], ref[0].detach())
    torch.testing.assert_close(ours[1], ref[1].detach())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_sequential_conv_bn_is_exact(dims):
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    torch.manual_seed(dims)
    model = randomize_bn(
        nn.Sequential(conv(3, 8, 3, padding=1), bn(8), nn.ReLU(), conv(8, 4, 3, bias=False, groups=4), bn(4, affine=False))
    )
    x = torch.randn(2, 3, *([7] * dims))
    folded, fusions = fold_batchnorm(model)
    assert fusions == ["conv+bn: 0 + 1", "conv+bn: 3 + 4"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert_close_to_scale(folded(x), model(x))


def test_residual_network_and_original_unchanged():
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        folded, fusions = fold_batchnorm(model)
        out = folded(x)
    assert_close_to_scale(out, ref)
    assert fusions == [
        "conv+bn: stem.0 + stem.1",
        "conv+bn: layer1.0.conv1 + layer1.0.bn1",
        "conv+bn: layer1.0.conv2 + layer1.0.bn2",
        "conv+bn: layer1.1.conv1 + layer1.1.bn1",
        "conv+bn: layer1.1.conv2 + layer1.1.bn2",
        "conv+bn: layer1.1.down.0 + layer1.1.down.1",
    ]
    assert isinstance(folded, TinyResNet) and isinstance(folded.layer1[0].bn1, nn.Identity)
    assert not folded.training
    # the user's module: same object types, same tensors, still has its BatchNorms
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d) and model.layer1[0].conv1.bias is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_linear_bn1d():
    torch.manual_seed(1)
    model = randomize_bn(
        nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5, bias=False), nn.BatchNorm1d(5))
    )
    x = torch.randn(32, 12)
    folded, fusions = fold_batchnorm(model)
    assert fusions == ["linear+bn: 0 + 1", "linear+bn: 3 + 4"]
    with torch.no_grad():
        assert_close_to_scale(folded(x), model(x))


class TwoUsers(nn.Module):
    """conv1's output feeds bn1 and the skip path: folding bn1 into conv1 would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(y))) + y


def test_conv_with_two_users_not_folded():
    torch.manual_seed(2)
    model = randomize_bn(TwoUsers())
    folded, fusions = fold_batchnorm(model)
    assert fusions == ["conv+bn: conv2 + bn2"]
    assert isinstance(folded.bn1, nn.BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close_to_scale(folded(x), model(x))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so the Sequential fallback is used."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else x


def test_fallback_when_fx_fails():
    torch.manual_seed(3)
    model = randomize_bn(Untraceable())
    with pytest.raises(Exception):  # noqa: B017 - whatever fx raises
        torch.fx.symbolic_trace(model)
    folded, fusions = fold_batchnorm(model)
    assert fusions == ["conv+bn: body.0 + body.1"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close_to_scale(folded(x), model(x))


def test_training_mode_bn_without_running_stats_kept():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(3)
    )  # mismatched channels: not a pair either
    folded, fusions = fold_batchnorm(model.train())
    assert fusions == []
    assert model.training  # the user's module keeps its mode
