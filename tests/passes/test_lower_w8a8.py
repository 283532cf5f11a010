"""lower_w8a8:  linear(x, W, b)  ->  fxquant.linear_w8a8(x, W_int8, w_scale, b, None)."""

import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.graph import LINEAR
from fxquant.passes.keep_float import KeepFloat
from fxquant.passes.lower_w8a8 import LowerW8A8
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes
from fxquant.recipe import LayerRule

from .util import count, traced

W8A8 = torch.ops.fxquant.linear_w8a8.default


def reference_w8a8(x, w, b):
    """Independent float64 model of the scheme: per-row int8 weights, per-token int8 activations."""
    x, w = x.double(), w.double()
    ws = w.abs().amax(1, keepdim=True) / 127
    xs = x.abs().amax(-1, keepdim=True) / 127
    wq = torch.round(w / ws).clamp(-127, 127)
    xq = torch.round(x / xs).clamp(-127, 127)
    y = (xq @ wq.T) * xs * ws.T
    return y + b.double() if b is not None else y


def test_rewrites_every_selected_linear_and_drops_float_weights():
    m, gm = traced()
    SelectSchemes(SelectOptions())(gm)
    assert count(gm, LINEAR) == 2 and count(gm, W8A8) == 0
    res = LowerW8A8()(gm)
    assert res.modified is True
    assert count(gm, LINEAR) == 0 and count(gm, W8A8) == 2
    sd = gm.state_dict()
    assert "fc1.weight" not in sd and "fc2.weight" not in sd
    assert sd["fc1.weight_int8"].dtype == torch.int8 and sd["fc1.weight_int8"].shape == (64, 32)
    assert sd["fc1.weight_scale"].dtype == torch.float32 and sd["fc1.weight_scale"].shape == (64,)
    assert "fxquant.linear_w8a8" in gm.code
    rec = [r for _, r in meta.records(gm)]
    assert [r.lowering.scheme for r in rec] == ["w8a8", "w8a8"]
    assert rec[0].lowering.bits_per_weight == pytest.approx(8 + 32 / 32)


def test_numerics_match_an_independent_reference():
    m, gm = traced()
    SelectSchemes(SelectOptions())(gm)
    LowerW8A8()(gm)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        h = reference_w8a8(x, m.fc1.weight, m.fc1.bias)
        ref = reference_w8a8(torch.nn.functional.gelu(h), m.fc2.weight, None)
        out = gm(x)
        flt = m(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert float((out - flt).norm() / flt.norm()) < 0.02  # and it tracks the float model


def test_protected_and_skipped_linears_are_not_rewritten():
    m, gm = traced()
    SelectSchemes(SelectOptions(protect=(LayerRule("fc1"),), skip=(LayerRule("fc2"),)))(gm)
    res = LowerW8A8()(gm)
    assert res.modified is False and count(gm, LINEAR) == 2 and count(gm, W8A8) == 0
    x = torch.randn(2, 4, 32)
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
    assert {r.lowering for _, r in meta.records(gm)} == {None}  # declined: float is keep_float's
    assert KeepFloat()(gm).modified is False
    assert {r.lowering.scheme for _, r in meta.records(gm)} == {"float"}
    assert [r.lowering.bits_per_weight for _, r in meta.records(gm)] == [32.0, 32.0]


def test_idempotent_and_declines_what_it_does_not_own():
    """A second run changes nothing (it used to re-quantize the int8 weights); q8_0 linears are lower_gguf's."""
    m, gm = traced()
    SelectSchemes(SelectOptions(rules=(fxquant.SchemeRule("fc2", "q8_0"),)))(gm)
    assert LowerW8A8()(gm).modified is True
    assert count(gm, W8A8) == 1 and count(gm, LINEAR) == 1
    code, sd = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        want = gm(x)
    assert LowerW8A8()(gm).modified is False
    assert gm.code == code and sd.keys() == gm.state_dict().keys()
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in sd.items())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=0, atol=0)


def test_needs_a_selection():
    _, gm = traced()
    with pytest.raises(fxquant.PassError, match="lack 'selection'.*select_schemes"):
        LowerW8A8()(gm)


def test_does_not_touch_the_source_module():
    m, gm = traced()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    SelectSchemes(SelectOptions())(gm)
    LowerW8A8()(gm)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _fuse_smooth_by_hand(gm, smooth):
    """What fold_smoothing's "fused" case leaves: linear(mul(x, get_attr[fc1.smooth])) and a record."""
    from fxquant import graph
    node, rec = meta.records(gm)[0]
    graph.set_buffer(gm, "fc1.smooth", smooth)
    with gm.graph.inserting_before(node):
        s = gm.graph.get_attr("fc1.smooth")
        mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node.args[0], s))
    node.replace_input_with(node.args[0], mul)
    gm.recompile()
    meta.update(node, smoothing=meta.Smoothing("fused", rec.name))


def test_fused_smoothing_moves_into_the_op():
    m, gm = traced()
    smooth = torch.rand(32) + 0.5
    _fuse_smooth_by_hand(gm, smooth)
    SelectSchemes(SelectOptions())(gm)
    LowerW8A8()(gm)
    assert count(gm, torch.ops.aten.mul.Tensor) == 0 and count(gm, W8A8) == 2
    op = next(n for n in gm.graph.nodes if n.target is W8A8)
    assert op.args[4].op == "get_attr" and str(op.args[4].target) == "fc1.smooth"
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        h = reference_w8a8(x * smooth, m.fc1.weight, m.fc1.bias)
        ref = reference_w8a8(torch.nn.functional.gelu(h), m.fc2.weight, None)
        torch.testing.assert_close(gm(x).double(), ref, rtol=1e-4, atol=1e-5)


def test_fused_record_without_its_multiply_is_an_error():
    _, gm = traced()
    node, rec = meta.records(gm)[0]
    meta.update(node, smoothing=meta.Smoothing("fused", rec.name))
    SelectSchemes(SelectOptions())(gm)
    with pytest.raises(fxquant.PassError, match=r"linear 'fc1' has a fused smoothing record"):
        LowerW8A8()(gm)
