"""Every verb x family cell that applies, on tiny random models of every family (tests/families.py).

Each test records its cell (family, verb, "yes" or "refused") in ``CELLS``; with ``LEANML_MATRIX_OUT``
set, the cells are written there as JSON at the end of the module and ``bench/support_matrix.py`` turns
them into the README's support matrix (a cell whose test failed is absent, so it shows as "no").
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import leanml
from leanml.artifact import load_artifact, save_artifact
from leanml.errors import LeanmlError
from leanml.models import output_tensor
from leanml.models.arch import hf_config, producers, require, resolve
from leanml.pipeline import apply_recipe
from leanml.prune.config import StructuredPrune
from leanml.quantize.weight_only import find_producer, fold_scales, rotate_residual
from tests.families import DECODERS, ENCODERS, FAMILIES, corpus, handle, no_adapter_model, tiny_model, tokens

CELLS: dict[str, dict[str, str]] = {}


def cell(family: str, verb: str, status: str = "yes") -> None:
    CELLS.setdefault(family, {})[verb] = status


@pytest.fixture(scope="module", autouse=True)
def _write_cells():
    yield
    out = os.environ.get("LEANML_MATRIX_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(CELLS, f, indent=1, sort_keys=True)


@pytest.fixture(scope="module")
def text():
    return corpus()


def run(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.model_type in ENCODERS:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model(input_ids=ids).logits


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp(min=1e-30)))


IDS = tokens(40, batch=2, seed=5)


# ----------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_resolves_the_geometry(family):
    model = tiny_model(family)
    found = resolve(model)
    assert found is not None and found.family == ("roberta" if family == "roberta" else family)
    config = hf_config(model)
    assert len(found.blocks) == getattr(config, found.arch.cfg_layers)
    assert found.n_heads == 4 and found.head_dim == 16
    assert found.n_kv == (4 if family in ("gpt2", *ENCODERS) else 2)
    assert found.intermediate == 128
    for b in found.blocks:  # every declared part is a real linear of the right shape
        for name in b.linears:
            assert isinstance(model.get_submodule(name), torch.nn.Linear), name
    cell(family, "adapter")


def test_unknown_architecture_is_refused_in_one_line():
    model = no_adapter_model(layers=1)
    assert resolve(model) is None
    with pytest.raises(LeanmlError) as err:
        require(model, "structured pruning")
    msg = str(err.value)
    assert "\n" not in msg and "gpt_neox" in msg and "llama" in msg and "phi3" in msg
    h = leanml.ModelHandle(module=model, task="causal-lm", name="neox")
    with pytest.raises(LeanmlError, match=r"unit 'heads' does not apply to model 'neox' \(GPTNeoXForCausalLM"):
        leanml.prune(h, StructuredPrune(unit="heads", ratio=0.5, criterion="l1"))


def test_an_unknown_architecture_still_gets_linear_techniques(text):
    """No adapter: RTN/GPTQ per layer without folding, int8 and unstructured pruning still apply."""
    from tests.families import tokenizer

    model = no_adapter_model()
    ref = run(model, IDS)
    for recipe, floor in (("w8", 35.0), ("w4-g64", 12.0), ("int8-dynamic", 20.0)):
        h = leanml.ModelHandle(module=copy.deepcopy(model), task="causal-lm", name="neox", tokenizer=tokenizer())
        apply_recipe(h, recipe, text)
        assert sqnr_db(ref, run(h.module, IDS)) > floor, recipe


# ------------------------------------------------------------------------------------ scale folding


@pytest.mark.parametrize("family", FAMILIES)
def test_every_exact_fold_leaves_float_outputs_unchanged(family):
    """Random scales folded at every producer the adapter declares: outputs unchanged (fp32 round-off)."""
    model = tiny_model(family)
    ref = run(model, IDS)
    found, modules = resolve(model), dict(model.named_modules())
    folded = 0
    gen = torch.Generator().manual_seed(0)
    for b in found.blocks:
        for spec in producers(found, b):
            p = find_producer(modules, found, b.name, list(spec.consumers))
            if p is None:
                continue
            a, z = p.rows or (0, p.module.weight.shape[0]) if p.kind != "norm" else (0, p.module.weight.numel())
            fold_scales(modules, p, torch.rand(z - a, generator=gen, dtype=torch.float64) * 1.5 + 0.25, {})
            folded += 1
    # pre-norm -> q/k/v, pre-norm -> FFN, value -> output, and up -> down in gated FFNs; post-LN
    # encoders only have value -> output
    expected = 1 if family in ENCODERS else (4 if family != "gpt2" else 3)
    assert folded == expected * len(found.blocks)
    torch.testing.assert_close(run(model, IDS), ref, rtol=1e-4, atol=1e-4)
    cell(family, "AWQ/SmoothQuant folding")


@pytest.mark.parametrize("family", DECODERS)
def test_rotation_is_exact_where_the_family_allows_it(family):
    model = tiny_model(family)
    ref = run(model, IDS)
    if not resolve(model).arch.rotate:
        with pytest.raises(LeanmlError, match="rotate=True supports the model families"):
            rotate_residual(model)
        cell(family, "rotation", "refused")
        return
    rotate_residual(model)
    torch.testing.assert_close(run(model, IDS), ref, rtol=1e-4, atol=1e-4)
    cell(family, "rotation")


# ----------------------------------------------------------------------------------------- recipes

# SQNR floors (dB) of the model output after each recipe on the tiny random models; observed values
# across the families are noted beside each (random weights are harder to quantize than trained ones)
FLOORS = {
    "w8": 30.0,  # observed 38-47
    "w4-g64": 8.0,  # observed 13-22 (4-bit, group 64, GPTQ+AWQ)
    "w8a8": 15.0,  # observed 22-35
    "int8-dynamic": 15.0,  # observed 25-37
    "int8-static": 10.0,  # observed 14-30
    # half the weights gone, no recovery: random tiny models lose most of their function (Gemma 2/3, whose
    # post-norms rescale every block's update, keep the least: observed 0.7-4 dB there, 6-30 elsewhere),
    # so the pruning cells check the sparsity pattern exactly and the output only loosely
    "sparse-50": 0.0,
    "sparse-2of4": 0.0,
}


def check_sparsity(model, recipe: str) -> None:
    from leanml.prune.modules import SparseLinear

    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert layers
    for m in layers:
        w = m.weight * m.weight_mask if hasattr(m, "weight_mask") else m.weight
        zero = (w == 0).reshape(w.shape[0], -1, 4 if recipe == "sparse-2of4" else w.shape[1])
        if recipe == "sparse-2of4":
            assert (zero.sum(-1) >= 2).all()
        else:
            assert abs(float(zero.float().mean()) - 0.5) < 0.02


@pytest.mark.parametrize("recipe", list(FLOORS))
@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_recipe_gives_a_sane_model(family, recipe, text):
    h = handle(family)
    ref = run(h.module, IDS)
    apply_recipe(h, recipe, text)
    got = sqnr_db(ref, run(h.module, IDS))
    assert got > FLOORS[recipe], f"{family} {recipe}: {got:.1f} dB"
    if recipe.startswith("sparse"):
        check_sparsity(h.module, recipe)
    cell(family, recipe)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("unit", ["neurons", "heads", "layers"])
def test_structured_removal_shrinks_and_reloads(family, unit, text, tmp_path):
    h = handle(family)
    before = sum(p.numel() for p in h.module.parameters())
    step = StructuredPrune(unit=unit, ratio=0.5, criterion="l1" if unit != "layers" else "activation", calib_windows=2)
    if family == "gpt2" and unit == "heads":
        with pytest.raises(LeanmlError, match="heads of gpt2 models cannot be removed"):
            leanml.prune(h, step, text)
        cell(family, f"remove {unit}", "refused")
        return
    leanml.prune(h, step, text)
    after = sum(p.numel() for p in h.module.parameters())
    assert after < before
    found = resolve(h.module)
    if unit == "neurons":
        assert found.intermediate == 64
    elif unit == "heads":
        assert found.n_heads == 2 or (found.n_heads, found.n_kv) == (2, 1)
    else:
        assert len(found.blocks) == 1 if family != "gemma3" else 2
    out = run(h.module, IDS)
    assert torch.isfinite(out).all()
    save_artifact(h, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    torch.testing.assert_close(run(back.module, IDS), out, rtol=1e-5, atol=1e-5)
    cell(family, f"remove {unit}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["drop-layers:0.5", "width:0.5"])
def test_students_from_the_teacher(family, spec, text):
    from leanml.distill.students import build_student

    teacher = handle(family)
    before = sum(p.numel() for p in teacher.module.parameters())
    student, _ = build_student(teacher, spec, text, calib_windows=2, window=64)
    assert sum(p.numel() for p in student.module.parameters()) < before
    assert torch.isfinite(run(student.module, IDS)).all()
    cell(family, f"student {spec.split(':')[0]}")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_saves_and_reloads(family, text, tmp_path):
    h = handle(family)
    apply_recipe(h, "w8", text)
    out = run(h.module, IDS)
    save_artifact(h, tmp_path / "q")
    back = load_artifact(tmp_path / "q")
    torch.testing.assert_close(run(back.module, IDS), out, rtol=1e-5, atol=1e-5)
    cell(family, "save/reload")


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("recipe", [None, "int8-dynamic"])
def test_encoder_on_onnxruntime(family, recipe, text):
    from leanml.accelerate.runtimes import prepare

    h = handle(family)
    ids = IDS[:, :24]
    ref = run(h.module, ids)
    if recipe:
        apply_recipe(h, recipe, text)
    torch_out = run(h.module, ids)
    ort = prepare(h, "onnxruntime")
    with torch.no_grad():
        got = output_tensor(ort.call({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    if recipe is None:
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    else:  # ORT's int8 kernels round differently from leanml's simulation; both stay close to float
        assert sqnr_db(ref, got) > 15.0 and sqnr_db(ref, torch_out) > 15.0  # observed 25-35 dB
    cell(family, "onnxruntime" if recipe is None else "onnxruntime int8")


@pytest.mark.parametrize("family", FAMILIES)
def test_profile(family, text):
    h = handle(family)
    m = leanml.profile(h, data=text if family in DECODERS else None, repeats=1, new_tokens=2)
    assert m.params == sum(p.numel() for p in h.module.parameters())
    if family in DECODERS:
        assert 1 < m.quality["value"] < 200 and m.quality["bos"] is False  # a random model: about the vocabulary size
    cell(family, "profile")
