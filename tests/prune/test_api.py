"""The handlers on the tiny llama: requested sparsity in every targeted layer, lm_head untouched."""

from __future__ import annotations

import pytest
import torch

import leanml.prune
from leanml.config import config_from_dict
from leanml.errors import LeanmlError
from leanml.models import output_tensor
from leanml.prune import GradualPrune, Prune, SparseLinear
from leanml.prune.masks import n_removed
from leanml.recipe import Recipe

CALIB = {"calib_windows": 4, "window": 32}


def targeted(handle) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in handle.module.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def check_untouched_head(handle, head_before, emb_before):
    head = handle.module.lm_head
    assert type(head) is torch.nn.Linear and torch.equal(head.weight, head_before)
    assert torch.equal(handle.module.model.embed_tokens.weight, emb_before)


def check_runs(handle):
    out = output_tensor(handle.call(handle.example_inputs))
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "taylor", "gradient"])
def test_unstructured_exact_sparsity_per_layer(tiny_llama, tiny_text, method):
    head, emb = tiny_llama.module.lm_head.weight.detach().clone(), tiny_llama.module.model.embed_tokens.weight.detach().clone()
    dense = {n: m.weight.detach().clone() for n, m in targeted(tiny_llama).items()}
    leanml.prune(tiny_llama, Prune(method=method, sparsity=0.5, **CALIB), tiny_text)
    layers = targeted(tiny_llama)
    assert set(layers) == set(dense) and len(layers) == 14
    for name, layer in layers.items():
        assert isinstance(layer, SparseLinear), name
        removed = int((~layer.weight_mask).sum())
        if method == "wanda":  # per output row (Wanda's comparison group)
            assert torch.equal((~layer.weight_mask).sum(1), torch.full((layer.out_features,), n_removed(0.5, layer.in_features)))
        else:
            assert removed == n_removed(0.5, layer.weight.numel()), name
        assert bool((layer.weight[~layer.weight_mask] == 0).all())
        if method != "sparsegpt":  # SparseGPT updates the kept weights; the others leave them alone
            assert torch.equal(layer.weight[layer.weight_mask], dense[name][layer.weight_mask])
    check_untouched_head(tiny_llama, head, emb)
    check_runs(tiny_llama)
    report = tiny_llama.meta["reports"]["prune.json"]
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert tiny_llama.meta["applied"][-1]["kind"] == "prune"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_every_group(tiny_llama, tiny_text, method):
    head, emb = tiny_llama.module.lm_head.weight.detach().clone(), tiny_llama.module.model.embed_tokens.weight.detach().clone()
    leanml.prune(tiny_llama, Prune(method=method, pattern="2:4", **CALIB), tiny_text)
    for name, layer in targeted(tiny_llama).items():
        groups = layer.weight_mask.reshape(layer.out_features, -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
        assert bool(((layer.weight != 0).reshape(layer.out_features, -1, 4).sum(-1) <= 2).all())
    check_untouched_head(tiny_llama, head, emb)
    check_runs(tiny_llama)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_global_scope_exact_overall(tiny_llama, tiny_text, method):
    leanml.prune(tiny_llama, Prune(method=method, sparsity=0.6, scope="global", **CALIB), tiny_text)
    layers = targeted(tiny_llama)
    total = sum(m.weight.numel() for m in layers.values())
    removed = sum(int((~m.weight_mask).sum()) for m in layers.values())
    assert removed == n_removed(0.6, total)
    per_layer = [m.sparsity for m in layers.values()]
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold, so layers differ


def test_sparsegpt_keeps_outputs_closer_than_magnitude(tiny_llama, tiny_text):
    import copy

    ids = torch.tensor([[min(ord(c), 127) for c in "the quick brown fox jumps over the lazy dog"]])
    ref = output_tensor(tiny_llama.module(input_ids=ids)).detach()
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        h = copy.deepcopy(tiny_llama)
        leanml.prune(h, Prune(method=method, sparsity=0.5, **CALIB), tiny_text)
        errs[method] = float((output_tensor(h.module(input_ids=ids)) - ref).norm())
    assert errs["sparsegpt"] < errs["magnitude"], errs


def test_targets_and_bad_input(tiny_llama, tiny_text):
    leanml.prune(tiny_llama, Prune(method="magnitude", sparsity=0.25, targets=["re:mlp\\.down_proj$"]))
    pruned = [n for n, m in tiny_llama.module.named_modules() if isinstance(m, SparseLinear)]
    assert pruned == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(LeanmlError, match="matches no"):
        leanml.prune(tiny_llama, Prune(method="magnitude", targets=["re:nothing_here"]))
    with pytest.raises(LeanmlError, match="calibration data"):
        leanml.prune(tiny_llama, Prune(method="wanda"))
    with pytest.raises(LeanmlError, match="multiple of 3"):
        leanml.prune(tiny_llama, Prune(method="magnitude", pattern="1:3"))
    for bad, match in (
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.5}, "sparsity"),
        ({"pattern": "4:4"}, "n < m"),
        ({"pattern": "5:4"}, "n < m"),
        ({"pattern": "n:m", "n": 2}, "needs integers"),
        ({"pattern": "sparse"}, "pattern 'sparse'"),
        ({"method": "sparsegpt", "scope": "global"}, "per layer"),
    ):
        with pytest.raises(LeanmlError, match=match) as err:
            Prune(**bad)
        assert "\n" not in str(err.value)
        with pytest.raises(LeanmlError, match=match):
            config_from_dict({"kind": "prune", **bad})


def test_configs_round_trip_through_recipes():
    recipe = Recipe.from_yaml(
        "steps:\n- {kind: prune, method: sparsegpt, pattern: '2:4'}\n- {kind: gradual-prune, final_sparsity: 0.7, steps: 3}\n"
    )
    assert isinstance(recipe.steps[0], Prune) and (recipe.steps[0].n, recipe.steps[0].m) == (2, 4)
    assert recipe.steps[0].target_sparsity == 0.5 and isinstance(recipe.steps[1], GradualPrune)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe


def test_gradual_prune_masks_fixed_and_final_sparsity(tiny_llama, tiny_text):
    head, emb = tiny_llama.module.lm_head.weight.detach().clone(), tiny_llama.module.model.embed_tokens.weight.detach().clone()
    cfg = GradualPrune(final_sparsity=0.6, steps=3, finetune_steps_per_step=2, lr=1e-3, calib_windows=3, window=32)
    leanml.prune(tiny_llama, cfg, tiny_text)
    for name, layer in targeted(tiny_llama).items():
        assert isinstance(layer, SparseLinear)
        assert int((~layer.weight_mask).sum()) == n_removed(0.6, layer.weight.numel()), name
        assert bool((layer.weight[~layer.weight_mask] == 0).all())
    report = tiny_llama.meta["reports"]["prune.json"]
    assert report["schedule"] == pytest.approx([0.6 * (1 - (2 / 3) ** 3), 0.6 * (1 - (1 / 3) ** 3), 0.6])
    assert len(report["losses"]) == 6 and all(loss == loss for loss in report["losses"])
    check_untouched_head(tiny_llama, head, emb)
    check_runs(tiny_llama)


def test_gradual_taylor_global(tiny_llama, tiny_text):
    cfg = GradualPrune(
        method="taylor",
        final_sparsity=0.5,
        steps=2,
        finetune_steps_per_step=1,
        scope="global",
        calib_windows=2,
        window=32,
        distill=False,
    )
    leanml.prune(tiny_llama, cfg, tiny_text)
    layers = targeted(tiny_llama)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((~m.weight_mask).sum()) for m in layers.values()) == n_removed(0.5, total)
    assert all(not p.requires_grad or p.grad is None for p in tiny_llama.module.parameters())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_allocation_varies_per_layer_and_keeps_the_total(tiny_llama, tiny_text, method):
    leanml.prune(tiny_llama, Prune(method=method, sparsity=0.5, allocation="owl", owl_lambda=0.1, **CALIB), tiny_text)
    layers = targeted(tiny_llama)
    per_layer = [layer.sparsity for layer in layers.values()]
    assert max(per_layer) - min(per_layer) > 0.05  # not uniform
    assert all(0.29 <= s <= 0.71 for s in per_layer)  # target ± lambda, shifted to keep the total
    total = sum(layer.weight.numel() for layer in layers.values())
    removed = sum(int((~layer.weight_mask).sum()) for layer in layers.values())
    assert removed / total == pytest.approx(0.5, abs=0.01)  # rounding per row / layer only
    with pytest.raises(LeanmlError, match="owl"):
        Prune(method="magnitude", allocation="owl")


def test_dense_target_weight_is_the_least_squares_map():
    """W' = argmin ||D Wᵀ - X W'ᵀ||, against torch.linalg.lstsq (damp tiny: tolerance 1e-5 relative)."""
    from leanml.prune.api import dense_target_weight

    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 12, generator=g, dtype=torch.float64)
    D = X + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    got = dense_target_weight(W, X.T @ X, X.T @ D, damp=1e-12)
    want = torch.linalg.lstsq(X, D @ W.T).solution.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_sparsegpt_dense_targets_keeps_sparsity_and_outputs_closer(tiny_llama, tiny_text):
    """Dense targets: exact per-layer sparsity, and the model's logits end closer to the dense model's
    than plain SparseGPT's (the objective it changes is exactly that end-to-end drift)."""
    import copy

    ids = torch.tensor([[min(ord(c), 127) for c in "the quick brown fox jumps over the lazy dog"]])
    ref = output_tensor(tiny_llama.module(input_ids=ids)).detach()
    errs = {}
    for dense in (False, True):
        h = copy.deepcopy(tiny_llama)
        leanml.prune(h, Prune(method="sparsegpt", sparsity=0.5, dense_targets=dense, **CALIB), tiny_text)
        for name, lin in targeted(h).items():
            assert isinstance(lin, SparseLinear), name
            assert int((~lin.weight_mask).sum()) == n_removed(0.5, lin.weight.numel()), name
            assert bool((lin.weight[~lin.weight_mask] == 0).all())
        errs[dense] = float((output_tensor(h.module(input_ids=ids)) - ref).norm())
    assert errs[True] < errs[False], errs
    with pytest.raises(ValueError, match="dense_targets applies to method sparsegpt"):
        Prune(method="wanda", dense_targets=True)
