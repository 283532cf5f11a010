"""fxquant.frontier: GPTQ's Hessian forwards compute only what their chunk's inputs need and start
from each calibration input's cached settled values; the values (and so the codes) are the ones a
whole forward gives.

    c -> rmsnorm -> proj --+
    x -> fc1 -> relu ------+-> h -> (+ fc2(relu h)) -> g -> fc3
"""

import copy

import pytest
import torch

from fxquant import graph, meta
from fxquant.errors import PassError
from fxquant.frontier import Frontier
from fxquant.passes.round_gptq import RoundGPTQ
from fxquant.passes.select_schemes import SelectOptions, SelectSchemes

from .passes.util import traced


class TwoPaths(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(i, 32) for i in (48, 32, 32, 32))

    def forward(self, x, c):
        t = self.proj(c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6))
        h = torch.relu(self.fc1(x)) + t
        g = h + self.fc2(torch.relu(h))
        return self.fc3(torch.relu(g))


def setup(items=3):
    gen = torch.Generator().manual_seed(1)
    cal = [(torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, 48, generator=gen)) for _ in range(items)]
    m = TwoPaths().eval()
    gm = graph_of(m, cal[0])
    return m, gm, cal


def graph_of(m, example):
    from fxquant.passes.find_linears import FindLinears
    from fxquant.trace import trace

    gm = trace(m, example)
    FindLinears()(gm)
    return gm


def linear(gm, name):
    return next(n for n, r in meta.records(gm) if r.name == name)


@pytest.mark.parametrize("hessian_bytes,chunks", [
    (8 * 32 ** 2, 4),  # one linear a chunk: proj (its 2 column groups), fc1, fc2, fc3
    (12 * 48 ** 2, 2),  # proj, fc1 and fc2 in one chunk (its forwards run fc1 unrounded), then fc3
])
def test_the_codes_are_the_same_with_and_without_the_cache_and_cached_forwards_compute_less(hessian_bytes, chunks):
    m, gm, cal = setup()
    SelectSchemes(SelectOptions())(gm)
    runs = {}
    for fb in (0, 1 << 20):
        g = copy.deepcopy(gm)
        p = RoundGPTQ(cal, hessian_bytes=hessian_bytes, frontier_bytes=fb)
        p(g)
        runs[fb] = (p, g.state_dict(), g(*cal[0]))
    (p0, sd0, y0), (p1, sd1, y1) = runs[0], runs[1 << 20]
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert torch.equal(y0, y1)
    assert p0.forwards == p1.forwards == chunks * len(cal)
    assert p0.cached == 0 and p1.cached > 0 and p1.frontier_peak > 0
    assert p1.computed < p0.computed


def test_a_forward_runs_only_what_its_inputs_need_and_caches_what_later_forwards_read():
    m, gm, cal = setup(items=1)
    fc1, fc2, fc3, proj = (linear(gm, n) for n in ("fc1", "fc2", "fc3", "proj"))
    front = Frontier(gm, 1, budget=1 << 20)
    watch = graph.Watch(gm, set(), None, by_rows=True)
    args = graph.graph_inputs(gm, cal[0], "calibration[0]", "test")
    got = {}
    x, c = cal[0]

    front.settle({fc1, fc2, fc3, proj})  # nothing rounded: only the norm of c is settled
    front.run(watch, 0, args, {fc1.args[0]}, got.__setitem__)
    assert front.computed == 0  # x goes to fc1 as it is: the text path is not run
    assert front.cache[0] is None  # no settled value computed

    front.settle({fc2, fc3})  # proj and fc1 rounded (here: left as they are)
    front.run(watch, 0, args, {fc2.args[0]}, got.__setitem__)
    with torch.no_grad():
        h = torch.relu(m.fc1(x)) + m.proj(c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.allclose(got[fc2.args[0]], torch.relu(h))
    cached = list(front.cache[0].values())  # h (read by fc2's path and by g) and relu(h) (fc2's input)
    assert len(cached) == 2 and torch.allclose(cached[0], h) and torch.equal(cached[1], torch.relu(cached[0]))
    assert front.bytes() == 2 * h.numel() * 4
    before = front.computed

    front.settle({fc3})
    front.run(watch, 0, args, {fc3.args[0]}, got.__setitem__)
    with torch.no_grad():
        want = torch.relu(h + m.fc2(torch.relu(h)))
    assert front.started == 1 and torch.equal(got[fc3.args[0]], want)
    assert front.computed - before == 3  # fc2, add, relu: from h and relu(h), not from the inputs
    assert [torch.equal(v, got[fc3.args[0]]) for v in front.cache[0].values()] == [True]  # now fc3's input alone


def reference(m, x, c):
    """(proj's input, h, fc3's input) of TwoPaths, computed by hand."""
    with torch.no_grad():
        s = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = torch.relu(m.fc1(x)) + m.proj(s)
        return s, h, torch.relu(h + m.fc2(torch.relu(h)))


def test_a_cache_keeps_what_fits_and_what_the_values_left_out_are_computed_from():
    m, gm, cal = setup(items=2)
    proj, fc1, fc2, fc3 = (linear(gm, n) for n in ("proj", "fc1", "fc2", "fc3"))
    s_bytes, h_bytes = 2 * 5 * 48 * 4, 2 * 5 * 32 * 4

    def forward(front, pending, wanted, items=2):
        front.settle(pending)
        got = []
        for i in range(items):
            args = graph.graph_inputs(gm, cal[i], "c", "test")
            front.run(graph.Watch(gm, set(), None, by_rows=True), i, args, {wanted.args[0]}, lambda n, v: got.append(v))
        return got

    def check(got):
        for (x, c), v in zip(cal, got):
            assert torch.allclose(v, reference(m, x, c)[2], atol=1e-6)

    front = Frontier(gm, 2, budget=2 * s_bytes + 2 * h_bytes)
    forward(front, {proj, fc1, fc2, fc3}, proj)  # each caches proj's input s
    assert [list(c.values())[0].shape[-1] for c in front.cache] == [48, 48] and front.bytes() == 2 * s_bytes
    forward(front, {fc2, fc3}, fc2)
    # input 0: beside its old s and input 1's s, proj's and fc1's outputs fit, h and relu(h) (what fc2
    # and g read) do not; it keeps what they are computed from, and drops s, which nothing needs now
    x0 = cal[0][0]
    kept = list(front.cache[0].values())
    assert [n.target for n in front.cache[0]] == [torch.ops.aten.linear.default] * 2 and front.sizes[0] == 2 * h_bytes
    assert torch.allclose(kept[1], m.fc1(x0).detach(), atol=1e-6)
    assert front.left_out == 4 and front.bytes() <= 2 * s_bytes + 2 * h_bytes  # h and relu(h) of each input
    check(forward(front, {fc3}, fc3))
    assert front.started == 4  # every forward after the first round started from a cache

    front = Frontier(gm, 2, budget=s_bytes)  # s is larger than an input's share: each keeps the small
    forward(front, {proj, fc1, fc2, fc3}, proj)  # rsqrt(mean(c ** 2) + eps) that s is computed from
    assert [[n.target for n in c] for c in front.cache] == [[torch.ops.aten.rsqrt.default]] * 2
    check(forward(front, {fc3}, fc3))
    assert front.started == 2

    front = Frontier(gm, 1, budget=s_bytes + h_bytes - 1)  # s, but not s and h
    forward(front, {proj, fc1, fc2, fc3}, proj, items=1)  # c ** 2 comes first and fills the budget: s is
    assert [n.target for n in front.cache[0]] == [torch.ops.aten.rsqrt.default]  # left out (values in graph order)
    forward(front, {fc2, fc3}, fc2, items=1)  # s fits now, neither h nor relu(h) beside it: s stays
    assert [v.shape[-1] for v in front.cache[0].values()] == [48] and front.left_out == 3
    before = front.computed
    check(forward(front, {fc3}, fc3, items=1))
    none = Frontier(gm, 1, budget=0)
    forward(none, {fc3}, fc3, items=1)
    assert front.started == 2 and front.computed - before == none.computed - 5  # not s = c * rsqrt(mean(c ** 2) + eps)


def test_frontier_bytes_must_be_a_non_negative_integer():
    _, gm = traced()
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(PassError, match="round_gptq: frontier_bytes must be an integer >= 0 or None"):
            RoundGPTQ([(torch.randn(2, 5, 32),)], frontier_bytes=bad)


def test_a_weight_that_becomes_pending_again_is_refused():
    _, gm, _ = setup(items=1)
    fc1, fc2, fc3 = (linear(gm, n) for n in ("fc1", "fc2", "fc3"))
    front = Frontier(gm, 1, budget=1 << 20)
    front.settle({fc2, fc3})
    with pytest.raises(PassError, match="frontier: a node settled before reads a weight still to be rounded"):
        front.settle({fc1, fc2, fc3})
