import pytest

import fxquant
from fxquant import meta
from fxquant.passes.select_protected import SelectOptions, SelectProtected, effective_top_k
from fxquant.recipe import LayerRule

from .util import traced


def kinds(gm):
    return {r.name: (r.selection.kind, r.selection.reason) for _, r in meta.records(gm)}


def test_rules_and_default():
    _, gm = traced()
    res = SelectProtected(SelectOptions(protect=(LayerRule("fc2"),)))(gm)
    assert res.modified is False
    assert kinds(gm) == {"fc1": ("quantize", ""), "fc2": ("protected", "matches protect rule 'fc2'")}
    assert [r.selection.by for _, r in meta.records(gm)] == ["", "rule"]


def test_skip_wins_over_protect():
    _, gm = traced()
    SelectProtected(SelectOptions(protect=(LayerRule("fc*"),), skip=(LayerRule("fc1"),)))(gm)
    assert kinds(gm)["fc1"][0] == "skipped" and kinds(gm)["fc2"][0] == "protected"


def test_required_rule_matching_nothing_is_an_error():
    _, gm = traced()
    with pytest.raises(fxquant.RecipeError, match=r"recipe.protect: pattern 'layers\.\*\.w2' matches no linear"):
        SelectProtected(SelectOptions(protect=(LayerRule("layers.*.w2"),)))(gm)
    SelectProtected(SelectOptions(protect=(LayerRule("layers.*.w2", required=False),)))(gm)  # optional: fine


def test_top_k_by_fragility_rank():
    _, gm = traced()
    for (node, rec), rank in zip(meta.records(gm), (2, 1)):
        meta.update(node, fragility=meta.Fragility(score=float(10 - rank), rank=rank))
    SelectProtected(SelectOptions(top_k=1))(gm)
    assert kinds(gm)["fc2"] == ("protected", "fragility rank 1 of 2 (top 1)")
    assert {r.name: r.selection.by for _, r in meta.records(gm)} == {"fc1": "", "fc2": "top_k"}
    assert kinds(gm)["fc1"][0] == "quantize"


def test_top_k_needs_fragility():
    _, gm = traced()
    with pytest.raises(fxquant.PassError, match="lack 'fragility'.*score_fragility"):
        SelectProtected(SelectOptions(top_k=3))(gm)


def test_needs_records():
    from fxquant.trace import trace
    from .util import TwoLinears
    import torch
    gm = trace(TwoLinears().eval(), (torch.randn(2, 3, 32),))
    with pytest.raises(fxquant.PassError, match="run find_linears first"):
        SelectProtected(SelectOptions())(gm)


@pytest.mark.parametrize("k, n, ref, expected", [
    (17, 279, 279, 17), (17, 1000, 279, 17), (17, 39, 279, 2), (17, 23, 279, 1), (17, 5, 279, 1),
    (0, 39, 279, 0), (17, 10, 0, 10), (3, 39, 0, 3)])
def test_effective_top_k_scales_by_linear_count(k, n, ref, expected):
    assert effective_top_k(k, n, ref) == expected


def test_rule_matched_layers_do_not_use_up_top_k():
    _, gm = traced()
    for (node, rec), rank in zip(meta.records(gm), (2, 1)):
        meta.update(node, fragility=meta.Fragility(score=float(10 - rank), rank=rank))
    # fc2 is the most fragile but already protected by a rule: top-1 goes to the next one, fc1.
    SelectProtected(SelectOptions(top_k=1, protect=(LayerRule("fc2"),)))(gm)
    assert kinds(gm) == {"fc1": ("protected", "fragility rank 2 of 2 (top 1)"),
                         "fc2": ("protected", "matches protect rule 'fc2'")}
    _, gm = traced()
    for (node, rec), rank in zip(meta.records(gm), (2, 1)):
        meta.update(node, fragility=meta.Fragility(score=float(10 - rank), rank=rank))
    SelectProtected(SelectOptions(top_k=1, skip=(LayerRule("fc2"),)))(gm)
    assert kinds(gm)["fc1"][0] == "protected" and kinds(gm)["fc2"][0] == "skipped"
