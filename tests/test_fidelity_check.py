"""Near-lossless steps check their own output: a broken transform is an error, not a result."""

from __future__ import annotations

import pytest

import leanml
from leanml.errors import LeanmlError
from leanml.pipeline import apply_recipe, fidelity_floor
from leanml.recipe import load_recipe
from tests.families import corpus, handle


def test_floors_cover_the_near_lossless_steps_only():
    floors = {name: fidelity_floor(load_recipe(name).steps[0]) for name in ("w8", "w8a8", "int8-dynamic", "w4-g64", "sparse-50")}
    assert floors == {"w8": 20.0, "w8a8": 8.0, "int8-dynamic": 8.0, "w4-g64": None, "sparse-50": None}


def test_a_good_w8_records_its_check():
    h = handle("llama")
    apply_recipe(h, "w8", corpus())
    (check,) = h.meta["checks"]
    assert check["kind"] == "weight-only" and check["sqnr_db"] > 30  # observed about 45 dB


def test_a_transform_that_loses_the_embedding_scale_is_refused(monkeypatch, tmp_path):
    """Gemma multiplies its embeddings by sqrt(hidden); a quantized tied head that forgot it (as an
    earlier release did) must stop the run instead of writing a broken model."""
    import leanml.quantize.api as qapi

    monkeypatch.setattr(qapi, "embedding_scale", lambda emb, name: 1.0)
    h = handle("gemma")
    with pytest.raises(LeanmlError, match=r"step 1 \(weight-only\) should be near-lossless .* dB \(< 20 dB\)") as err:
        leanml.compress(h, "w8", out=tmp_path / "out", measure=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
