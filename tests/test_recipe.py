"""Configs and recipes: every config round-trips through YAML; bad fields, bad files and recipes that
do not fit the model get one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

from leanml.config import (
    CONFIG_TYPES,
    QAT,
    Codebook,
    Int8Dynamic,
    Int8Static,
    MixedPrecision,
    WeightOnly,
    config_from_dict,
)
from leanml.errors import LeanmlError
from leanml.models import ModelHandle
from leanml.prune.config import GradualPrune, Prune, StructuredPrune
from leanml.recipe import BUILTIN_RECIPES, Recipe, load_recipe, validate_recipe


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("kind", sorted(CONFIG_TYPES))
def test_every_config_round_trips_through_yaml(kind):
    cfg = CONFIG_TYPES[kind](targets=["re:mlp"], ignore=["lm_head"])
    recipe = Recipe(name="r", steps=[cfg])
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.steps == [cfg] and again.name == "r"


@pytest.mark.parametrize("name", sorted(BUILTIN_RECIPES))
def test_builtin_recipes_resolve(name):
    r = load_recipe(name)
    assert r.name == name and r.steps and Recipe.from_yaml(r.to_yaml()).steps == r.steps


@pytest.mark.parametrize(
    "step, message",
    [
        ({"kind": "sparsify"}, "unknown technique 'sparsify'; accepted kinds: weight-only, .*prune"),
        ({"kind": "weight-only", "bits": 1}, r"WeightOnly field 'bits' = 1 is not accepted: Input should be greater"),
        (
            {"kind": "weight-only", "bits": 9},
            r"WeightOnly field 'bits' = 9 is not accepted: .*\(accepted: an integer >= 2 and <= 8\)",
        ),
        ({"kind": "weight-only", "colour": "red"}, "WeightOnly has no field 'colour' .*accepted fields: kind, .*bits"),
        (
            {"kind": "int8-static", "observer": "magic"},
            "Int8Static field 'observer' = 'magic' is not accepted: Input should be 'minmax'",
        ),
        ({"kind": "smoothquant", "alpha": 1.5}, "SmoothQuant field 'alpha' = 1.5"),
        ({"bits": 4}, "has no 'kind'.*accepted kinds: weight-only"),
        ({"kind": ["weight-only"]}, r"unknown technique \['weight-only'\]"),
        ({"kind": "weight-only", 3: 4}, "field name 3 is not a string"),
        ("weight-only", "must be a mapping with a 'kind', got str 'weight-only'"),
    ],
)
def test_bad_steps_name_the_field(step, message):
    with pytest.raises(LeanmlError, match=message) as info:
        config_from_dict(step)
    one_line(info)


def test_recipe_file_errors(tmp_path):
    (tmp_path / "r.yaml").write_text("steps: []\n")
    with pytest.raises(LeanmlError, match="non-empty list"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    with pytest.raises(LeanmlError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(LeanmlError, match="neither a built-in name"):
        load_recipe("w5")
    (tmp_path / "ok.yaml").write_text("steps:\n  - kind: weight-only\n    bits: 3\n    group_size: 16\n")
    assert load_recipe(tmp_path / "ok.yaml").steps == [WeightOnly(bits=3, group_size=16)]


def write(tmp_path, content: str | bytes):
    path = tmp_path / "r.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"steps:\n  - kind: weight-only\n    method: rtn\xff\n",
            r"r\.yaml' is not UTF-8 text \(byte 0xff at line 3, offset 44\)",
        ),
        (b"\xff\xfe s\x00t\x00", r"r\.yaml' is not UTF-8 text \(byte 0xff at line 1, offset 0\)"),
        ("steps:\n  - kind: weight-only\n    bits: 4: 5\n", r"r\.yaml' is not valid YAML at line 3, column 12: mapping values"),
        (
            "steps:\n  - kind: weight-only\n    bits: [4\n",
            r"r\.yaml' is not valid YAML at line 4, column 1: expected ',' "
            r".*\(while parsing a flow sequence started at line 3, column 11\)",
        ),
        ("steps:\n\t- kind: float\n", r"r\.yaml' is not valid YAML at line 2, column 1: found character '\\t'"),
        ("steps:\n  - kind: float\x00\n", r"r\.yaml' is not valid YAML at line 2, column 16: unacceptable character #x0000"),
        ("steps: !!python/object:os.system x\n", r"not valid YAML at line 1, column 8: could not determine a constructor"),
        ("[" * 3000, "is not valid YAML|nested too deeply"),
        ("", r"r\.yaml' is empty; write a mapping with a 'steps' list"),
        ("just words\n", r"r\.yaml' must be a mapping with a 'steps' list \(or a list of steps\), got str 'just words'"),
        ("42\n", r"must be a mapping .* got int 42"),
        ("name: x\n", r"r\.yaml' has no 'steps'"),
        ("steps: {kind: float}\n", r"field 'steps' must be a non-empty list of techniques, got \{'kind': 'float'\}"),
        ("steps: [{kind: float}]\ncolour: red\n", r"unknown field\(s\) \['colour'\]; accepted: name, steps, version"),
        ("version: 7\nsteps: [{kind: float}]\n", r"version 7 is not accepted; accepted: 1 to 1"),
        ("name: [a]\nsteps: [{kind: float}]\n", r"name \['a'\] is not accepted"),
        ("steps:\n  - kind: float\n  - bits: 4\n", r"r\.yaml' step 2 has no 'kind'; accepted kinds: weight-only, .*distill"),
        ("steps:\n  - kind: sparsify\n", r"r\.yaml' step 1: unknown technique 'sparsify'; accepted kinds: weight-only, "),
        ("steps:\n  - kind: float\n  - weight-only\n", r"r\.yaml' step 2 is a str \('weight-only'\), not a mapping"),
        ("steps:\n  - [kind, float]\n", r"step 1 is a list \(\['kind', 'float'\]\), not a mapping"),
        ("steps: &a\n  - *a\n", r"step 1 is a list"),
        ("steps:\n  - kind: weight-only\n    bits: 9\n", r"step 1 \(weight-only\): WeightOnly field 'bits' = 9 is not accepted"),
        (
            "steps:\n  - kind: weight-only\n    targets: ['re:model.(']\n",
            r"step 1 \(weight-only\): .*'re:model\.\(' is not a valid regular",
        ),
        ("steps:\n  - kind: distill\n    lr: .nan\n", r"step 1 \(distill\): Distill field 'lr' = nan is not a number"),
        ("steps:\n  - kind: distill\n    temperature: .inf\n", r"Distill field 'temperature' = inf is not finite"),
    ],
)
def test_recipe_files_give_one_line_errors_naming_the_file(tmp_path, content, message):
    with pytest.raises(LeanmlError, match=message) as info:
        load_recipe(write(tmp_path, content))
    text = one_line(info)
    assert "r.yaml" in text


def test_recipe_file_forms(tmp_path):
    assert load_recipe(write(tmp_path, "- kind: int8-dynamic\n")).steps == [Int8Dynamic()]  # a bare list of steps
    assert load_recipe(write(tmp_path, "\ufeffsteps: [{kind: int8-dynamic}]\n")).steps == [Int8Dynamic()]  # UTF-8 BOM
    assert load_recipe({"steps": [{"kind": "int8-dynamic"}], "name": "n"}).name == "n"
    assert load_recipe([{"kind": "int8-dynamic"}, Int8Static()]).steps == [Int8Dynamic(), Int8Static()]
    assert load_recipe(str(write(tmp_path, "steps: [{kind: int8-dynamic}]\n"))).name == "r"


@pytest.mark.parametrize(
    "spec, message",
    [
        (42, r"recipe 42 \(int\) is not accepted; give a built-in name"),
        (None, r"recipe None \(NoneType\) is not accepted"),
        ([{"kind": "float"}, "int8"], r"recipe step 2 is a str \('int8'\), not a mapping"),
        ([], "must be a non-empty list"),
        ({"name": "x"}, "has no 'steps'"),
    ],
)
def test_bad_recipe_objects(spec, message):
    with pytest.raises(LeanmlError, match=message) as info:
        load_recipe(spec)
    one_line(info)


def test_recipe_constructor_errors_are_one_line():
    with pytest.raises(LeanmlError, match="Recipe field 'steps'") as info:
        Recipe(steps="w8")
    one_line(info)
    with pytest.raises(LeanmlError, match=r"Recipe field 'steps' .* recipe step 2 has no 'kind'") as info:
        Recipe(steps=[{"kind": "float"}, {"bits": 4}])
    one_line(info)
    assert Recipe(steps=[{"kind": "weight-only", "bits": 8}]).steps == [WeightOnly(bits=8)]  # the type, not the base


# ----------------------------------------------------------------------------------------------------
# validate_recipe: the recipe against the loaded model, before anything is measured or calibrated
# ----------------------------------------------------------------------------------------------------


def snapshot(module: torch.nn.Module):
    return [type(m) for m in module.modules()], {k: v.clone() for k, v in module.state_dict().items()}


def unchanged(module: torch.nn.Module, before) -> bool:
    types, state = snapshot(module)
    return types == before[0] and state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)


@pytest.mark.parametrize(
    "recipe",
    [
        "w8",
        [WeightOnly(bits=4, group_size=16, method="gptq", head_bits=8)],  # gptq: would need data, not checked here
        [Prune(method="sparsegpt", pattern="2:4"), WeightOnly(group_size=32, method="awq+gptq")],
        [StructuredPrune(unit="neurons", ratio=0.25, criterion="activation"), WeightOnly(bits=8, group_size=None)],
        [StructuredPrune(unit="heads", ratio=0.5), StructuredPrune(unit="layers", ratio=0.5)],
        [WeightOnly(group_size=32, targets=["re:mlp"]), Int8Dynamic(targets=["re:self_attn"])],
        [GradualPrune(targets=["re:mlp"]), MixedPrecision(group_size=16)],
        [QAT(group_size=32), Codebook(method="nf4", block_size=32, targets=["re:nothing|lm_head"], ignore=[])],
    ],
)
def test_valid_recipes_pass_and_leave_the_model_alone(tiny_llama, recipe):
    before = snapshot(tiny_llama.module)
    assert isinstance(validate_recipe(tiny_llama, recipe), Recipe)
    assert unchanged(tiny_llama.module, before)
    assert "applied" not in tiny_llama.meta


@pytest.mark.parametrize(
    "recipe, message",
    [
        (
            "w4-g64",
            r"step 1 \(weight-only\): group_size 64 does not divide the 32 inputs of layer 'model\.layers\.0\.self_attn\.q_proj'",
        ),
        ([MixedPrecision(group_size=48)], r"step 1 \(mixed-precision\): group_size 48 does not divide the 32 inputs"),
        ([QAT(group_size=24)], "group_size 24 does not divide"),
        (
            [WeightOnly(group_size=16, targets=["re:attention"])],
            r"step 1 \(weight-only\): layer pattern 're:attention' matches no Linear layer of this model "
            r"\(e\.g\. model\.layers\.0\.self_attn\.q_proj, model\.layers\.0\.self_attn\.k_proj, ",
        ),
        ([WeightOnly(group_size=16, ignore=["decoder"])], "layer pattern 'decoder' matches no Linear"),
        ([Int8Dynamic(), WeightOnly(group_size=16)], r"step 2 \(weight-only\): no Linear layer is left to transform"),
        (
            [Int8Dynamic(targets=["re:mlp"]), Prune(targets=["model.layers.0.mlp.up_proj"])],
            r"step 2 \(prune\): layer pattern 'model\.layers\.0\.mlp\.up_proj' matches no Linear",
        ),
        (
            [Prune(pattern="2:24")],
            r"step 1 \(prune\): N:M pattern needs the inputs of every targeted layer to be a multiple of 24",
        ),
        ([Codebook(method="nf4", block_size=48)], r"step 1 \(codebook\): block_size 48 does not divide the 32 inputs"),
        ([StructuredPrune(unit="filters")], "unit 'filters' does not apply to transformer 'tiny-llama'"),
        ([StructuredPrune(unit="heads", ratio=0.75)], "ratio 0.75 would remove all 2 units of the key/value heads"),
        ([StructuredPrune(unit="neurons", targets=["re:layers\\.0\\."])], "leave out 'model.layers.1.mlp.gate_proj'"),
        ([StructuredPrune(unit="layers", ratio=0.5, targets=["model.layers.0"])], "would remove all 1 units"),
    ],
)
def test_recipes_that_do_not_fit_the_model_fail_early(tiny_llama, recipe, message):
    before = snapshot(tiny_llama.module)
    with pytest.raises(LeanmlError, match=message) as info:
        validate_recipe(tiny_llama, recipe)
    one_line(info)
    assert unchanged(tiny_llama.module, before)


def test_the_early_error_is_the_one_the_handler_gives(tiny_llama):
    from leanml.pipeline import apply_recipe

    with pytest.raises(LeanmlError) as early:
        validate_recipe(tiny_llama, [WeightOnly(group_size=48, method="rtn")])
    with pytest.raises(LeanmlError) as late:
        apply_recipe(copy.deepcopy(tiny_llama), [WeightOnly(group_size=48, method="rtn")])
    assert str(late.value) in str(early.value)


def test_validate_recipe_on_plain_and_foreign_models(mlp):
    handle = ModelHandle(module=mlp, task="generic", name="mlp")
    assert validate_recipe(handle, [StructuredPrune(unit="neurons"), Int8Static()]).steps[1] == Int8Static()
    with pytest.raises(LeanmlError, match=r"step 2 \(prune-structured\): no Linear layer is left to transform"):
        validate_recipe(handle, [Int8Static(), StructuredPrune(unit="neurons")])  # int8 layers are not Linear any more
    with pytest.raises(LeanmlError, match=r"step 1 \(prune-structured\): unit 'heads' does not apply to model 'mlp'") as info:
        validate_recipe(handle, [StructuredPrune(unit="heads")])
    one_line(info)
    with pytest.raises(LeanmlError, match="unit 'filters' does not apply to model 'mlp': it has no Conv layers"):
        validate_recipe(handle, [StructuredPrune(unit="filters")])
    with pytest.raises(LeanmlError, match=r"block_size 64 does not divide the 20 inputs of '0'"):
        validate_recipe(handle, [Codebook(method="nf4")])
    with pytest.raises(LeanmlError, match=r"step 1 \(qat\) does not apply to a generic model: distill: false .*causal-lm"):
        validate_recipe(handle, [QAT(group_size=4, distill=False)])
    onnx = ModelHandle(module=mlp, task="generic", name="m.onnx", runtime="onnxruntime")
    with pytest.raises(LeanmlError, match=r"step 1 \(int8-dynamic\) needs an eager PyTorch model; 'm.onnx' runs on onnxruntime"):
        validate_recipe(onnx, "int8-dynamic")
    with pytest.raises(LeanmlError, match="validate_recipe takes a ModelHandle"):
        validate_recipe(mlp, "int8-dynamic")


def test_task_rules_from_the_registry(tiny_llama):
    from leanml.distill.config import Distill
    from leanml.registry import applicable_tasks

    assert applicable_tasks(WeightOnly()) is None
    assert applicable_tasks(Distill(cache_teacher=True, top_k=8))[0] == ("causal-lm",)
    validate_recipe(tiny_llama, [Distill(cache_teacher=True, top_k=8), QAT(group_size=32, distill=False)])
    encoder = ModelHandle(module=tiny_llama.module, task="sentence-embedding", name="enc")
    with pytest.raises(LeanmlError, match=r"step 1 \(distill\) does not apply to a sentence-embedding model: loss term 'task'"):
        validate_recipe(encoder, [Distill(loss="kd+task")])


def test_every_technique_has_a_handler_in_the_registry_table():
    import inspect

    import leanml.config as config
    from leanml.registry import HANDLERS, handler_for

    kinds = [c for _, c in inspect.getmembers(config, inspect.isclass) if issubclass(c, config.TechniqueConfig)]
    concrete = [c for c in kinds if c is not config.TechniqueConfig and "kind" in c.model_fields]
    assert {c.__name__ for c in concrete} <= set(HANDLERS), set(c.__name__ for c in concrete) - set(HANDLERS)
    for c in concrete:
        assert callable(handler_for(c()))
