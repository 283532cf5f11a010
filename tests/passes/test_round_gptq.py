"""round_gptq: GPTQ's int8 codes keep the RTN per-row scale and beat round-to-nearest on the
calibration objective; the pass on a tiny graph (the weight becomes its codes, read through
``fxquant::dequantize_int8`` until the lowering takes them as they are), column groups when a
Hessian does not fit the budget, what the pass must not touch, and its preconditions.

    linear(x, get_attr[fc1.weight])  ->  linear(x, dequantize_int8(get_attr[fc1.weight_int8], get_attr[fc1.weight_scale], f32))
"""

import pytest
import torch
import torch.nn.functional as F

from fxquant import graph, meta
from fxquant.errors import CalibrationError, PassError
from fxquant.graph import DEQUANTIZE_INT8, LINEAR
from fxquant.ops.w8a8 import quantize_weight_per_channel
from fxquant.passes.lower_w8a8 import LINEAR_W8A8, LowerW8A8
from fxquant.ownership import take_ownership
from fxquant.passes import round_gptq
from fxquant.passes.round_gptq import MIN_BUDGET, RoundGPTQ, _compact, column_groups, gptq_codes
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes
from fxquant.recipe import LayerRule

from .util import TwoLinears, count, traced


def correlated(n=512, d=48, seed=0):
    """Rows with correlated channels: one fixed mixing matrix, ``seed`` picks the samples."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(100)) / d ** 0.5 + torch.eye(d)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) @ mix) * torch.linspace(0.2, 3.0, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codes_keep_the_rtn_scale(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 48, generator=g) * torch.logspace(-3, 1, 96)[:, None]).to(dtype)
    w[5] = 0  # an all-zero row
    x = correlated()
    codes = gptq_codes(w, x.T @ x)
    q0, _ = quantize_weight_per_channel(w)
    col = w.float().abs().argmax(1)
    assert torch.equal(codes.gather(1, col[:, None]), q0.gather(1, col[:, None]))  # each row's max keeps +-127
    assert int(codes.abs().amax(1)[torch.arange(96) != 5].min()) == 127 and not codes[5].any()
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


def calib(n=3, d=32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 5, d, generator=g),) for _ in range(n)]


def test_the_weight_becomes_its_codes_and_the_lowering_takes_them_as_they_are():
    m, gm = traced()
    cal = calib()
    SelectSchemes(SelectOptions(protect=(LayerRule("fc2"),)))(gm)
    p = RoundGPTQ(cal)
    assert p(gm).modified is True
    assert p.forwards == len(cal) and p.budget == MIN_BUDGET  # a tiny model: the floor, one chunk
    fc1 = next(n for n, r in meta.records(gm) if r.name == "fc1")
    assert fc1.args[1].target is DEQUANTIZE_INT8 and count(gm, LINEAR) == 2
    assert "fxquant.dequantize_int8" in gm.code
    names = dict(gm.named_parameters())
    assert "fc1.weight" not in names and torch.equal(names["fc2.weight"], m.fc2.weight)  # protected: not touched
    assert m.fc1.weight.dtype == torch.float32 and m.fc1.weight.requires_grad  # the source module: as it was
    x = torch.cat([c[0].reshape(-1, 32) for c in cal])
    expected = gptq_codes(m.fc1.weight, x.T @ x)
    q, s = gm.get_buffer("fc1.weight_int8"), gm.get_buffer("fc1.weight_scale")
    assert torch.equal(q, expected) and torch.equal(s, quantize_weight_per_channel(m.fc1.weight)[1])
    assert meta.get(fc1).rounding == meta.Rounding("gptq", 0.01, 1)
    xin = cal[0][0]  # the graph runs between the passes, on the dequantized codes
    ref = m.fc2(F.gelu(F.linear(xin, q.float() * s[:, None], m.fc1.bias)))
    out = gm(xin)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    lazy = graph.Watch(gm, set(), lambda *a: None, by_rows=True).run(xin)  # later chunks' forwards: weight rows by slices
    torch.testing.assert_close(lazy[0] if isinstance(lazy, tuple) else lazy, out, rtol=0, atol=1e-6)
    LowerW8A8()(gm)
    assert count(gm, LINEAR_W8A8) == 1 and count(gm, DEQUANTIZE_INT8) == 0
    assert gm.get_buffer("fc1.weight_int8") is q and gm.get_buffer("fc1.weight_scale") is s  # taken, not re-quantized


def test_column_groups_cover_the_columns_and_fit_the_budget():
    assert column_groups(4608, 8 * 4608 ** 2) == [(0, 4608)]
    for n, budget in ((4608, 8 * 4608 ** 2 - 1), (53248, 164_000_000), (12288, 1 << 30), (7, 8)):
        groups = column_groups(n, budget)
        assert groups[0][0] == 0 and groups[-1][1] == n and all(a < b for a, b in groups)
        assert all(groups[i][1] == groups[i + 1][0] for i in range(len(groups) - 1))
        assert all(8 * (b - a) ** 2 <= max(budget, 8) for a, b in groups) and (len(groups) > 1) == (8 * n * n > budget)


def test_a_weight_whose_hessian_does_not_fit_is_rounded_in_column_groups(caplog):
    m, gm = traced(TwoLinears(d=32, h=64).eval())
    SelectSchemes(SelectOptions())(gm)
    p = RoundGPTQ(calib(), hessian_bytes=8 * 32 ** 2)  # fc1's 32-wide Hessian fits twice; fc2's 64 does not
    with caplog.at_level("INFO", logger="fxquant"):
        assert p(gm).modified is True
    recs = {r.name: r for _, r in meta.records(gm)}
    assert recs["fc1"].rounding.groups == 1 and recs["fc2"].rounding.groups == 2
    assert "fc2.weight" in caplog.text and "2 column groups" in caplog.text
    assert p.forwards == 3 * len(calib())  # three chunks: each 4 KiB block and its copy fill the 8 KiB budget
    # each group's error is compensated within the group: better than round-to-nearest on the calibration objective
    h = torch.cat([F.gelu(F.linear(c[0], gm.get_buffer("fc1.weight_int8").float() * gm.get_buffer("fc1.weight_scale")[:, None],
                                   m.fc1.bias)).reshape(-1, 64) for c in calib()])
    w = m.fc2.weight.detach()
    q_rtn, s = quantize_weight_per_channel(w)
    err = lambda q: float((h @ (q.float() * s[:, None] - w).T).pow(2).sum())  # noqa: E731
    assert torch.equal(gm.get_buffer("fc2.weight_scale"), s)
    assert err(gm.get_buffer("fc2.weight_int8")) < err(q_rtn)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    assert p(gm).modified is False and gm.code == code  # declined on a second run
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())


def test_a_hessian_forward_stops_once_its_chunk_inputs_are_seen(monkeypatch):
    m, gm = traced(TwoLinears(d=32, h=64).eval())
    SelectSchemes(SelectOptions())(gm)
    ran: list[list[str]] = []
    run, run_node = graph.Watch.run, graph.Watch.run_node

    def record_run(self, *args, **kwargs):
        ran.append([])
        return run(self, *args, **kwargs)

    def record_node(self, n):
        ran[-1].append(n.name)
        return run_node(self, n)

    monkeypatch.setattr(graph.Watch, "run", record_run)
    monkeypatch.setattr(graph.Watch, "run_node", record_node)
    RoundGPTQ(calib(), hessian_bytes=8 * 32 ** 2)(gm)  # three chunks: fc1's input, then fc2's two column groups
    fc1 = next(n.name for n, r in meta.records(gm) if r.name == "fc1")
    first, last = ran[0], ran[-1]
    assert fc1 not in first and "output" not in first  # fc1's input seen: nothing downstream runs
    assert fc1 in last and "output" not in last  # fc2's input comes after fc1; fc2 and the output never run


def test_preconditions():
    _, gm = traced()
    with pytest.raises(CalibrationError, match="round_gptq"):
        RoundGPTQ([])
    with pytest.raises(PassError, match="damp"):
        RoundGPTQ(calib(), damp=0)
    with pytest.raises(PassError, match="hessian_bytes"):
        RoundGPTQ(calib(), hessian_bytes=-1)
    with pytest.raises(PassError, match="lack 'selection'"):
        RoundGPTQ(calib())(gm)
    SelectSchemes(SelectOptions())(gm)
    LowerW8A8()(gm)
    code = gm.code
    assert RoundGPTQ(calib())(gm).modified is False and gm.code == code  # lowered linears are declined


def test_the_default_budget_is_a_twentieth_of_the_float_bytes(monkeypatch):
    from fxquant.passes import round_gptq

    big = torch.nn.Sequential(torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(256, 64, bias=False)).eval()
    for p_ in big.parameters():
        p_.requires_grad_(False)
    _, gm = traced(big, shape=(1, 3, 256))
    SelectSchemes(SelectOptions())(gm)
    g = torch.Generator().manual_seed(0)
    p = RoundGPTQ([(torch.randn(1, 3, 256, generator=g),)])
    monkeypatch.setattr(round_gptq, "MIN_BUDGET", 1)  # the floor (64 MiB) would hide the fraction at this size
    p(gm)
    assert p.budget == (256 * 256 + 256 * 64) * 4 // 20
    assert [meta.get(n).rounding.groups for n, _ in meta.records(gm)] == [6, 6]  # 16 KiB: groups of 43 columns fit twice


def test_second_run_changes_nothing_and_the_pipeline_places_it_before_the_lowering():
    from fxquant import pipeline
    from fxquant.passes.fold_smoothing import FoldSmoothing
    from fxquant.passes.lower_w8a8 import LowerW8A8 as Lower
    from fxquant.passes.score_sensitivity import ScoreSensitivity
    from fxquant.recipe import Recipe

    _, gm = traced()
    SelectSchemes(SelectOptions())(gm)
    assert RoundGPTQ(calib())(gm).modified is True
    q = gm.get_buffer("fc1.weight_int8").clone()
    assert RoundGPTQ(calib())(gm).modified is False  # rounded linears are declined
    assert torch.equal(gm.get_buffer("fc1.weight_int8"), q)
    assert graph.is_dequantize(next(n for n, r in meta.records(gm) if r.name == "fc1").args[1])
    names = [type(p) for p in pipeline.build(Recipe.preset("int8-w8a8"), calib()).passes]
    assert names.index(FoldSmoothing) < names.index(RoundGPTQ) < names.index(Lower)
    assert ScoreSensitivity in names
    paper = [type(p) for p in pipeline.build(Recipe.preset("int8-w8a8-paper"), calib()).passes]
    assert RoundGPTQ not in paper and ScoreSensitivity not in paper


def test_the_hessians_held_at_once_and_the_inversion_copy_fit_the_budget():
    held = []

    class Counting(RoundGPTQ):
        def _hessians(self, gm, chunk, front):
            hess = super()._hessians(gm, chunk, front)
            sizes = [h.numel() * h.element_size() for h in hess.values()]
            held.append(sum(sizes) + max(sizes))
            return hess

    m, gm = traced(TwoLinears(d=32, h=64).eval())
    SelectSchemes(SelectOptions())(gm)
    budget = 3 * 4 * 32 ** 2  # 12 KiB: fc2's 16 KiB Hessian must be split in two 4 KiB blocks
    p = Counting(calib(), hessian_bytes=budget)
    p(gm)
    assert held == [budget, 2 * 4 * 32 ** 2]  # fc1 and fc2's first 32-column block (and one copy); fc2's second


def test_a_lowering_refuses_a_weight_rounded_for_another_scheme_and_names_the_linear():
    import dataclasses

    from fxquant.passes.lower_gguf import LowerGGUF
    from fxquant.schemes import Scheme

    _, gm = traced()
    SelectSchemes(SelectOptions(protect=(LayerRule("fc2"),)))(gm)
    RoundGPTQ(calib())(gm)  # fc1 now reads int8 codes through dequantize_int8
    fc1 = next(n for n, r in meta.records(gm) if r.name == "fc1")
    rec = meta.get(fc1)
    meta.update(fc1, selection=dataclasses.replace(rec.selection, scheme=Scheme.Q8_0))
    with pytest.raises(PassError, match="lower_gguf: linear 'fc1' is selected q8_0 but reads a weight rounded for another scheme"):
        LowerGGUF()(gm)
    _, gm = traced()
    SelectSchemes(SelectOptions(default="q8_0", protect=(LayerRule("fc2"),)))(gm)
    RoundGPTQ(calib())(gm)  # fc1 (32 inputs, one Q8_0 block per row) now reads GGUF bytes
    fc1 = next(n for n, r in meta.records(gm) if r.name == "fc1")
    meta.update(fc1, selection=dataclasses.replace(meta.get(fc1).selection, scheme=Scheme.W8A8))
    with pytest.raises(PassError, match="lower_w8a8: linear 'fc1' is selected w8a8 but reads a weight rounded for another scheme"):
        LowerW8A8()(gm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compact_turns_a_weight_holding_codes_into_its_int8_codes(monkeypatch, dtype):
    monkeypatch.setattr(round_gptq, "ROW_SLICE", 3 * 37)  # 3-row slices: each written over rows read before it
    codes = torch.randint(-128, 128, (50, 37), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    got = _compact(codes.to(dtype))
    assert got.dtype == torch.int8 and torch.equal(got, codes)
    assert got.untyped_storage().nbytes() == codes.numel()  # its own memory, not the float weight's


def _owned(hold_fc1=False):
    m, gm = traced(TwoLinears(d=32, h=64).eval())
    held = m.fc1.weight if hold_fc1 else None
    take_ownership(m)  # compile(consume=True): the traced module holds the only reference
    SelectSchemes(SelectOptions())(gm)
    return gm, held


def test_in_place_rounding_gives_the_same_codes_and_never_writes_a_weight_held_elsewhere(monkeypatch):
    _, shared = traced(TwoLinears(d=32, h=64).eval())
    SelectSchemes(SelectOptions())(shared)
    RoundGPTQ(calib(), hessian_bytes=8 * 32 ** 2)(shared)  # fc2 in two column groups
    compacted = []
    monkeypatch.setattr(round_gptq, "_compact", lambda w: compacted.append(w.shape) or _compact(w))
    gm, _ = _owned()
    RoundGPTQ(calib(), hessian_bytes=8 * 32 ** 2, in_place=True)(gm)
    assert compacted == [(64, 32), (32, 64)]
    assert gm.state_dict().keys() == shared.state_dict().keys()
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in gm.state_dict().items())
    compacted.clear()
    gm, held = _owned(hold_fc1=True)  # the caller kept fc1's weight: it is rounded the usual way
    before = held.detach().clone()
    RoundGPTQ(calib(), hessian_bytes=8 * 32 ** 2, in_place=True)(gm)
    assert compacted == [(32, 64)] and torch.equal(held, before)
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in gm.state_dict().items())


def test_a_weight_rounded_in_column_groups_ends_its_chunk():
    chunks = []

    class Recording(RoundGPTQ):
        def _hessians(self, gm, chunk, front):
            chunks.append([(u[1], u[2]) for u in chunk])
            return super()._hessians(gm, chunk, front)

    class ThreeLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    _, gm = traced(ThreeLinears().eval())
    SelectSchemes(SelectOptions())(gm)
    Recording(calib(), hessian_bytes=4 * 4 * 16 ** 2)(gm)  # 16-column blocks; three and a copy fit one chunk
    # fc1's two groups, then fc2's: the next weight's first group never shares a forward with them
    assert chunks == [[(0, 16), (16, 32)]] * 3


def test_each_row_slice_codes_go_straight_into_the_weights_codes(monkeypatch):
    _, whole = traced(TwoLinears(d=32, h=64).eval())
    SelectSchemes(SelectOptions())(whole)
    RoundGPTQ(calib(), hessian_bytes=8 * 32 ** 2)(whole)  # fc2 in two column groups
    calls, weight_rows = [], graph.weight_rows

    def recording(gm, node, fn, slice_elems=1 << 22, cols=None):
        out = weight_rows(gm, node, fn, slice_elems, cols)
        if cols is not None:
            calls.append((slice_elems, [t.numel() for t in out]))
        return out

    monkeypatch.setattr(graph, "weight_rows", recording)
    monkeypatch.setattr(round_gptq, "ROUND_SLICE", 8 * 32)  # 8 rows of a 32-wide group, 16 of a 16-wide one
    _, gm = traced(TwoLinears(d=32, h=64).eval())
    SelectSchemes(SelectOptions())(gm)
    RoundGPTQ(calib(), hessian_bytes=8 * 32 ** 2)(gm)
    # fc1 in one group, fc2 in two: each sliced, and no group's codes assembled beside the weight's
    assert calls == [(8 * 32, [])] * 3
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in gm.state_dict().items())  # rows are independent
