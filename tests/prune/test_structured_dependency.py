"""The torch.fx dependency analysis on small graphs: what couples channels, what keeps them whole, and
that an operation it does not model never leads to a wrong removal."""

from __future__ import annotations

import torch
from torch import nn

import leanml
from leanml.models import ModelHandle
from leanml.prune import StructuredPrune, channel_groups
from leanml.prune.dependency import IN, OUT


def by_producers(model, x):
    return {tuple(g.producers): g for g in channel_groups(model, (x,))}


class SeqMLP(nn.Module):
    """Token features averaged over the sequence axis (which lies before the feature axis)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):  # (B, T, 6)
        return self.fc2(torch.relu(self.fc1(x)).mean(1))


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class SliceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, :2])


class ReuseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shared, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.shared(torch.relu(self.shared(self.a(x)))))


class SENet(nn.Module):
    """A conv whose channels are gated by a squeeze-and-excitation branch (Linear layers)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        return self.head(y * s.view(s.size(0), s.size(1), 1, 1))


def test_reduction_before_the_feature_axis_keeps_the_group():
    torch.manual_seed(0)
    model = SeqMLP().eval()
    x = torch.randn(2, 5, 6)
    g = by_producers(model, x)[("fc1",)]
    assert g.prunable and {(m.layer, m.role) for m in g.members} == {("fc1", OUT), ("fc2", IN)}
    with torch.no_grad():
        model.fc1.weight[[1, 6]] = 0
        model.fc1.bias[[1, 6]] = 0
        model.fc2.weight[:, [1, 6]] = 0
    before = model(x)
    handle = ModelHandle(module=model, task="generic", name="seq", example_inputs=(x,))
    leanml.prune(handle, StructuredPrune(unit="neurons", ratio=0.25, criterion="l1"))
    assert model.fc1.out_features == model.fc2.in_features == 6
    torch.testing.assert_close(model(x), before)


def test_concatenation_and_slicing_keep_channels_whole():
    x = torch.randn(1, 3, 4, 4)
    groups = by_producers(CatNet(), x)
    assert not groups[("a",)].prunable and "operation 'cat' is not supported" in groups[("a",)].frozen[0]
    assert not groups[("b",)].prunable
    groups = by_producers(SliceNet(), x)
    assert not groups[("a",)].prunable and "getitem" in groups[("a",)].frozen[0]


def test_a_reused_layer_keeps_its_channels_whole():
    groups = by_producers(ReuseNet(), torch.randn(1, 3, 4, 4))
    reused = [g for g in groups.values() if "shared" in g.producers or any(m.layer == "shared" for m in g.members)]
    assert reused and all(any("called more than once" in r for r in g.frozen) for g in reused)


def test_squeeze_excitation_gate_is_coupled_and_pruned_with_the_conv():
    torch.manual_seed(0)
    model = SENet().eval()
    x = torch.randn(2, 3, 6, 6)
    g = by_producers(model, x)[("conv", "fc2")]
    assert g.coupled and g.prunable
    assert {(m.layer, m.role) for m in g.members} == {("conv", OUT), ("fc2", OUT), ("fc1", IN), ("head", IN)}
    zeroed = [0, 3, 4, 7]
    with torch.no_grad():
        model.conv.weight[zeroed] = 0
        model.conv.bias[zeroed] = 0
        model.fc2.weight[zeroed] = 0
        model.fc2.bias[zeroed] = 0
        model.fc1.weight[:, zeroed] = 0
        model.head.weight[:, zeroed] = 0
    before = model(x)
    handle = ModelHandle(module=model, task="generic", name="se", example_inputs=(x,))
    leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5, criterion="l2"))
    report = handle.meta["reports"]["prune.json"]
    assert report["groups"][0]["removed_indices"] == zeroed
    assert model.conv.out_channels == model.fc2.out_features == model.fc1.in_features == model.head.in_channels == 4
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-5)
