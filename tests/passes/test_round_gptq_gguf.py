"""round_gptq for the GGUF schemes: GPTQ's codes on the block grid llama.cpp's reference encoder
computes (Q8_0's d; Q4_K's d, dmin, 6-bit scales and mins), the bytes lower_gguf then writes.

    a: linear 256->512 (q4_k) -> gelu -> b: linear 512->256 (q4_k)      c: linear 64->32 (q8_0, misaligned)
         W -> dequantize_gguf(get_attr[l.qweight], ...): bytes = the reference encoder's headers + GPTQ codes q
    lower_gguf: linear_gguf on those bytes as they are; gguf-py decodes them to step * q - offset bit for bit

Checked: the decode of the lowered bytes by gguf-py is the value the pass intended, and equals an
independent GPTQ run on the layer's calibration Hessian; each layer's output error on the
calibration data is below round-to-nearest's; the headers are the reference encoder's; a second
run changes nothing; the recipe's checks name the key.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant import codecs, graph, meta
from fxquant.errors import RecipeError
from fxquant.passes.find_linears import FindLinears
from fxquant.passes.lower_gguf import LowerGGUF
from fxquant.passes.round_gptq import RoundGPTQ, gptq_grid_codes
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes
from fxquant.trace import trace

gguf = pytest.importorskip("gguf")
LINEAR_GGUF = torch.ops.fxquant.linear_gguf.default


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(256, 512), torch.nn.Linear(512, 256, bias=False), torch.nn.Linear(64, 32)

    def forward(self, x, y):
        return self.b(F.gelu(self.a(x))), self.c(y)


def setup(qtype="q4_k", dtype=torch.float32, n=4):
    """The module (channels of very different scale, correlated: what GPTQ exploits), n calibration inputs, and
    the traced graph after select_schemes (c, 64 wide, is Q8_0 under misaligned="q8_0")."""
    torch.manual_seed(0)
    m = Tiny().to(dtype).eval()
    mix, mix_y = torch.randn(256, 256) / 16 + torch.eye(256), torch.randn(64, 64) / 8 + torch.eye(64)
    gain, gain_y = torch.logspace(-1, 1, 256)[torch.randperm(256)], torch.logspace(-1, 1, 64)[torch.randperm(64)]
    cal = [((torch.randn(4, 24, 256) @ mix * gain).to(dtype), (torch.randn(4, 24, 64) @ mix_y * gain_y).to(dtype))
           for _ in range(n)]
    gm = trace(m, cal[0])
    FindLinears()(gm)
    SelectSchemes(SelectOptions(default=qtype, misaligned="q8_0"))(gm)
    return m, cal, gm


def layer_inputs(m, cal):
    """Each linear's calibration inputs [tokens, in] (float32), from hooks on the float module."""
    seen = {}
    hooks = [getattr(m, k).register_forward_pre_hook(lambda mod, a, k=k: seen.setdefault(k, []).append(a[0]))
             for k in "abc"]
    with torch.no_grad():
        for ex in cal:
            m(*ex)
    for h in hooks:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]).float() for x in v]) for k, v in seen.items()}


def decoded(gm):
    """name -> (qtype, gguf-py's decode of the lowered bytes)."""
    out = {}
    for n in gm.graph.nodes:
        if n.target is LINEAR_GGUF:
            b = graph.get_attr(gm, str(n.args[1].target)).numpy()
            out[meta.get(n).name] = (n.args[2], torch.from_numpy(np.ascontiguousarray(
                gguf.quants.dequantize(b, gguf.GGMLQuantizationType[n.args[2].upper()]))))
    return out


@pytest.mark.parametrize("qtype", ["q4_k", "q8_0"])
def test_bytes_decode_to_the_gptq_values_and_beat_round_to_nearest(qtype):
    m, cal, gm = setup(qtype)
    p = RoundGPTQ(cal)
    assert p(gm).modified is True
    assert p.forwards == len(cal)
    assert sum(n.target is graph.DEQUANTIZE_GGUF for n in gm.graph.nodes) == 3 and "fxquant.dequantize_gguf" in gm.code
    assert not any(k.endswith(".weight") for k, _ in gm.named_parameters())  # the float weights left the module
    qweights = {k: gm.get_buffer(f"{k}.qweight") for k in "abc"}
    qtypes = {"a": qtype, "b": qtype, "c": "q8_0"}  # c: 64 wide, misaligned for q4_k
    intended = {k: codecs.dequantize(qweights[k], qtypes[k]) for k in "abc"}
    assert all(r.rounding == meta.Rounding("gptq", 0.01, 1) for _, r in meta.records(gm))
    LowerGGUF()(gm)
    assert sum(n.target is LINEAR_GGUF for n in gm.graph.nodes) == 3
    assert all(gm.get_buffer(f"{k}.qweight") is qweights[k] for k in "abc")  # taken as they are
    assert all(r.rounding.method == "gptq" and "gptq" in r.lowering.note for _, r in meta.records(gm))
    got = decoded(gm)
    xs = layer_inputs(m, cal)
    for k in "abc":
        qt, w_dec = got[k]
        w = getattr(m, k).weight.detach()
        assert torch.equal(w_dec, intended[k]), k  # gguf-py decodes what the pass intended, bit for bit
        rtn_bytes = codecs.quantize(w, qt)
        assert np.array_equal(codecs.grid(graph.get_attr(gm, f"{k}.qweight").numpy(), qt), codecs.grid(rtn_bytes, qt))
        rtn = codecs.dequantize(rtn_bytes, qt)
        err = lambda v: float((xs[k] @ (v - w).T).norm())  # noqa: E731 - the layer's output error
        assert err(w_dec) < 0.9 * err(rtn), (k, err(w_dec), err(rtn))
    # a (the first layer, whose inputs the rounding of no other layer changes) against an independent GPTQ run
    g = codecs.grid(codecs.quantize(m.a.weight, qtype), qtype)
    step, offset = (torch.from_numpy(v) for v in codecs.grid_values(g, qtype, 256))
    h = sum(x.reshape(-1, 256).T @ x.reshape(-1, 256) for x, _ in cal)  # summed per input, as the pass does
    q = gptq_grid_codes(m.a.weight, h, step, offset, codecs.code_range(qtype))
    assert torch.equal(got["a"][1], step * q - offset)


def test_held_out_error_is_lower_too():
    m, cal, gm = setup("q4_k", n=6)
    RoundGPTQ(cal[:4])(gm)
    LowerGGUF()(gm)
    xs = layer_inputs(m, cal[4:])  # not seen by GPTQ
    w, w_dec = m.a.weight.detach(), decoded(gm)["a"][1]
    rtn = codecs.dequantize(codecs.quantize(w, "q4_k"), "q4_k")
    assert float((xs["a"] @ (w_dec - w).T).norm()) < float((xs["a"] @ (rtn - w).T).norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_rounded_on_the_reference_grid(dtype):
    m, cal, gm = setup("q4_k", dtype=dtype, n=2)
    RoundGPTQ(cal)(gm)
    LowerGGUF()(gm)
    qw = gm.get_buffer("a.qweight").numpy()
    g = codecs.grid(qw, "q4_k")
    assert np.array_equal(g, codecs.grid(codecs.quantize(m.a.weight.float(), "q4_k"), "q4_k"))  # the encoder's headers
    step, offset = (torch.from_numpy(v) for v in codecs.grid_values(g, "q4_k", 256))
    w_dec = decoded(gm)["a"][1]
    codes = (w_dec + offset) / step
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15  # on the grid
    assert not np.array_equal(qw, codecs.quantize(m.a.weight.float(), "q4_k"))  # GPTQ chose other codes


def test_a_weight_whose_gptq_values_would_not_survive_bfloat16_is_rounded_too():
    """A tight cluster of same-signed weights puts Q4_K's min hundreds of steps below zero, where
    bfloat16 cannot hold GPTQ's values. The pass keeps codes, not values: that weight is rounded
    like the others, on the encoder's grid, and beats the encoder's own codes on the calibration data."""
    m, cal, gm = setup("q4_k", dtype=torch.bfloat16, n=2)
    with torch.no_grad():
        m.a.weight.copy_(-1.0 - 0.05 * torch.rand(512, 256))  # the graph reads the module's tensors
    before = m.a.weight.detach().clone()
    assert RoundGPTQ(cal)(gm).modified is True
    recs = {r.name: r for _, r in meta.records(gm)}
    assert all(recs[k].rounding.method == "gptq" for k in "abc")
    assert torch.equal(m.a.weight, before)  # the source module is not written
    LowerGGUF()(gm)
    w_dec = decoded(gm)["a"][1]
    rtn_bytes = codecs.quantize(before.float(), "q4_k")
    assert np.array_equal(codecs.grid(gm.get_buffer("a.qweight").numpy(), "q4_k"), codecs.grid(rtn_bytes, "q4_k"))
    rtn = codecs.dequantize(rtn_bytes, "q4_k")
    x = layer_inputs(m, cal)["a"]
    assert float((x @ (w_dec - before.float()).T).norm()) < float((x @ (rtn - before.float()).T).norm())


def test_second_run_changes_nothing_and_other_schemes_are_declined():
    m, cal, gm = setup("q4_k", n=2)
    RoundGPTQ(cal)(gm)
    state, recs = copy.deepcopy(gm.state_dict()), [r for _, r in meta.records(gm)]
    assert RoundGPTQ(cal)(gm).modified is False  # rounded GGUF weights are declined
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    assert [r for _, r in meta.records(gm)] == recs
    _, _, g2 = setup("q4_k", n=1)
    SelectSchemes(SelectOptions(default="float"))(g2)  # nothing quantized: nothing to round
    assert RoundGPTQ(cal)(g2).modified is False


def test_recipe_gptq_covers_the_gguf_schemes_and_names_bad_keys():
    for name in ("q8_0", "q4_k", "q4_k_m"):
        r = fxquant.Recipe.preset(name).replace(gptq=True)
        assert fxquant.Recipe.from_json(r.to_json()) == r and r.needs_calibration
        assert RoundGPTQ in [type(p) for p in fxquant.pipeline.build(r, [()]).passes]
    assert RoundGPTQ not in [type(p) for p in fxquant.pipeline.build(fxquant.Recipe.preset("q4_k"), [()]).passes]
    with pytest.raises(RecipeError, match="recipe.gptq:"):
        fxquant.Recipe(default="float", gptq=True)
    with pytest.raises(RecipeError, match="recipe.gptq:"):
        fxquant.Recipe.from_dict({"default": "q4_k", "gptq": "yes"})
    with pytest.raises(RecipeError, match="recipe.gptq_damp"):
        fxquant.Recipe.from_dict({"default": "q8_0", "gptq": True, "gptq_damp": 0})
    with pytest.raises(RecipeError, match="recipe.gptq_damp"):
        fxquant.Recipe.from_dict({"default": "q4_k", "gptq": True, "gptq_damp": 2.0})
