"""A filter cut that reaches a small part of the model says so: prune.json counts the layers pruned and
the FLOPs removed (against ``count_flops`` before and after), and a cut far short of its ratio is a note."""

from __future__ import annotations

import torch
from torch import nn

import leanml
from leanml.data import TensorData
from leanml.measure.cost import count_flops
from leanml.models import ModelHandle
from leanml.prune import StructuredPrune


class Bottleneck(nn.Module):
    """stem 3→32, a residual block whose inner width is 4, a 1×1 head to 10 classes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 4, 1)
        self.b = nn.Conv2d(4, 32, 1)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(x).mean((2, 3))


def _prune(coupled: str):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    handle = ModelHandle(module=Bottleneck().eval(), task="generic", name="bottleneck", example_inputs=(x,))
    before = count_flops(handle, (x,))
    result = leanml.compress(handle, StructuredPrune(unit="filters", ratio=0.5, coupled=coupled), measure=False)
    report = result.handle.meta["reports"]["prune.json"]
    return report, result, before, count_flops(result.handle, (x,))


def test_a_cut_that_reaches_most_of_the_model_is_reported_without_a_warning():
    report, result, before, after = _prune("prune")
    # stem+b (joined by the residual add) and a are halved; the head's outputs are the model's
    assert report["producers_targeted"] == 4 and report["producers_pruned"] == 3
    assert (report["flops_before"], report["flops_after"]) == (before, after)
    assert abs(report["flops_fraction_removed"] - (before - after) / before) < 1e-12
    assert "warning" not in report and not [n for n in result.notes if "most of the model" in n]
    assert report["summary"].startswith("filters 0.5: pruned 3 of the 4 targeted Conv layers")


def test_a_cut_far_short_of_its_ratio_is_a_note():
    report, result, before, after = _prune("skip")
    # only the 4-wide inner conv: per pixel 2·(32·2 + 2·32) of 2·(27·32 + 32·4 + 4·32 + 32·10) FLOPs, plus biases
    assert report["producers_pruned"] == 1 and report["layers"]["a"] == {"removed": 2, "kept": 2}
    assert report["flops_fraction_removed"] < 0.25 * 0.5
    by_hand = (32 * 2 + 2 * 32) / (27 * 32 + 32 * 4 + 4 * 32 + 32 * 10)
    assert abs(report["flops_fraction_removed"] - by_hand) < 0.01
    (note,) = [n for n in result.notes if "most of the model was not pruned" in n]
    assert "pruned 1 of the 4 targeted Conv layers" in note and "coupled by a residual" in note


def test_the_compress_cli_prints_the_note(tmp_path, capsys):
    import pytest

    from leanml.cli import main

    torch.manual_seed(0)
    torch.save(Bottleneck().eval(), tmp_path / "m.pt")
    torch.save({"x": torch.rand(64, 3, 8, 8), "y": torch.zeros(64, dtype=torch.long)}, tmp_path / "d.pt")
    recipe = "steps:\n  - kind: prune-structured\n    unit: filters\n    ratio: 0.5\n    coupled: skip\n"
    (tmp_path / "r.yaml").write_text(recipe)
    argv = ["compress", str(tmp_path / "m.pt"), "--recipe", str(tmp_path / "r.yaml"), "--data", str(tmp_path / "d.pt")]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "o"), "--no-measure"])
    out = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0, out
    assert "most of the model was not pruned" in out and "not measured (--no-measure)" in out
    assert (tmp_path / "o" / "prune.json").exists() and not (tmp_path / "o" / "after.json").exists()


class Shared(nn.Module):
    """One conv called twice: its channels cannot be removed (the only conv of the model)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x))).mean((2, 3))


def test_a_model_nothing_can_be_pruned_in_is_refused_before_it_is_measured(monkeypatch):
    import pytest

    from leanml import pipeline
    from leanml.errors import LeanmlError

    def measured(*a, **k):
        raise AssertionError("measured before the refusal")

    monkeypatch.setattr(pipeline, "profile", measured)
    x = torch.rand(16, 4, 8, 8)
    handle = ModelHandle(module=Shared().eval(), task="generic", name="shared", example_inputs=(x[:2],))
    data = TensorData(name="toy", x=x, y=torch.zeros(16, dtype=torch.long))
    with pytest.raises(LeanmlError, match=r"no filters of model 'shared' can be removed: 'conv' is layer 'conv' is called"):
        leanml.compress(handle, StructuredPrune(unit="filters", ratio=0.5), data=data)
