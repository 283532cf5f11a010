"""round_gptq: the pinned weight gives back the GPTQ codes and the RTN scale bit for bit under the
lowering's own quantizer (float32, float16, bfloat16); GPTQ beats round-to-nearest on the
calibration objective; the pass on a tiny graph, what it must not touch, and its preconditions.

    linear(x, get_attr[fc1.weight])  ->  linear(x, get_attr[fc1.weight])   W -> W' = q * s (pinned)
"""

import pytest
import torch

from fxquant import meta
from fxquant.errors import CalibrationError, PassError
from fxquant.graph import LINEAR
from fxquant.ops.w8a8 import quantize_weight_per_channel
from fxquant.passes.lower_w8a8 import LowerW8A8
from fxquant.passes.round_gptq import RoundGPTQ, gptq_codes, pinned_weight
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes
from fxquant.recipe import LayerRule

from .util import count, traced


def correlated(n=512, d=48, seed=0):
    """Rows with correlated channels: one fixed mixing matrix, ``seed`` picks the samples."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(100)) / d ** 0.5 + torch.eye(d)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ mix) * torch.linspace(0.2, 3.0, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pinned_weight_gives_back_codes_and_scale_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 48, generator=g) * torch.logspace(-3, 1, 96)[:, None]).to(dtype)
    w[5] = 0  # an all-zero row
    x = correlated()
    codes = gptq_codes(w, x.T @ x)
    new = pinned_weight(w, codes)
    assert new.dtype == dtype
    q, s = quantize_weight_per_channel(new)
    q0, s0 = quantize_weight_per_channel(w)
    assert torch.equal(q, codes) and torch.equal(s, s0)  # same scale, GPTQ's codes
    assert not torch.equal(codes, q0)  # GPTQ changed some roundings
    assert (codes.float() - q0.float()).abs().max() <= 8


def test_gptq_lowers_the_calibration_error_against_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    x = correlated()
    q_rtn, s = quantize_weight_per_channel(w)
    codes = gptq_codes(w, x.T @ x)
    err = lambda q: float((x @ (q.float() * s[:, None] - w).T).pow(2).sum())  # noqa: E731
    assert err(codes) < 0.8 * err(q_rtn)
    held = correlated(seed=9)  # the same distribution, other samples: still better
    err_h = lambda q: float((held @ (q.float() * s[:, None] - w).T).pow(2).sum())  # noqa: E731
    assert err_h(codes) < err_h(q_rtn)


def test_block_size_does_not_change_the_codes():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 40, generator=g)
    x = correlated(d=40)
    a, b = gptq_codes(w, x.T @ x, block=128), gptq_codes(w, x.T @ x, block=7)
    assert (a != b).float().mean() < 0.01  # same algorithm; float reassociation may flip a tie


def calib(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 5, 32, generator=g),) for _ in range(n)]


def test_pass_rewrites_weights_only_and_the_lowering_uses_the_gptq_codes():
    m, gm = traced()
    cal = calib()
    SelectSchemes(SelectOptions(protect=(LayerRule("fc2"),)))(gm)
    code = gm.code
    p = RoundGPTQ(cal, hessian_bytes=4 * 32 ** 2)  # one weight per chunk
    assert p(gm).modified is True
    assert gm.code == code and count(gm, LINEAR) == 2  # same graph, new constants
    assert p.forwards == len(cal)  # fc1 only: one chunk
    assert torch.equal(gm.fc2.weight, m.fc2.weight)  # protected: not touched
    assert not torch.equal(gm.fc1.weight, m.fc1.weight) and m.fc1.weight.dtype == torch.float32
    x = torch.cat([c[0].reshape(-1, 32) for c in cal])
    expected = gptq_codes(m.fc1.weight, x.T @ x)
    LowerW8A8()(gm)
    assert torch.equal(gm.get_buffer("fc1.weight_int8"), expected)
    assert torch.equal(gm.get_buffer("fc1.weight_scale"), quantize_weight_per_channel(m.fc1.weight)[1])


def test_a_weight_whose_hessian_is_over_budget_keeps_round_to_nearest(caplog):
    m, gm = traced()
    SelectSchemes(SelectOptions())(gm)
    widths = {n: meta.get(n).in_features for n, _ in meta.records(gm)}
    small = min(widths.values())
    p = RoundGPTQ(calib(), hessian_bytes=4 * small ** 2)  # only the narrowest input's Hessian fits
    with caplog.at_level("WARNING", logger="fxquant"):
        assert p(gm).modified is True
    for node, rec in meta.records(gm):
        target = str(node.args[1].target)
        if rec.in_features > small:
            assert rec.rounding == meta.Rounding("rtn", 0.0) and target in caplog.text
            assert torch.equal(gm.get_parameter(target), m.get_parameter(target))  # RTN: the weight as it was
        else:
            assert rec.rounding is None and not torch.equal(gm.get_parameter(target), m.get_parameter(target))
    assert "recipe.gptq_hessian_bytes" in caplog.text
    code, w = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    assert p(gm).modified is False and gm.code == code  # declined on a second run
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in w.items())


def test_preconditions():
    _, gm = traced()
    with pytest.raises(CalibrationError, match="round_gptq"):
        RoundGPTQ([])
    with pytest.raises(PassError, match="damp"):
        RoundGPTQ(calib(), damp=0)
    with pytest.raises(PassError, match="lack 'selection'"):
        RoundGPTQ(calib())(gm)
    SelectSchemes(SelectOptions())(gm)
    LowerW8A8()(gm)
    code = gm.code
    assert RoundGPTQ(calib())(gm).modified is False and gm.code == code  # lowered linears are declined


def test_second_run_changes_nothing_and_the_pipeline_places_it_before_the_lowering():
    from fxquant import pipeline
    from fxquant.passes.fold_smoothing import FoldSmoothing
    from fxquant.passes.lower_w8a8 import LowerW8A8 as Lower
    from fxquant.passes.score_sensitivity import ScoreSensitivity
    from fxquant.recipe import Recipe

    _, gm = traced()
    SelectSchemes(SelectOptions())(gm)
    assert RoundGPTQ(calib())(gm).modified is True
    w = gm.fc1.weight.clone()
    assert RoundGPTQ(calib())(gm).modified is False  # the pinned weights are their own GPTQ result
    assert torch.equal(gm.fc1.weight, w)
    names = [type(p) for p in pipeline.build(Recipe.preset("int8-w8a8"), calib()).passes]
    assert names.index(FoldSmoothing) < names.index(RoundGPTQ) < names.index(Lower)
    assert ScoreSensitivity in names
    paper = [type(p) for p in pipeline.build(Recipe.preset("int8-w8a8-paper"), calib()).passes]
    assert RoundGPTQ not in paper and ScoreSensitivity not in paper
