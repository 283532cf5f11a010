import pytest

import fxquant
from fxquant import meta
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes, effective_top_k
from fxquant.recipe import LayerRule, SchemeRule

from .util import traced


def kinds(gm):
    return {r.name: (r.selection.kind, r.selection.reason) for _, r in meta.records(gm)}


def test_rules_and_default():
    _, gm = traced()
    res = SelectSchemes(SelectOptions(protect=(LayerRule("fc2"),)))(gm)
    assert res.modified is False
    assert kinds(gm) == {"fc1": ("quantize", ""), "fc2": ("protected", "matches protect rule 'fc2'")}
    assert [r.selection.by for _, r in meta.records(gm)] == ["default", "rule"]
    assert [r.selection.scheme for _, r in meta.records(gm)] == ["w8a8", "float"]


def test_skip_wins_over_protect():
    _, gm = traced()
    SelectSchemes(SelectOptions(protect=(LayerRule("fc*"),), skip=(LayerRule("fc1"),)))(gm)
    assert kinds(gm)["fc1"][0] == "skipped" and kinds(gm)["fc2"][0] == "protected"


def test_required_rule_matching_nothing_is_an_error():
    _, gm = traced()
    with pytest.raises(fxquant.RecipeError, match=r"recipe.protect: pattern 'layers\.\*\.w2' matches no linear"):
        SelectSchemes(SelectOptions(protect=(LayerRule("layers.*.w2"),)))(gm)
    SelectSchemes(SelectOptions(protect=(LayerRule("layers.*.w2", required=False),)))(gm)  # optional: fine


def test_top_k_by_fragility_rank():
    _, gm = traced()
    for (node, rec), rank in zip(meta.records(gm), (2, 1)):
        meta.update(node, fragility=meta.Fragility(score=float(10 - rank), rank=rank))
    SelectSchemes(SelectOptions(top_k=1))(gm)
    assert kinds(gm)["fc2"] == ("protected", "fragility rank 1 of 2 (top 1)")
    assert {r.name: r.selection.by for _, r in meta.records(gm)} == {"fc1": "default", "fc2": "top_k"}
    assert kinds(gm)["fc1"][0] == "quantize"


def test_top_k_needs_fragility():
    _, gm = traced()
    with pytest.raises(fxquant.PassError, match="lack 'fragility'.*score_fragility"):
        SelectSchemes(SelectOptions(top_k=3))(gm)


def test_scheme_rules_first_match_and_protect_scheme():
    """q4_k everywhere, fc2 by rule q8_0; the fragile one protected as q8_0 (a Q4_K_M-style mix)."""
    _, gm = traced()
    for (node, rec), rank in zip(meta.records(gm), (1, 2)):
        meta.update(node, fragility=meta.Fragility(score=float(10 - rank), rank=rank))
    opts = SelectOptions(default="q8_0", rules=(SchemeRule("fc2", "w8a8"), SchemeRule("fc*", "float")),
                         top_k=1, protect_scheme="float")
    SelectSchemes(opts)(gm)
    sel = {r.name: r.selection for _, r in meta.records(gm)}
    assert (sel["fc2"].kind, sel["fc2"].scheme, sel["fc2"].by) == ("quantize", "w8a8", "rule")  # first match wins
    # fc1 matches the second rule: rules come before top-k, so top-1 has no candidate left
    assert (sel["fc1"].kind, sel["fc1"].scheme) == ("quantize", "float")
    _, gm = traced()
    for (node, rec), rank in zip(meta.records(gm), (1, 2)):
        meta.update(node, fragility=meta.Fragility(score=float(10 - rank), rank=rank))
    SelectSchemes(SelectOptions(default="w8a8", top_k=1, protect_scheme="q8_0"))(gm)
    sel = {r.name: r.selection for _, r in meta.records(gm)}
    assert (sel["fc1"].kind, sel["fc1"].scheme, sel["fc1"].by) == ("protected", "q8_0", "top_k")
    assert (sel["fc2"].kind, sel["fc2"].scheme) == ("quantize", "w8a8")


@pytest.mark.parametrize("default, policy, fc1, why", [
    ("q4_k", "keep_float", "float", "not a multiple of the Q4_K block (256): kept float"),
    ("q4_k", "q8_0", "q8_0", "stored as Q8_0 (misaligned policy q8_0)"),
    ("q8_0", "q8_0", "q8_0", None),  # 32 inputs fit Q8_0's 32-blocks
    ("w8a8", "keep_float", "w8a8", None),
])
def test_misaligned_widths_are_a_selection_outcome(default, policy, fc1, why):
    _, gm = traced()  # fc1: 32 -> 64, fc2: 64 -> 32
    SelectSchemes(SelectOptions(default=default, misaligned=policy))(gm)
    sel = {r.name: r.selection for _, r in meta.records(gm)}["fc1"]
    assert sel.scheme == fc1
    if why:
        assert sel.by == "misaligned" and why in sel.reason
    else:
        assert sel.by == "default"


def test_a_scheme_rule_matching_nothing_is_an_error():
    _, gm = traced()
    with pytest.raises(fxquant.RecipeError, match=r"recipe.rules: pattern 'layers\.\*' matches no linear"):
        SelectSchemes(SelectOptions(rules=(SchemeRule("layers.*", "q8_0"),)))(gm)


def test_idempotent():
    _, gm = traced()
    opts = SelectOptions(protect=(LayerRule("fc2"),))
    assert SelectSchemes(opts)(gm).modified is False
    first = [r for _, r in meta.records(gm)]
    assert SelectSchemes(opts)(gm).modified is False
    assert [r for _, r in meta.records(gm)] == first


def test_needs_records():
    from fxquant.trace import trace
    from .util import TwoLinears
    import torch
    gm = trace(TwoLinears().eval(), (torch.randn(2, 3, 32),))
    with pytest.raises(fxquant.PassError, match="run find_linears first"):
        SelectSchemes(SelectOptions())(gm)


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
    SelectSchemes(SelectOptions(top_k=1, protect=(LayerRule("fc2"),)))(gm)
    assert kinds(gm) == {"fc1": ("protected", "fragility rank 2 of 2 (top 1)"),
                         "fc2": ("protected", "matches protect rule 'fc2'")}
    _, gm = traced()
    for (node, rec), rank in zip(meta.records(gm), (2, 1)):
        meta.update(node, fragility=meta.Fragility(score=float(10 - rank), rank=rank))
    SelectSchemes(SelectOptions(top_k=1, skip=(LayerRule("fc2"),)))(gm)
    assert kinds(gm)["fc1"][0] == "protected" and kinds(gm)["fc2"][0] == "skipped"
