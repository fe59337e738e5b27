"""SparseLinear: packed storage (≤ 0.6x dense at 50%), exact reload, artifact round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import leanml.prune
from leanml.models import output_tensor
from leanml.prune import Prune, SparseLinear
from leanml.prune.masks import unstructured_mask
from leanml.prune.modules import pack_mask, unpack_mask
from leanml.quantize.packing import pack_bits


def test_pack_mask_layout_matches_pack_bits():
    mask = torch.rand(13, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert torch.equal(packed, pack_bits(mask.to(torch.int64), 1))
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def sparse_layer(dtype=torch.float32, sparsity=0.5, seed=0) -> tuple[torch.nn.Linear, SparseLinear]:
    torch.manual_seed(seed)
    dense = torch.nn.Linear(256, 128).to(dtype)
    layer = SparseLinear.from_linear(copy.deepcopy(dense), unstructured_mask(dense.weight.abs(), sparsity))
    return dense, layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saved_bytes_at_most_0_6_dense_and_reload_exact(tmp_path, dtype):
    dense, layer = sparse_layer(dtype)
    save_file(dense.state_dict(), str(tmp_path / "dense.safetensors"))
    save_file(layer.state_dict(), str(tmp_path / "sparse.safetensors"))
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.6, ratio  # 0.53 (fp32), 0.57 (fp16)
    assert layer.stored_nbytes() <= 0.6 * (dense.weight.numel() + dense.bias.numel()) * dense.weight.element_size()
    assert set(layer.state_dict()) == {"mask_bits", "values", "bias"}
    fresh = SparseLinear.from_spec(layer.to_spec()).to(dtype)
    fresh.load_state_dict(load_file(str(tmp_path / "sparse.safetensors")))
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.weight_mask, layer.weight_mask)
    assert torch.equal(fresh.bias, layer.bias) and fresh.sparsity == 0.5
    x = torch.randn(3, 256).to(dtype)
    assert torch.equal(fresh(x), layer(x))


def test_kept_zero_stays_in_the_mask_and_bad_state_is_reported():
    _, layer = sparse_layer()
    with torch.no_grad():
        layer.weight[layer.weight_mask.nonzero()[0].tolist()[0], layer.weight_mask.nonzero()[0].tolist()[1]] = 0.0
    fresh = SparseLinear(256, 128)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.weight_mask, layer.weight_mask)  # the mask, not the zeros, is stored
    state = layer.state_dict()
    state["values"] = state["values"][:-1]
    with pytest.raises(RuntimeError, match="values"):
        SparseLinear(256, 128).load_state_dict(state)
    with pytest.raises(RuntimeError, match="Unexpected"):
        SparseLinear(256, 128).load_state_dict({**layer.state_dict(), "extra": torch.zeros(1)})
    dense_state = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}
    from_dense = SparseLinear(256, 128)
    from_dense.load_state_dict(dense_state)  # a dense checkpoint: its zeros become the mask
    assert torch.equal(from_dense.weight, layer.weight)


def test_from_linear_shares_parameters_and_apply_mask():
    lin = torch.nn.Linear(8, 4)
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    layer = SparseLinear.from_linear(lin, mask)
    assert layer.weight is lin.weight and layer.bias is lin.bias and isinstance(layer, torch.nn.Linear)
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer.apply_mask()
    assert bool((layer.weight[~mask] == 0).all()) and bool((layer.weight[mask] != 0).all())
    again = SparseLinear.from_linear(layer, torch.ones(4, 8, dtype=torch.bool))
    assert torch.equal(again.weight_mask, mask)  # an already sparse layer keeps its zeros


def test_artifact_round_trip_of_a_pruned_llama(tiny_llama, tiny_text, tmp_path, monkeypatch):
    """With SparseLinear registered in the artifact's layer table (the wiring proposed for artifact.py),
    a pruned model saves smaller and reloads to identical outputs."""
    from leanml.artifact import load_artifact, save_artifact
    from leanml.quantize import modules as qmodules

    monkeypatch.setitem(qmodules.LAYER_TYPES, "SparseLinear", SparseLinear)
    dense_dir = save_artifact(copy.deepcopy(tiny_llama), tmp_path / "dense")
    leanml.prune(tiny_llama, Prune(method="sparsegpt", sparsity=0.5, calib_windows=2, window=32), tiny_text)
    out = save_artifact(tiny_llama, tmp_path / "sparse")
    back = load_artifact(out)
    for name, layer in tiny_llama.module.named_modules():
        if isinstance(layer, SparseLinear):
            twin = back.module.get_submodule(name)
            assert isinstance(twin, SparseLinear) and torch.equal(twin.weight, layer.weight)
            assert torch.equal(twin.weight_mask, layer.weight_mask)
    ids = tiny_llama.example_inputs["input_ids"]
    assert torch.equal(output_tensor(back.module(input_ids=ids)), output_tensor(tiny_llama.module(input_ids=ids)))
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(out) < size(dense_dir)
