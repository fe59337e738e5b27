"""The choice is honest: the verdict follows the test split, the fidelity guard and the memory limit
reject what the selection score alone would take, and an 8-bit-upgrade mix assembled from one
calibrated pass is exactly what its recipe gives."""

from __future__ import annotations

import re

import pytest
import torch

from leanml.config import WeightOnly
from leanml.data import TensorData
from leanml.pipeline import apply_recipe
from leanml.quantize.api import upgrade_layers
from leanml.recipe import Recipe
from leanml.search import optimize
from leanml.search import study as mod
from leanml.search.space import Space
from leanml.search.study import clone

from .worker import toy


def _only(point: dict):
    def build(handle, runtime="auto", **kw):
        return Space(task=handle.task, choices={k: [v] for k, v in point.items()}, seeds=[dict(point)])

    return build


def test_a_choice_that_meets_the_budget_on_selection_but_not_on_test_says_so(tmp_path, monkeypatch):
    handle, data = toy()
    point = {"ffn": "0.5", "runtime": "torch"}
    space = _only(point)(handle)
    cand = clone(handle)
    apply_recipe(cand, space.recipe(point), data)
    with torch.no_grad():
        y_orig, y_cand = handle.module(data.x).argmax(-1), cand.module(data.x).argmax(-1)
    assert (y_orig != y_cand).float().mean() > 0.05  # the cut changes predictions
    # constructed labels: on the selection split they are the candidate's predictions (it looks better than the
    # original there), on the test split the original's (it is worse there)
    y = y_orig.clone()
    sel = torch.tensor(data.indices("select"))
    y[sel] = y_cand[sel]
    data = TensorData(name="constructed", x=data.x, y=y)
    monkeypatch.setattr(mod, "build_space", _only(point))
    res = optimize(handle, data, budget="1%", runtime="torch", trials=1, out=tmp_path / "o", threads=1, min_fidelity=0)
    (rec,) = res.trials
    assert rec["status"] == "complete" and rec["quality_drop"] < 0 and rec["meets_budget"]
    assert rec["test"]["quality_drop"] > 0.01 and not rec["test"]["meets_budget"]
    s = res.summary
    assert s["met_selection"] and not s["met"]
    assert s["after"]["quality"]["value"] == rec["test"]["quality"]  # the cost table quotes the test split
    report = (tmp_path / "o" / "report.md").read_text()
    assert "budget met on the selection split but NOT on the test split" in report
    assert "noise, not an improvement" in report  # a gain from an untrained cut is flagged
    assert "NOT on the test split" in s["why"]


def test_the_fidelity_guard_rejects_a_candidate_far_from_the_original(tmp_path, monkeypatch):
    handle, data = toy()
    monkeypatch.setattr(mod, "build_space", _only({"ffn": "0.5", "runtime": "torch"}))
    res = optimize(handle, data, budget="100%", runtime="torch", trials=1, threads=1, min_fidelity=0.999)
    (rec,) = res.trials
    assert rec["status"] == "rejected" and rec["reason"].startswith("fidelity guard: top-1 agreement with the original")
    assert rec["fidelity_score"] < 0.999 and rec["fidelity"]["n_items"] == len(data.indices("check"))


def test_a_memory_limit_no_candidate_fits_chooses_nothing_within_it(monkeypatch):
    handle, data = toy()
    monkeypatch.setattr(mod, "build_space", _only({"quant": "int8-dynamic", "runtime": "torch"}))
    res = optimize(handle, data, budget="100%", runtime="torch", trials=1, threads=1, max_memory="1KB", objective="memory")
    (rec,) = res.trials
    assert rec["status"] == "complete" and rec["memory_ok"] is False
    peak = rec["measurement"]["serving_memory"]["peak_bytes"]
    assert rec["objective"] == peak > 1000
    assert not res.summary["met_selection"] and not res.summary["met"] and res.chosen["memory_ok"] is False
    assert "No candidate met the budget" in res.summary["why"]


def test_an_upgrade_mix_assembled_from_one_pass_equals_its_recipe():
    from tests.families import corpus, handle

    h = handle("llama")
    data = corpus()
    names = [n for n, m in h.module.named_modules() if isinstance(m, torch.nn.Linear) and "mlp" in n][:2]
    cfg = WeightOnly(bits=4, group_size=16, method="gptq", calib_windows=2, window=64, upgrade=names)
    direct = clone(h)
    apply_recipe(direct, Recipe(name="direct", steps=[cfg]), data)
    assembled = clone(h)
    apply_recipe(assembled, Recipe(name="pass", steps=[cfg.model_copy(update={"upgrade": []})]), data)
    upgrade_layers(assembled, h, cfg)
    a, b = direct.module.state_dict(), assembled.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    bits = {n: m.bits for n, m in direct.module.named_modules() if hasattr(m, "bits") and hasattr(m, "qweight")}
    assert {bits[n] for n in names} == {8} and set(bits.values()) == {4, 8}
    assert assembled.meta["applied"][-1]["upgrade"] == names


def test_an_upgrade_with_awq_is_refused_in_one_line():
    """AWQ folds its scales into neighbouring layers: a layer re-quantized from its original weights would not
    fit them (on SmolLM2 such a mix had exp(-KL) 0.01 to the original), so the config refuses it."""
    from leanml.errors import LeanmlError
    from leanml.recipe import load_recipe

    for method in ("awq", "awq+gptq"):
        with pytest.raises(
            LeanmlError, match=f"upgrade needs a method that changes only the layer it quantizes.*{re.escape(method)} folds"
        ) as info:
            load_recipe({"steps": [{"kind": "weight-only", "method": method, "upgrade": ["0"]}]})
        assert "\n" not in str(info.value)
    load_recipe({"steps": [{"kind": "weight-only", "method": "gptq", "upgrade": ["0"]}]})  # GPTQ is local: accepted
