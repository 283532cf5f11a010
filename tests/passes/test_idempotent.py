"""Every pass, run a second time on its own output, changes nothing and says so (``modified=False``).

The whole pipeline of a recipe runs once on a reduced Ideogram 4; then each of its passes runs
again: the code, every tensor and every record must be the same, and so must the outputs.
(Before this test, a second ``lower_w8a8`` re-quantized the int8 weights and passed the weight
scale as the bias.)
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant import meta, pipeline
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4
from fxquant.trace import trace

# Widths where Q4_K's 256-blocks fit the attention and FFN linears, so q4_k_m mixes Q4_K, Q8_0 and float.
CFG = dict(attention_head_dim=64, num_attention_heads=4, intermediate_size=512, mrope_section=(12, 10, 10),
           in_channels=32, num_layers=1)
RECIPES = ("int8-w8a8", "int8-w8a8-q8", "q4_k_m")


def _recipe(name):
    return fxquant.Recipe.preset(name).replace(protect_reference_linears=0, protect_top_k=2)


@pytest.fixture(scope="module")
def compiled():
    model = reduced_ideogram4(seed=2, **CFG)
    calib = ideogram4_trajectory(steps=2, seed=3, in_channels=32)
    out = {}
    for name in RECIPES:
        recipe = _recipe(name)
        passes = pipeline.build(recipe, calib)
        gm = trace(model, calib[0])
        meta.set_graph_record(gm, meta.GraphRecord(recipe=recipe.to_dict()))
        with torch.no_grad():
            out[name] = (passes(gm), passes)
    return out


def _snapshot(gm):
    return (gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, [r for _, r in meta.records(gm)])


# Every pass of every recipe's pipeline (built here only to name them; the fixture builds the real ones).
CASES = [(r, i, p.name) for r in RECIPES for i, p in enumerate(pipeline.build(_recipe(r), [{}]).passes)]


@pytest.mark.parametrize("recipe, index, name", CASES, ids=[f"{r}-{n}" for r, _, n in CASES])
def test_second_run_changes_nothing(compiled, recipe, index, name):
    gm, passes = compiled[recipe]
    p = passes.passes[index]
    assert p.name == name
    gm = copy.deepcopy(gm)
    x = ideogram4_inputs(seed=9, in_channels=32)
    with torch.no_grad():
        want = gm(**x).sample
    code, state, recs = _snapshot(gm)
    with torch.no_grad():
        res = p(gm)
    assert res.modified is False, p
    assert res.graph_module.code == code, p
    after = res.graph_module.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items()), p
    assert [r for _, r in meta.records(res.graph_module)] == recs, p
    with torch.no_grad():
        torch.testing.assert_close(res.graph_module(**x).sample, want, rtol=0, atol=0)


def test_the_mixed_recipes_really_mix(compiled):
    counts = {name: fxquant.summary(gm).counts() for name, (gm, _) in compiled.items()}
    assert set(counts["int8-w8a8-q8"]) == {"w8a8", "q8_0"}, counts
    assert {"q4_k", "q8_0"} <= set(counts["q4_k_m"]), counts
