"""score_sensitivity: each linear's measured output error against an independent float64 model of the
W8A8 scheme, batching, the local proxy, preconditions; the greedy budget choice and its selection.

    x -> fc1 -> gelu -> fc2        sensitivity(fc1) = ||f(x; fc1 W8A8) - f(x)|| / ||f(x)||
"""

import math

import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.errors import CalibrationError, PassError, RecipeError
from fxquant.graph import LINEAR
from fxquant.passes.collect_stats import CollectStats
from fxquant.passes.score_fragility import ScoreFragility
from fxquant.passes.score_sensitivity import ScoreSensitivity, choose_within_budget, spread
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes
from fxquant.recipe import ProtectBy

from .test_lower_w8a8 import reference_w8a8
from .util import TwoLinears, count, traced


def calib(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 5, 32, generator=g) * (1 + 3 * (torch.arange(32) == 3)),) for _ in range(n)]


def sens(gm):
    return {r.name: r.sensitivity for _, r in meta.records(gm)}


def reference_errors(m: TwoLinears, inputs, smooth=None):
    """Float64 model: the output error with one linear W8A8 at a time (optionally x/s, W*s)."""
    def run(x, which):
        def lin(x, mod, name):
            if name != which:
                return torch.nn.functional.linear(x.double(), mod.weight.double(), None if mod.bias is None else mod.bias.double())
            s = smooth[name] if smooth else torch.ones(mod.in_features, dtype=torch.float64)
            return reference_w8a8(x.double() / s, mod.weight.double() * s, mod.bias)
        return lin(torch.nn.functional.gelu(lin(x, m.fc1, "fc1")), m.fc2, "fc2")
    out = {}
    torch.set_grad_enabled(False)
    for which in ("fc1", "fc2"):
        num = sum(float((run(x[0], which) - run(x[0], None)).pow(2).sum()) for x in inputs)
        den = sum(float(run(x[0], None).pow(2).sum()) for x in inputs)
        out[which] = math.sqrt(num / den)
    torch.set_grad_enabled(True)
    return out


def test_error_matches_an_independent_w8a8_model_and_leaves_the_graph_alone():
    m, gm = traced()
    cal = calib()
    code = gm.code
    res = ScoreSensitivity(cal, samples=4)(gm)
    assert res.modified is False and gm.code == code and count(gm, LINEAR) == 2
    got, ref = sens(gm), reference_errors(m, cal)
    for name in ("fc1", "fc2"):
        assert got[name].error == pytest.approx(ref[name], rel=1e-3)
        assert got[name].local > 0
    assert sorted(r.rank for r in got.values()) == [1, 2]
    assert got["fc1"].rank == (1 if ref["fc1"] > ref["fc2"] else 2)


def test_simulated_smoothing_uses_each_linears_own_vector():
    m, gm = traced()
    cal = calib()
    CollectStats(cal)(gm)
    ScoreSensitivity(cal, samples=4, alpha=0.5)(gm)
    vec = {}
    for _, r in meta.records(gm):
        w = getattr(m, r.name).weight.detach().double()
        vec[r.name] = (r.stats.channel_max_abs.double().pow(0.5) / w.abs().amax(0).pow(0.5))
    got, ref = sens(gm), reference_errors(m, cal, vec)
    for name in ("fc1", "fc2"):
        assert got[name].error == pytest.approx(ref[name], rel=1e-3)


def test_inputs_of_different_shapes_run_one_forward_each():
    m, gm = traced()
    g = torch.Generator().manual_seed(1)
    cal = [(torch.randn(2, 5, 32, generator=g),), (torch.randn(2, 7, 32, generator=g),)]
    p = ScoreSensitivity(cal, samples=2)
    p(gm)
    assert p.forwards == 2 * 3  # each input: the reference and one per linear
    got, ref = sens(gm), reference_errors(m, cal)
    assert got["fc1"].error == pytest.approx(ref["fc1"], rel=1e-3)
    one = ScoreSensitivity(calib(4), samples=4)
    one(traced()[1])
    assert one.forwards == 4 * 3  # never concatenated into a batch: activations of one input at a time


def test_spread_is_stratified_over_the_trajectory():
    assert spread(6, 2) == [0, 5] and spread(6, 3) == [0, 2, 5] and spread(2, 5) == [0, 1] and spread(5, 1) == [2]


def test_preconditions():
    _, gm = traced()
    with pytest.raises(CalibrationError, match="score_sensitivity"):
        ScoreSensitivity([])
    with pytest.raises(PassError, match="samples"):
        ScoreSensitivity(calib(), samples=0)
    with pytest.raises(PassError, match="lack 'stats'"):
        ScoreSensitivity(calib(), alpha=0.5)(gm)


def test_choose_within_budget_is_greedy_by_gain_per_byte():
    items = [("big", 10.0, 100), ("small", 2.0, 10), ("tiny", 0.5, 1), ("useless", 0.0, 1)]
    assert choose_within_budget(items, 11) == ["tiny", "small"]
    assert choose_within_budget(items, 111) == ["tiny", "small", "big"]
    assert choose_within_budget(items, 0) == []
    assert choose_within_budget(items, 105) == ["tiny", "small"]  # big no longer fits, nothing else helps


def _analysed():
    m, gm = traced()
    cal = calib()
    for p in (CollectStats(cal), ScoreFragility(), ScoreSensitivity(cal, samples=2)):
        p(gm)
    return m, gm


def test_selection_by_sensitivity_top_k_and_budget():
    m, gm = _analysed()
    s = sens(gm)
    first = min(s, key=lambda n: s[n].rank)
    SelectSchemes(SelectOptions(top_k=1, by=ProtectBy.SENSITIVITY))(gm)
    sel = {r.name: r.selection for _, r in meta.records(gm)}
    assert sel[first].kind == "protected" and "sensitivity rank 1" in sel[first].reason
    # fc1 is 64x32 floats (8192 B), fc2 32x64 (8192 B): a budget of half the bytes keeps one, the better
    _, gm2 = _analysed()
    SelectSchemes(SelectOptions(by=ProtectBy.SENSITIVITY, budget_fraction=0.5))(gm2)
    kept = [r.name for _, r in meta.records(gm2) if r.selection.kind == "protected"]
    assert kept == [first]
    assert all(r.selection.by == "budget" for _, r in meta.records(gm2) if r.selection.kind == "protected")
    _, gm3 = _analysed()
    SelectSchemes(SelectOptions(by=ProtectBy.SENSITIVITY, budget_fraction=0.49))(gm3)
    assert not any(r.selection.kind == "protected" for _, r in meta.records(gm3))
    _, g = traced()
    with pytest.raises(PassError, match="sensitivity"):
        SelectSchemes(SelectOptions(by=ProtectBy.SENSITIVITY, budget_bytes=10))(g)


def test_recipe_fields_are_validated():
    r = fxquant.Recipe.preset("w8a8-naive").replace(protect_by="sensitivity", protect_budget=0.05, gptq=True)
    assert fxquant.Recipe.from_json(r.to_json()) == r and r.needs_calibration
    with pytest.raises(RecipeError, match="protect_by"):
        fxquant.Recipe(protect_budget=0.05)
    with pytest.raises(RecipeError, match="protect_budget"):
        fxquant.Recipe(protect_by="sensitivity", protect_budget=1.5)
    with pytest.raises(RecipeError, match="gptq"):  # nothing to round (GGUF schemes are: tests/passes/test_round_gptq_gguf.py)
        fxquant.Recipe(default="float", gptq=True)
    with pytest.raises(RecipeError, match="sensitivity_samples"):
        fxquant.Recipe(sensitivity_samples=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_col_absmax_is_exact_by_slices(dtype):
    from fxquant.passes.score_sensitivity import _col_absmax

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 300, generator=g) * torch.rand(300, generator=g) * 10).to(dtype)
    w[:, 0], w[:, 1], w[:, 2] = 0, -w[:, 1].abs(), w[:, 2].abs()  # all zero, all negative, all positive
    for slice_elems in (1, 900, 1 << 22):
        assert torch.equal(_col_absmax(w, slice_elems), w.float().abs().amax(0))
