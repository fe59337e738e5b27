"""Structured filter pruning of plain CNNs: channel groups from the torch.fx dependency analysis
(residual channels coupled), exact removal of zeroed filters, exact parameter counts, artifact round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanml
from leanml.artifact import load_artifact, save_artifact
from leanml.data import TensorData
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from leanml.prune import StructuredPrune, channel_groups
from leanml.prune.dependency import IN, OUT, THROUGH


class Block(nn.Module):
    """A ResNet basic block with an identity shortcut: its output channels are its input channels."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Stem, two residual blocks at 8 channels, a strided conv to 16, a depthwise conv, pooling, a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = Block(8)
        self.b2 = Block(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dwbn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        x = torch.relu(self.dwbn(self.dw(torch.relu(self.bn(self.down(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


class FlatNet(nn.Module):
    """A conv read by a Linear after a flatten: each channel owns 4*4 input features of the Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).view(x.size(0), -1))


class GroupedNet(nn.Module):
    """A grouped conv (groups=2) between two dense convs, then a separately prunable conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.conv4 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv4(torch.relu(self.conv3(torch.relu(self.grouped(torch.relu(self.conv1(x)))))))


RESIDUAL = ["stem.0", "b1.conv2", "b2.conv2"]


def make_resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():  # non-trivial BatchNorm statistics, so BN is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, 0.2, 0.6)  # few channels dead after the ReLU (no ties at 0)
    return model.eval()


def images(n: int = 4, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def handle_of(model: nn.Module, x: torch.Tensor) -> ModelHandle:
    return ModelHandle(module=model, task="generic", name=type(model).__name__, example_inputs=(x,))


def data_of(size: int = 8) -> TensorData:
    return TensorData(name="imgs", x=images(64, size, seed=2))


@torch.no_grad()
def zero_units(model: nn.Module, x: torch.Tensor, zeroed: dict[str, list[int]]) -> None:
    """Zero every weight of the given channels in every member of their group (keyed by a producer):
    producer rows and bias, BatchNorm scale and shift, depthwise filters, consumer columns."""
    for g in channel_groups(model, (x,)):
        key = next((p for p in g.producers if p in zeroed), None)
        if key is None:
            continue
        idx = torch.tensor(zeroed[key])
        for m in g.members:
            mod = model.get_submodule(m.layer)
            if m.role in (OUT, THROUGH):
                mod.weight[idx] = 0
                if mod.bias is not None:
                    mod.bias[idx] = 0
            else:
                cols = (idx[:, None] * m.chunk + torch.arange(m.chunk)).reshape(-1)
                mod.weight[:, cols] = 0


# ----------------------------------------------------------------------------------------------------


def test_dependency_groups_couple_residual_channels():
    model = make_resnet()
    groups = {tuple(g.producers): g for g in channel_groups(model, (images(),))}
    res = groups[tuple(RESIDUAL)]
    assert res.coupled and res.prunable and res.channels == 8
    assert {(m.layer, m.role) for m in res.members} == {
        ("stem.0", OUT),
        ("stem.1", THROUGH),
        ("b1.conv2", OUT),
        ("b1.bn2", THROUGH),
        ("b2.conv2", OUT),
        ("b2.bn2", THROUGH),
        ("b1.conv1", IN),
        ("b2.conv1", IN),
        ("down", IN),
    }
    inner = groups[("b1.conv1",)]
    assert not inner.coupled and {(m.layer, m.role) for m in inner.members} == {
        ("b1.conv1", OUT),
        ("b1.bn1", THROUGH),
        ("b1.conv2", IN),
    }
    down = groups[("down",)]
    assert {(m.layer, m.role) for m in down.members} == {
        ("down", OUT),
        ("bn", THROUGH),
        ("dw", THROUGH),
        ("dwbn", THROUGH),
        ("fc", IN),
    }
    assert groups[("fc",)].frozen == ["model output"]  # the logits stay


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "activation"])
def test_removing_zeroed_filters_keeps_outputs(criterion):
    x = images()
    model = make_resnet()
    zeroed = {"stem.0": [1, 4, 5, 6], "b1.conv1": [0, 3, 5, 7], "b2.conv1": [2, 3, 4, 6], "down": [0, 2, 3, 5, 8, 9, 12, 15]}
    zero_units(model, x, zeroed)
    before = model(x)
    handle = handle_of(model, x)
    leanml.prune(
        handle,
        StructuredPrune(unit="filters", ratio=0.5, criterion=criterion, calib_windows=2),
        data_of() if criterion in ("taylor", "activation") else None,
    )
    report = handle.meta["reports"]["prune.json"]
    removed = {g["producers"][0]: g["removed_indices"] for g in report["groups"]}
    assert removed == zeroed
    after = model(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert model.stem[0].out_channels == model.stem[1].num_features == model.b1.conv1.in_channels == 4
    assert model.b1.conv1.out_channels == model.b1.bn1.num_features == model.b1.conv2.in_channels == 4
    assert model.down.in_channels == 4 and model.down.out_channels == 8
    assert model.dw.groups == model.dw.in_channels == model.dw.out_channels == model.dwbn.num_features == 8
    assert model.fc.in_features == 8 and model.fc.out_features == 10
    assert handle.meta["applied"][-1]["kind"] == "prune-structured"


def test_parameter_count_drops_by_the_exact_amount():
    model = make_resnet()
    handle = handle_of(model, images())
    before = sum(p.numel() for p in model.parameters())
    leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5, criterion="l1"))
    after = sum(p.numel() for p in model.parameters())
    # 8 -> 4 residual channels, 8 -> 4 in each block's inner conv, 16 -> 8 after the strided conv.
    expected_before = (
        (3 * 8 * 9 + 8) + 16 + 2 * (2 * 8 * 8 * 9 + 2 * 16) + (8 * 16 * 9 + 16) + 32 + (16 * 9 + 16) + 32 + (16 * 10 + 10)
    )
    expected_after = (3 * 4 * 9 + 4) + 8 + 2 * (2 * 4 * 4 * 9 + 2 * 8) + (4 * 8 * 9 + 8) + 16 + (8 * 9 + 8) + 16 + (8 * 10 + 10)
    assert (before, after) == (expected_before, expected_after) == (4170, 1226)
    report = handle.meta["reports"]["prune.json"]
    assert (report["params_before"], report["params_after"]) == (4170, 1226)
    assert report["layers"]["down"] == {"removed": 8, "kept": 8}
    assert all(report["layers"][p] == {"removed": 4, "kept": 4} for p in RESIDUAL)


def test_residual_group_keeps_the_same_channels_in_every_member():
    x = images()
    model = make_resnet(seed=3)
    orig = {n: t.detach().clone() for n, t in model.state_dict().items()}
    handle = handle_of(model, x)
    leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.25, criterion="l2"))
    groups = {tuple(g["producers"]): g for g in handle.meta["reports"]["prune.json"]["groups"]}
    removed = groups[tuple(RESIDUAL)]["removed_indices"]
    assert len(removed) == 2
    keep = torch.tensor([i for i in range(8) if i not in removed])
    inner = {b: torch.tensor([i for i in range(8) if i not in groups[(f"{b}.conv1",)]["removed_indices"]]) for b in ("b1", "b2")}
    state = model.state_dict()
    for bn in ("stem.1", "b1.bn2", "b2.bn2"):  # every BatchNorm on the residual stream keeps the same channels
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(state[f"{bn}.{key}"], orig[f"{bn}.{key}"][keep]), (bn, key)
    assert torch.equal(state["stem.0.weight"], orig["stem.0.weight"][keep])
    for b in ("b1", "b2"):  # conv2 writes the residual channels, conv1 reads them
        assert torch.equal(state[f"{b}.conv2.weight"], orig[f"{b}.conv2.weight"][keep][:, inner[b]])
        assert torch.equal(state[f"{b}.conv1.weight"], orig[f"{b}.conv1.weight"][inner[b]][:, keep])
    keep_down = torch.tensor([i for i in range(16) if i not in groups[("down",)]["removed_indices"]])
    assert torch.equal(state["down.weight"], orig["down.weight"][keep_down][:, keep])
    assert model(x).shape == (4, 10)


def test_pruned_cnn_round_trips_through_the_artifact(tmp_path):
    x = images()
    model = make_resnet()
    handle = handle_of(model, x)
    leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5, criterion="l1"))
    expected = model(x)
    save_artifact(handle, tmp_path / "cnn")
    again = load_artifact(tmp_path / "cnn")
    assert again.module.stem[0].out_channels == 4 and again.module.fc.in_features == 8
    assert torch.equal(again.module(x), expected)


def test_coupled_skip_leaves_the_residual_group_whole():
    model = make_resnet()
    handle = handle_of(model, images())
    leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5, coupled="skip"))
    report = handle.meta["reports"]["prune.json"]
    assert model.stem[0].out_channels == 8 and model.b1.conv2.out_channels == 8
    assert model.b1.conv1.out_channels == 4 and model.down.out_channels == 8
    assert report["skipped"] == [{"layers": RESIDUAL, "reason": "coupled by a residual connection (coupled: skip)"}]


def test_targets_leave_a_coupled_group_whole_when_one_producer_is_ignored():
    model = make_resnet()
    handle = handle_of(model, images())
    leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5, ignore=["b2.conv2"]))
    assert model.stem[0].out_channels == 8 and model.b2.conv1.out_channels == 4
    skipped = handle.meta["reports"]["prune.json"]["skipped"]
    assert skipped[0]["layers"] == RESIDUAL and "'b2.conv2'" in skipped[0]["reason"]


@pytest.mark.parametrize("criterion", ["l2", "activation"])
def test_flatten_into_a_linear_removes_whole_feature_blocks(criterion):
    torch.manual_seed(0)
    model = FlatNet().eval()
    x = images(size=4)
    zero_units(model, x, {"conv": [0, 2, 3]})
    before = model(x)
    handle = handle_of(model, x)
    leanml.prune(
        handle, StructuredPrune(unit="filters", ratio=0.5, criterion=criterion), data_of(4) if criterion == "activation" else None
    )
    assert model.conv.out_channels == 3 and model.head.in_features == 3 * 16
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_grouped_convs_are_left_whole_with_the_reason():
    torch.manual_seed(0)
    model = GroupedNet().eval()
    handle = handle_of(model, images())
    leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5))
    assert model.conv1.out_channels == 8 and model.grouped.out_channels == 8 and model.conv3.out_channels == 3
    reasons = {tuple(s["layers"]): s["reason"] for s in handle.meta["reports"]["prune.json"]["skipped"]}
    assert "grouped conv 'grouped' (groups=2) is not supported" in reasons[("conv1",)]
    with pytest.raises(LeanmlError, match="no filters of model 'GroupedNet' can be removed.*grouped conv") as info:
        leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5, targets=["conv1"]))
    assert "\n" not in str(info.value)


def test_neurons_of_a_plain_mlp(mlp):
    x = torch.randn(8, 20)
    handle = handle_of(mlp, x)
    before = sum(p.numel() for p in mlp.parameters())
    leanml.prune(handle, StructuredPrune(unit="neurons", ratio=0.25))
    assert mlp[0].out_features == 12 and mlp[2].in_features == 12
    assert before - sum(p.numel() for p in mlp.parameters()) == 4 * 20 + 4 + 4 * 5
    assert mlp(x).shape == (8, 5)


def test_filters_50_recipe_through_apply_recipe():
    from leanml.pipeline import apply_recipe
    from leanml.recipe import Recipe, load_recipe

    recipe = load_recipe("filters-50")
    assert recipe.steps == [StructuredPrune(unit="filters", ratio=0.5, criterion="activation", calib_windows=16)]
    model = make_resnet()
    apply_recipe(handle_of(model, images()), recipe, TensorData(name="images", x=images()))
    assert model.down.out_channels == 8
    yaml_recipe = Recipe.from_yaml("steps:\n  - kind: prune-structured\n    unit: filters\n    ratio: 0.25\n")
    model = make_resnet()
    apply_recipe(handle_of(model, images()), yaml_recipe)
    assert model.down.out_channels == 12 and model.stem[0].out_channels == 6


@pytest.mark.parametrize(
    "make, cfg, message",
    [
        (make_resnet, {"unit": "filters", "ratio": 1.0}, "field 'ratio' = 1.0"),
        (make_resnet, {"unit": "filters", "ratio": -0.1}, "field 'ratio' = -0.1"),
        (make_resnet, {"unit": "filters", "criterion": "random"}, "field 'criterion' = 'random'"),
        (make_resnet, {"unit": "heads"}, "unit 'heads' does not apply to model 'TinyResNet'"),
        (make_resnet, {"unit": "layers"}, "unit 'layers' does not apply"),
        (make_resnet, {"unit": "filters", "targets": ["re:nothing_here"]}, "'re:nothing_here' matches no"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {"unit": "filters"}, "has no Conv layers"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 1, 3), nn.BatchNorm2d(1), nn.ReLU(), nn.Conv2d(1, 4, 3)).eval(),
            {"unit": "filters", "ratio": 0.5},
            "ratio 0.5 would remove all 1 units of layer '0'",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(make, cfg, message):
    with pytest.raises(LeanmlError, match=message) as info:
        model = make()
        x = images() if any(isinstance(m, nn.Conv2d) for m in model.modules()) else torch.randn(2, 4)
        leanml.prune(handle_of(model, x), StructuredPrune(**cfg))
    assert "\n" not in str(info.value)


def test_taylor_needs_calibration_data():
    with pytest.raises(LeanmlError, match="needs calibration data"):
        leanml.prune(handle_of(make_resnet(), images()), StructuredPrune(unit="filters", criterion="taylor"))


def test_shapes_are_traced_on_calibration_data_when_given():
    torch.manual_seed(0)
    model = FlatNet().eval()  # reads 4x4 images only
    handle = ModelHandle(module=model, task="generic", name="flat", example_inputs=None)
    with pytest.raises(LeanmlError, match="has no example inputs"):
        leanml.prune(handle, StructuredPrune(unit="filters", ratio=0.5))
    wrong = handle_of(model, images(size=8))  # example inputs that do not fit the Linear
    with pytest.raises(LeanmlError, match="does not run on its example inputs"):
        leanml.prune(wrong, StructuredPrune(unit="filters", ratio=0.5))
    leanml.prune(wrong, StructuredPrune(unit="filters", ratio=0.5), data_of(4))  # traced on a calibration batch
    assert model.conv.out_channels == 3 and model.head.in_features == 48
