import json

import pytest

import fxquant
from fxquant.recipe import PRESETS, LayerRule, Recipe, SchemeRule, resolve
from fxquant.schemes import Scheme


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
    ({"weights": "int4"}, "recipe.weights"),  # a format-1 key, read and checked
    ({"default": "int4"}, "recipe.default"),
    ({"protect_scheme": "fp8"}, "recipe.protect_scheme"),
    ({"rules": [{"match": "a", "scheme": "int3"}]}, "recipe.rules"),
    ({"rules": [{"match": "a"}]}, "recipe.rules"),
    ({"rules": [{"match": "", "scheme": "q8_0"}]}, "recipe.rules"),
    ({"rules": "a=q8_0"}, "recipe.rules"),
    ({"default": "q8_0", "weights": "int8"}, "recipe: give either"),
    ({"protect_top_k": -1}, "recipe.protect_top_k"),
    ({"protect_top_k": True}, "recipe.protect_top_k"),
    ({"protect": "layers.*"}, "recipe.protect"),
    ({"protect": [3]}, "recipe.protect"),
    ({"alpha_search": [0.2, 2.0]}, "recipe.alpha_search"),
    ({"weights": "q4_k", "activations": "int8_per_token"}, "recipe.weights/activations"),  # GGUF is weight-only
    ({"activations": "none"}, "recipe.weights/activations"),
    ({"default": "q8_0", "smoothquant": True}, "recipe.smoothquant"),
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


def test_scheme_rules_round_trip_and_list_the_schemes():
    data = {"name": "mix", "rules": [{"match": "layers.*.feed_forward.w2", "scheme": "q8_0"},
                                      {"match": "final_layer.*", "scheme": "float", "required": False}],
            "default": "q4_k"}
    r = Recipe.from_dict(data)
    assert r.default is Scheme.Q4_K and r.rules[0] == SchemeRule("layers.*.feed_forward.w2", Scheme.Q8_0)
    assert r.schemes == {Scheme.Q4_K, Scheme.Q8_0, Scheme.FLOAT}
    assert json.loads(r.to_json())["rules"] == data["rules"]
    assert Recipe.from_json(r.to_json()) == r


@pytest.mark.parametrize("old, default", [
    ({"weights": "int8", "activations": "int8_per_token"}, "w8a8"),
    ({"weights": "q4_k", "activations": "none"}, "q4_k"),
    ({"weights": "q8_0", "activations": "none", "misaligned": "q8_0"}, "q8_0"),
])
def test_format1_recipes_still_read(old, default):
    """fxquant 0.1 wrote one weights/activations pair; it maps to the default scheme."""
    r = Recipe.from_dict({"name": "old", **old})
    assert r.default == default and "weights" not in r.to_dict()


def test_mixed_presets():
    q4km, w8q8 = Recipe.preset("q4_k_m"), Recipe.preset("int8-w8a8-q8")
    assert q4km.default is Scheme.Q4_K and q4km.protect_scheme is Scheme.Q8_0 and q4km.protect_top_k == 17
    assert w8q8.protect_scheme is Scheme.Q8_0
    assert w8q8.replace(name="int8-w8a8-paper", protect_scheme=Scheme.FLOAT) == Recipe.preset("int8-w8a8-paper")
