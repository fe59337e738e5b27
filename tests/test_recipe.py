"""Configs and recipes: every config round-trips through YAML; bad fields get one-line errors."""

from __future__ import annotations

import pytest

from leanml.config import CONFIG_TYPES, WeightOnly, config_from_dict
from leanml.errors import LeanmlError
from leanml.recipe import BUILTIN_RECIPES, Recipe, load_recipe


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
        ({"kind": "sparsify"}, "unknown technique 'sparsify'"),
        ({"kind": "weight-only", "bits": 1}, "field 'bits' = 1"),
        ({"kind": "weight-only", "bits": 9}, "field 'bits' = 9"),
        ({"kind": "weight-only", "colour": "red"}, "field 'colour'"),
        ({"kind": "int8-static", "observer": "magic"}, "field 'observer' = 'magic'"),
        ({"kind": "smoothquant", "alpha": 1.5}, "field 'alpha' = 1.5"),
    ],
)
def test_bad_steps_name_the_field(step, message):
    with pytest.raises(LeanmlError, match=message) as info:
        config_from_dict(step)
    assert "\n" not in str(info.value)


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
