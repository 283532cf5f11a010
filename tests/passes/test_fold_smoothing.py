"""fold_smoothing on tiny exported graphs, one per fold kind.

    norm:    x -> RMSNorm(w) -> {q, k, v}                  w / s,  Wq,Wk,Wv * s      (no new node)
    norm:    x -> LayerNorm(w, b) -> fc                    w / s, b / s, W * s       (SmoothQuant's smooth_ln_fcs)
    adaln:   layer_norm(x) * (1 + mod(silu(c))) -> fc      mod rows / s, bias (b+1)/s - 1
    adaln:   chunk(mod(c)) scale/shift (Flux)              scale rows as above, shift rows b/s
    linear:  to_v -> sdpa -> to_out ; w3 -> w2             rows of to_v / w3
    fused:   gelu(fc1) -> fc2                              mul(x, get_attr[fc2.smooth]) -> fc2, absorbed by lower_w8a8

The statistics are measured on the float module (max |x| per channel), the smoothing vector is
checked against torchao's SmoothQuant observer, and outputs against the float module and an
independent float64 W8A8 model.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm

import fxquant
from fxquant import meta
from fxquant.graph import LINEAR
from fxquant.passes.find_linears import FindLinears
from fxquant.passes.fold_smoothing import FoldSmoothing
from fxquant.passes.lower_w8a8 import LowerW8A8
from fxquant.passes.materialize_folds import MaterializeFolds
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes
from fxquant.recipe import LayerRule
from fxquant.trace import trace

from .test_lower_w8a8 import reference_w8a8
from .util import TwoLinears, count

MUL = torch.ops.aten.mul.Tensor
W8A8 = torch.ops.fxquant.linear_w8a8.default
SCALE = torch.ops.fxquant.scale_param.default
D = 32


def _outliers(d, seed):
    g = torch.Generator().manual_seed(seed)
    v = 1.0 + 0.5 * torch.rand(d, generator=g)
    v[torch.randperm(d, generator=g)[:3]] = 25.0  # a few outlier channels, as in trained DiTs
    return v


class NormQKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(D, eps=1e-6, elementwise_affine=True)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(D, D, bias=False) for _ in range(3))
        with torch.no_grad():
            self.norm.weight.copy_(_outliers(D, 1))

    def forward(self, x):
        n = self.norm(x)
        return self.to_q(n) + self.to_k(n) * self.to_v(n)


class LayerNormFc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(D)
        self.fc = torch.nn.Linear(D, 16)
        with torch.no_grad():
            self.ln.weight.copy_(_outliers(D, 2))
            self.ln.bias.normal_()

    def forward(self, x):
        return self.fc(self.ln(x))


class AdaLNFinal(torch.nn.Module):
    """Ideogram 4's final layer: a norm without affine, scaled by 1 + mod(silu(c)) over tokens."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D, elementwise_affine=False)
        self.mod = torch.nn.Linear(8, D)
        self.linear = torch.nn.Linear(D, 16)
        with torch.no_grad():
            self.mod.bias.copy_(_outliers(D, 3))

    def forward(self, x, c):
        return self.linear(self.norm(x) * (1.0 + self.mod(F.silu(c))))


class AdaLNChunk(torch.nn.Module):
    """Flux's AdaLayerNormZero: norm(x) * (1 + scale[:, None]) + shift[:, None], from one chunked linear."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D, elementwise_affine=False)
        self.mod = torch.nn.Linear(8, 3 * D)
        self.fc = torch.nn.Linear(D, D)
        with torch.no_grad():
            self.mod.bias[D:2 * D].copy_(_outliers(D, 4))

    def forward(self, x, c):
        shift, scale, gate = self.mod(F.silu(c)).chunk(3, dim=1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return self.fc(h) * gate[:, None]


class Attention(torch.nn.Module):
    def __init__(self, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(D, D, bias=False) for _ in range(4))
        with torch.no_grad():
            self.to_v.weight.mul_(_outliers(D, 5)[:, None])

    def forward(self, x):
        q, k, v = (lin(x).unflatten(-1, (self.heads, -1)).permute(0, 2, 1, 3) for lin in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(o.permute(0, 2, 1, 3).flatten(2, 3))


class SwiGLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = torch.nn.Linear(D, 48, bias=False), torch.nn.Linear(D, 48, bias=False)
        self.w2 = torch.nn.Linear(48, D, bias=False)
        with torch.no_grad():
            self.w3.weight.mul_(_outliers(48, 6)[:, None])

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _inputs(module, seed=0, batch=2, tokens=6):
    g = torch.Generator().manual_seed(seed)
    dt = next(module.parameters()).dtype
    x = torch.randn(batch, tokens, D, generator=g).to(dt)
    if isinstance(module, (AdaLNFinal,)):
        return (x, torch.randn(batch, 1, 8, generator=g).to(dt))
    if isinstance(module, AdaLNChunk):
        return (x, torch.randn(batch, 8, generator=g).to(dt))
    return (x,)


def measured_stats(module, inputs):
    """Per-input-channel max |x| of every nn.Linear, measured with hooks on the float module."""
    seen = {}
    names = {m: n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}

    def hook(mod, args):
        a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)
        seen[names[mod]] = torch.maximum(seen[names[mod]], a) if names[mod] in seen else a

    hs = [m.register_forward_pre_hook(hook) for m in names]
    with torch.no_grad():
        for ex in inputs:
            module(*ex)
    for h in hs:
        h.remove()
    return seen


def prepared(module, protect=(), skip=(), stats=True, select=True):
    module = module.eval()
    calib = [_inputs(module, seed=i) for i in range(3)]
    gm = trace(module, calib[0])
    FindLinears()(gm)
    if stats:
        cm = measured_stats(module, calib)
        for n, r in meta.records(gm):
            meta.update(n, stats=meta.ActStats(float(cm[r.name].max()), 1.0, 3.0, 1, channel_max_abs=cm[r.name]))
    if select:
        SelectSchemes(SelectOptions(protect=tuple(LayerRule(p) for p in protect), skip=tuple(LayerRule(p) for p in skip)))(gm)
    return module, gm, calib


def folded(gm):
    """The state dict with every fold computed (fold_smoothing leaves fxquant::scale_param nodes)."""
    MaterializeFolds()(gm)
    assert count(gm, SCALE) == 0
    return gm.state_dict()


def smoothing(gm):
    return {r.name: (r.smoothing.target, r.smoothing.target_name) for _, r in meta.records(gm)}


def torchao_s(weights, x_max, alpha):
    """SmoothQuant's vector as torchao computes it (its observer, fed the measured max as one batch)."""
    from torchao.prototype.smoothquant.core import SmoothQuantObserver

    obs = SmoothQuantObserver(torch.cat(weights), alpha)
    obs(x_max[None, :])
    return obs.calculate_qparams()[0]


CASES = [
    (NormQKV, {"to_q": ("norm", "norm"), "to_k": ("norm", "norm"), "to_v": ("norm", "norm")}),
    (LayerNormFc, {"fc": ("norm", "ln")}),
    (AdaLNFinal, {"linear": ("adaln", "mod"), "mod": ("fused", "mod")}),
    (AdaLNChunk, {"fc": ("adaln", "mod"), "mod": ("fused", "mod")}),
    (Attention, {"to_out": ("linear", "to_v"), "to_q": ("fused", "to_q")}),
    (SwiGLU, {"w2": ("linear", "w3"), "w1": ("fused", "w1"), "w3": ("fused", "w3")}),
]


@pytest.mark.parametrize("cls,expected", CASES, ids=[c[0].__name__ for c in CASES])
def test_each_fold_kind_keeps_the_float_function(cls, expected):
    module, gm, _ = prepared(cls())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    n_nodes, n_mul = len(gm.graph.nodes), count(gm, MUL)
    res = FoldSmoothing(alpha=0.5)(gm)
    assert res.modified
    got = smoothing(gm)
    assert {k: got[k] for k in expected} == expected
    # Each fused linear adds one mul and one get_attr; each folded parameter is read through one
    # fxquant::scale_param (and a get_attr of its group vector) until materialize_folds bakes it.
    n_fused = sum(1 for t, _ in got.values() if t == "fused")
    n_scale = count(gm, SCALE)
    assert n_scale > 0 and len(gm.graph.nodes) == n_nodes + 2 * n_fused + 2 * n_scale
    assert count(gm, MUL) == n_mul + n_fused
    x = _inputs(module, seed=7, batch=3, tokens=5)
    with torch.no_grad():
        y = gm(*x)
        torch.testing.assert_close(y, module(*x), rtol=1e-5, atol=1e-5)
    folded(gm)
    assert len(gm.graph.nodes) == n_nodes + 2 * n_fused
    assert not [k for k in gm.state_dict() if k.endswith(".smooth_vector")]
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), y, rtol=0, atol=0)  # baking changes no value
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # caller's model untouched


def test_norm_fold_matches_smoothquant_reference_and_torchao_vector():
    """LayerNorm -> fc: SmoothQuant's smooth_ln_fcs (ln.weight /= s, ln.bias /= s, fc.weight *= s)."""
    module, gm, calib = prepared(LayerNormFc())
    x_max = measured_stats(module, calib)["fc"]
    s = torchao_s([module.fc.weight], x_max, 0.5)
    FoldSmoothing(alpha=0.5)(gm)
    sd = folded(gm)
    torch.testing.assert_close(sd["ln.weight"], module.ln.weight / s, rtol=1e-5, atol=0)
    torch.testing.assert_close(sd["ln.bias"], module.ln.bias / s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sd["fc.weight"], module.fc.weight * s, rtol=1e-5, atol=0)
    torch.testing.assert_close(sd["fc.bias"], module.fc.bias, rtol=0, atol=0)


def test_group_shares_one_vector_from_all_its_weights():
    module, gm, calib = prepared(NormQKV())
    x_max = measured_stats(module, calib)["to_q"]
    s = torchao_s([module.to_q.weight, module.to_k.weight, module.to_v.weight], x_max, 0.8)
    FoldSmoothing(alpha=0.8)(gm)
    sd = folded(gm)
    torch.testing.assert_close(sd["norm.weight"], module.norm.weight / s, rtol=1e-5, atol=0)
    for k in ("to_q", "to_k", "to_v"):
        torch.testing.assert_close(sd[f"{k}.weight"], getattr(module, k).weight * s, rtol=1e-5, atol=0)
    assert {r.smoothing.group for _, r in meta.records(gm)} == {("to_q", "to_k", "to_v")}
    assert {r.smoothing.alpha for _, r in meta.records(gm)} == {0.8}


def test_adaln_fold_rescales_rows_and_bias():
    """(1 + m)/s = 1 + m'  with  W' = W / s[:, None],  b' = (1 + b)/s - 1."""
    module, gm, calib = prepared(AdaLNFinal())
    x_max = measured_stats(module, calib)["linear"]
    s = torchao_s([module.linear.weight], x_max, 0.5)
    FoldSmoothing(alpha=0.5)(gm)
    sd = folded(gm)
    mod_w = sd["mod.weight"] * sd["mod.smooth"][None, :] if "mod.smooth" in sd else sd["mod.weight"]
    # mod is itself fused-smoothed (columns * s_mod): undo that to see the row fold alone.
    torch.testing.assert_close(mod_w, module.mod.weight / s[:, None], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sd["mod.bias"], (1 + module.mod.bias) / s - 1, rtol=1e-5, atol=1e-6)


def test_fused_is_absorbed_by_lower_w8a8_and_matches_independent_reference():
    module, gm, calib = prepared(TwoLinears())
    x_max = measured_stats(module, calib)
    FoldSmoothing(alpha=0.5)(gm)
    assert smoothing(gm) == {"fc1": ("fused", "fc1"), "fc2": ("fused", "fc2")}
    assert count(gm, MUL) == 2
    LowerW8A8()(gm)
    assert count(gm, MUL) == 0 and count(gm, W8A8) == 2 and count(gm, LINEAR) == 0
    x = torch.randn(3, 7, D)
    s1 = torchao_s([module.fc1.weight], x_max["fc1"], 0.5)
    s2 = torchao_s([module.fc2.weight], x_max["fc2"], 0.5)
    with torch.no_grad():
        h = reference_w8a8(x / s1, module.fc1.weight * s1, module.fc1.bias)
        ref = reference_w8a8(F.gelu(h).float() / s2, module.fc2.weight * s2, None)
        out = gm(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-4)


def test_smoothing_reduces_w8a8_error_on_outlier_channels():
    module, gm, _ = prepared(NormQKV())
    _, naive, _ = prepared(NormQKV())
    FoldSmoothing(alpha=0.5)(gm)
    LowerW8A8()(gm)
    LowerW8A8()(naive)
    x = _inputs(module, seed=11, batch=4, tokens=16)
    with torch.no_grad():
        ref = module(*x)
        e_sq, e_naive = (float((g(*x) - ref).norm() / ref.norm()) for g in (gm, naive))
    assert e_sq < 0.7 * e_naive


# ---------------------------------------------------------------- must not fold


class NormAlsoReadElsewhere(NormQKV):
    def forward(self, x):
        n = self.norm(x)
        return self.to_q(n) + n  # the normalized tensor feeds the residual too


class SharedScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(_outliers(D, 8))
        self.fc1, self.fc2 = torch.nn.Linear(D, D), torch.nn.Linear(D, D)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x * self.scale)) * self.scale)  # one parameter, two readers


@pytest.mark.parametrize("cls,name", [(NormAlsoReadElsewhere, "to_q"), (SharedScale, "fc1"), (SharedScale, "fc2"), (TwoLinears, "fc2")])
def test_never_folds_where_the_function_would_change(cls, name):
    module, gm, _ = prepared(cls())
    FoldSmoothing(alpha=0.5)(gm)
    assert smoothing(gm)[name][0] == "fused"
    x = _inputs(module, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), module(*x), rtol=1e-5, atol=1e-5)


def test_skipped_linears_stay_untouched():
    module, gm, _ = prepared(SwiGLU(), skip=("w3",))
    FoldSmoothing(alpha=0.5)(gm)
    got = smoothing(gm)
    assert got["w2"][0] == "fused" and got["w3"][0] == "none"  # w3 may not take w2's rows
    assert torch.equal(folded(gm)["w3.weight"], module.w3.weight)
    module, gm, _ = prepared(NormQKV(), skip=("to_k",))
    FoldSmoothing(alpha=0.5)(gm)
    got = smoothing(gm)
    assert got["to_q"][0] == got["to_v"][0] == "fused" and got["to_k"][0] == "none"
    sd = folded(gm)
    assert torch.equal(sd["norm.weight"], module.norm.weight)
    assert torch.equal(sd["to_k.weight"], module.to_k.weight)


def test_protected_group_member_is_compensated_exactly():
    module, gm, _ = prepared(NormQKV(), protect=("to_k",))
    FoldSmoothing(alpha=0.5)(gm)
    assert {t for t, _ in smoothing(gm).values()} == {"norm"}
    LowerW8A8()(gm)
    assert count(gm, LINEAR) == 1  # to_k stays float, its columns carry s
    x = _inputs(module, seed=5)
    with torch.no_grad():
        assert float((gm(*x) - module(*x)).norm() / module(*x).norm()) < 0.05


def test_alpha_search_picks_a_candidate_per_group():
    module, gm, calib = prepared(SwiGLU())
    FoldSmoothing(alpha=0.5, alpha_search=(0.0, 0.5, 0.9), calibration=calib)(gm)
    alphas = {r.name: r.smoothing.alpha for _, r in meta.records(gm)}
    assert set(alphas.values()) <= {0.0, 0.5, 0.9}
    x = _inputs(module, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(gm(*x), module(*x), rtol=1e-5, atol=1e-5)


def test_alpha_search_beats_the_worst_fixed_alpha():
    errs = {}
    for a in (0.0, 1.0, None):
        module, gm, calib = prepared(NormQKV())
        FoldSmoothing(alpha=a if a is not None else 0.5, alpha_search=() if a is not None else (0.0, 0.25, 0.5, 0.75, 1.0),
                      calibration=calib)(gm)
        LowerW8A8()(gm)
        x = _inputs(module, seed=1)  # the search's own calibration data
        with torch.no_grad():
            ref = module(*x)
            errs[a] = float((gm(*x) - ref).norm() / ref.norm())
    assert errs[None] <= min(errs[0.0], errs[1.0]) * 1.05


class NormSwiGLU(torch.nn.Module):
    """RMSNorm -> {w1, w3} -> w2, with one massive w2 input channel: w3's row j times 1e3 and
    w2's column j divided by as much (the float function is unchanged)."""

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(D, eps=1e-6, elementwise_affine=True)
        self.w1, self.w3 = torch.nn.Linear(D, 48, bias=False), torch.nn.Linear(D, 48, bias=False)
        self.w2 = torch.nn.Linear(48, D, bias=False)
        with torch.no_grad():
            self.norm.weight.copy_(_outliers(D, 7))
            self.w3.weight[5] *= 1e3
            self.w2.weight[:, 5] /= 1e3

    def forward(self, x):
        n = self.norm(x)
        return self.w2(F.silu(self.w1(n)) * self.w3(n))


def _w8a8_error(x, weights, s):
    """Relative error of the group's outputs with x / s and W * s quantized as the W8A8 op does."""
    from fxquant.ops.w8a8 import quantize_act_per_token, quantize_weight_per_channel

    xq, xs = quantize_act_per_token(x / s)
    num = den = 0.0
    for w in weights:
        wq, ws = quantize_weight_per_channel(w * s)
        ref = x @ w.T
        num += float(((xq.float() @ wq.float().T) * xs * ws - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def test_downstream_groups_first_so_each_vector_sees_the_final_weights():
    """w2's vector divides w3's massive row; w1/w3's vector must be computed after that, from the
    weights they will run with. Computed before (graph order), max|W3_j| is the massive row's."""
    module, gm, calib = prepared(NormSwiGLU())
    FoldSmoothing(alpha=0.5)(gm)
    assert smoothing(gm)["w2"] == ("linear", "w3") and smoothing(gm)["w1"] == ("norm", "norm")
    sd = folded(gm)
    s13 = module.norm.weight / sd["norm.weight"]
    s2 = sd["w2.weight"][0] / module.w2.weight[0]
    w3_after_w2 = module.w3.weight / s2[:, None]  # what w2's fold leaves in w3, before w1/w3's columns
    x_max = measured_stats(module, calib)["w1"]
    final = torchao_s([module.w1.weight, w3_after_w2], x_max, 0.5)
    stale = torchao_s([module.w1.weight, module.w3.weight], x_max, 0.5)
    torch.testing.assert_close(s13, final, rtol=1e-4, atol=0)
    assert float((stale / final).detach().max()) < 0.5  # the stale vector would migrate far less
    torch.testing.assert_close(sd["w3.weight"], w3_after_w2 * s13, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        x = torch.cat([module.norm(ex[0]).reshape(-1, D) for ex in calib])
        group = [module.w1.weight, w3_after_w2]
        final, stale = final.detach(), stale.detach()
        assert _w8a8_error(x, group, final) < 0.9 * _w8a8_error(x, group, stale)
    with torch.no_grad():
        ex = _inputs(module, seed=11)
        torch.testing.assert_close(gm(*ex), module(*ex), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- preconditions


def test_needs_selection_and_channel_statistics():
    _, gm, _ = prepared(TwoLinears(), select=False)
    with pytest.raises(fxquant.PassError, match="lack 'selection'.*select_schemes"):
        FoldSmoothing()(gm)
    _, bare, _ = prepared(TwoLinears(), stats=False)
    with pytest.raises(fxquant.PassError, match="'fc1' has no per-channel activation max.*collect_stats"):
        FoldSmoothing()(bare)
    _, gm, _ = prepared(TwoLinears())
    n, r = meta.records(gm)[0]
    meta.update(n, stats=meta.ActStats(1.0, 1.0, 3.0, 1, channel_max_abs=torch.ones(5)))
    with pytest.raises(fxquant.PassError, match=r"'fc1': stats.channel_max_abs has shape \(5,\), expected \(32,\)"):
        FoldSmoothing()(gm)


def test_bad_options_and_missing_calibration():
    with pytest.raises(fxquant.RecipeError, match="alpha must be a number in"):
        FoldSmoothing(alpha=1.5)
    _, gm, _ = prepared(TwoLinears())
    with pytest.raises(fxquant.PassError, match="alpha_search needs the calibration"):
        FoldSmoothing(alpha_search=(0.5,))(gm)


def test_non_finite_statistics_raise():
    _, gm, _ = prepared(TwoLinears())
    n, _ = meta.records(gm)[0]
    meta.update(n, stats=meta.ActStats(1.0, 1.0, 3.0, 1, channel_max_abs=torch.full((D,), float("nan"))))
    with pytest.raises(fxquant.CalibrationError, match="fc1: activation channel max-abs has non-finite"):
        FoldSmoothing()(gm)


def test_overlapping_regions_of_one_parameter():
    from fxquant.passes.fold_smoothing.smoothing import ParamFold, overlapping

    scale, shift = ParamFold("mod.weight", (0,), 32), ParamFold("mod.weight", (0,), 0)
    assert not overlapping([scale, shift], 32)  # disjoint rows of one modulation linear
    assert overlapping([scale, ParamFold("mod.weight", (0,), 40)], 32)
    assert overlapping([ParamFold("norm.weight", (0,))], 32, others=[ParamFold("norm.weight", (0,))])
    assert not overlapping([ParamFold("a.weight", (0,))], 32, others=[ParamFold("b.weight", (0,))])
    # a region claimed by an earlier, wider group: rows 0..63 overlap rows 40..71
    assert overlapping([ParamFold("mod.weight", (0,), 40, width=32)], 32, others=[ParamFold("mod.weight", (0,), 0, width=64)])
    assert not overlapping([ParamFold("mod.weight", (0,), 64, width=32)], 32, others=[ParamFold("mod.weight", (0,), 0, width=64)])


def test_bfloat16_model_folds_within_bf16_tolerance():
    module, gm, _ = prepared(NormQKV().to(torch.bfloat16))
    FoldSmoothing(alpha=0.5)(gm)
    assert folded(gm)["norm.weight"].dtype == torch.bfloat16
    x = _inputs(module, seed=2)
    with torch.no_grad():
        ref = module(*x)
        assert float((gm(*x).float() - ref.float()).norm() / ref.float().norm()) < 2e-2
    _, gm, _ = prepared(TwoLinears().to(torch.bfloat16))
    FoldSmoothing(alpha=0.5)(gm)
    assert gm.state_dict()["fc2.smooth"].dtype == torch.bfloat16  # the fused multiply keeps the graph's dtype
    LowerW8A8()(gm)
    assert count(gm, MUL) == 0


def test_pipeline_passes_the_recipe_alpha_and_calibration():
    from fxquant import pipeline

    calib = [_inputs(TwoLinears())]
    recipe = fxquant.Recipe.preset("int8-w8a8-paper").replace(alpha=0.6, alpha_search=(0.3, 0.6))
    fold = [p for p in pipeline.build(recipe, calib).passes if isinstance(p, FoldSmoothing)]
    assert len(fold) == 1 and fold[0].options.alpha == 0.6 and fold[0].options.alpha_search == (0.3, 0.6)
    assert fold[0].calibration is calib
    assert not any(isinstance(p, FoldSmoothing) for p in pipeline.build(recipe.replace(smoothquant=False), calib).passes)
