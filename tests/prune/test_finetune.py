"""Recovery fine-tuning: schedule and losses against hand computation, masks kept fixed, recipe teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leanml.data import TensorData
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from leanml.pipeline import apply_recipe
from leanml.prune import Prune, SparseLinear
from leanml.prune.finetune import TEACHER_KEY, Finetune, finetune, hidden_state_loss, kd_kl, lr_factor
from leanml.recipe import Recipe


def _data(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 4, generator=gen)
    return TensorData(name="toy", x=x, y=(x @ w).argmax(1))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_lr_factor_warmup_then_cosine():
    # 10 steps, 20% warm-up = 2 steps: 0.5, 1.0, then cos decay over 8 steps
    got = [lr_factor(s, 10, 0.2) for s in range(10)]
    want = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert got == pytest.approx(want, abs=1e-12)
    assert lr_factor(0, 5, 0.0) == 1.0


def test_kd_kl_matches_torch_composition_and_scales_with_t_squared():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen)
    for temp in (1.0, 2.0, 4.0):
        ref = (
            F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True, reduction="sum")
            / (3 * 5)
            * temp**2
        )
        assert float(kd_kl(s, t, temp)) == pytest.approx(float(ref), rel=1e-5)
    assert float(kd_kl(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_state_loss_is_zero_for_equal_states_and_ignores_padding():
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(2, 6, 8, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert float(hidden_state_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    s = t.clone()
    s[0, 4:] += 100.0  # padded positions only
    assert float(hidden_state_loss(s, t, mask)) == pytest.approx(0.0, abs=1e-6)
    # MSE / teacher power by hand on the unmasked case, plus the cosine term
    s = t + 0.1
    mse = ((s - t) ** 2).mean() / (t**2).mean()
    cos = 1 - F.cosine_similarity(s.mean(1), t.mean(1), dim=-1).mean()
    assert float(hidden_state_loss(s, t, None)) == pytest.approx(float(mse + cos), rel=1e-5)


def test_task_finetune_keeps_masks_and_lowers_loss():
    data = _data()
    model = _mlp()
    handle = ModelHandle(module=model, task="image-classification", name="mlp")
    mask = torch.rand(32, 16, generator=torch.Generator().manual_seed(3)) > 0.5
    model[0] = SparseLinear.from_linear(model[0], mask)
    report = finetune(handle, Finetune(steps=60, lr=1e-2, batch_size=32, loss="task"), data)
    assert report["last_loss"] < report["first_loss"]
    assert bool((model[0].weight[~mask] == 0).all())
    assert bool((model[0].weight[mask] != 0).all())
    assert not any(p.grad is not None for p in model.parameters())


def test_recipe_distills_from_the_model_before_pruning():
    data = _data()
    model = _mlp(1)
    handle = ModelHandle(module=model, task="image-classification", name="mlp")
    x, _ = data.tensors("eval")
    with torch.no_grad():
        ref = model(x)
    recipe = Recipe(
        name="t", steps=[Prune(method="magnitude", sparsity=0.7), Finetune(steps=80, lr=5e-3, batch_size=32, loss="distill")]
    )
    pruned = ModelHandle(module=_mlp(1), task="image-classification", name="mlp")
    apply_recipe(pruned, Recipe(name="p", steps=[Prune(method="magnitude", sparsity=0.7)]), data)
    apply_recipe(handle, recipe, data)
    assert TEACHER_KEY not in handle.meta
    report = handle.meta["reports"]["finetune.json"]
    assert report["last_loss"] < report["first_loss"]
    with torch.no_grad():
        gap_tuned = kd_kl(handle.module(x), ref)
        gap_pruned = kd_kl(pruned.module(x), ref)
    assert gap_tuned < 0.5 * gap_pruned  # observed ~0.1x
    for layer in (handle.module[0], handle.module[2]):
        assert isinstance(layer, SparseLinear)
        assert layer.sparsity == pytest.approx(0.7, abs=0.02)


def test_bad_input_is_one_line():
    handle = ModelHandle(module=_mlp(), task="image-classification", name="mlp")
    with pytest.raises(LeanmlError, match="needs the original model"):
        finetune(handle, Finetune(steps=1), _data())
    with pytest.raises(LeanmlError, match="fewer than one batch"):
        finetune(handle, Finetune(steps=1, loss="task", batch_size=512), _data(n=64))
    with pytest.raises(LeanmlError, match="needs labels"):
        finetune(handle, Finetune(steps=1, loss="task"), TensorData(name="nolabels", x=torch.randn(64, 16)))
    with pytest.raises(LeanmlError, match="lr"):
        Finetune(lr=-1)
