"""Pruned layers are reported honestly: sparsity, dense bytes and stored (bitmask + values) bytes."""

from __future__ import annotations

import pytest
import torch

from leanml.measure import profile
from leanml.measure.cost import sparse_accounting
from leanml.models import ModelHandle
from leanml.prune import SparseLinear


def test_sparse_layers_are_counted_dense_and_stored():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    assert sparse_accounting(model) is None
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[:, ::2] = True  # exactly half kept
    model[0] = SparseLinear.from_linear(model[0], mask)
    acc = sparse_accounting(model)
    dense = (32 * 64 + 32) * 4
    stored = 32 * 64 // 8 + 32 * 32 * 4 + 32 * 4  # mask bits, kept values, bias
    assert acc == {
        "layers": 1,
        "sparsity": 0.5,
        "dense_bytes": dense,
        "stored_bytes": stored,
        "stored_vs_dense": round(stored / dense, 4),
    }
    m = profile(ModelHandle(module=model, task="generic", name="mlp", example_inputs=(torch.randn(4, 64),)), repeats=3)
    assert m.sparse["sparsity"] == pytest.approx(0.5)
    assert any("bitmask" in n for n in m.notes)
