import json

import pytest

import fxquant
from fxquant.recipe import PRESETS, LayerRule, Recipe, resolve


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    r = Recipe.preset(name)
    assert Recipe.from_json(r.to_json()) == r
    assert resolve(name) is r


def test_paper_preset_is_smoothquant_plus_protection():
    r = Recipe.preset("int8-w8a8-paper")
    assert r.smoothquant and r.protect_top_k == 17 and r.protect_reference_linears == 279
    assert [x.pattern for x in r.protect] == ["t_embedding.mlp_out"] and not r.protect[0].required
    naive = Recipe.preset("w8a8-naive")
    assert not naive.smoothquant and naive.protect_top_k == 0 and not naive.needs_calibration


def test_recipe_is_frozen():
    with pytest.raises(Exception):
        Recipe().alpha = 0.3  # type: ignore[misc]


def test_unknown_key_is_named():
    with pytest.raises(fxquant.RecipeError, match=r"unknown key\(s\) \['alhpa'\]"):
        Recipe.from_dict({"alhpa": 0.5})


@pytest.mark.parametrize("data, key", [
    ({"alpha": 1.5}, "recipe.alpha"),
    ({"alpha": "0.5"}, "recipe.alpha"),
    ({"weights": "int4"}, "recipe.weights"),
    ({"protect_top_k": -1}, "recipe.protect_top_k"),
    ({"protect_top_k": True}, "recipe.protect_top_k"),
    ({"protect": "layers.*"}, "recipe.protect"),
    ({"protect": [3]}, "recipe.protect"),
    ({"alpha_search": [0.2, 2.0]}, "recipe.alpha_search"),
    ({"weights": "q4_k"}, "recipe.activations"),  # GGUF is weight-only
    ({"activations": "none"}, "recipe.activations"),
    ({"weights": "q8_0", "activations": "none", "smoothquant": True}, "recipe.smoothquant"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(fxquant.RecipeError, match=key.replace(".", r"\.")):
        Recipe.from_dict(data)


def test_rules_parse_strings_and_objects():
    r = Recipe.from_dict({"protect": ["a.*", {"pattern": "b", "required": False}]})
    assert r.protect == (LayerRule("a.*"), LayerRule("b", required=False))
    assert json.loads(r.to_json())["protect"] == ["a.*", {"pattern": "b", "required": False}]


def test_resolve_json_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(Recipe(name="mine", alpha=0.7).to_json())
    assert resolve(str(p)) == Recipe(name="mine", alpha=0.7)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "colour": 1}')
    with pytest.raises(fxquant.RecipeError, match=r"bad\.json.*colour"):
        resolve(bad)
    with pytest.raises(fxquant.RecipeError, match="neither a preset"):
        resolve("int9-w9a9")


@pytest.mark.parametrize("kwargs, key", [
    ({"alpha_search": 0.5}, "recipe.alpha_search"),
    ({"protect": None}, "recipe.protect"),
    ({"skip": 3}, "recipe.skip"),
    ({"protect": [{"pattern": "a", "required": "no"}]}, "recipe.protect"),
    ({"protect": [{"pattern": ""}]}, "recipe.protect"),
])
def test_bad_python_values_are_recipe_errors(kwargs, key):
    with pytest.raises(fxquant.RecipeError, match=key.replace(".", r"\.")):
        Recipe(**kwargs)


def test_preset_and_file_errors(tmp_path):
    with pytest.raises(fxquant.RecipeError, match="unknown recipe preset"):
        Recipe.preset(["int8-w8a8"])  # type: ignore[arg-type]
    p = tmp_path / "latin1.json"
    p.write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(fxquant.RecipeError, match=r"latin1\.json: cannot read"):
        resolve(p)
