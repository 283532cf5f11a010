"""compile never holds a second float copy, and shares no tensor with the source model.

- fold_smoothing leaves ``fxquant::scale_param`` ops over the original weights; the lowering
  computes the effective weight a slice of rows at a time (`graph.weight_rows`), bit-identical
  to computing it whole; ``replace_node`` drops each float weight it replaced at once.
- Default: after compile, in-place changes to the source (an optimizer step, fuse_lora-style
  edits of biases, norm gains, protected linears) do not reach the compiled module.
- ``consume=True``: the source is emptied to meta tensors right after tracing, so the compiled
  module owns the weights (each freed once lowered); its outputs equal the default compile's.
"""

import mmap
import sys

import pytest
import torch
import torch.fx as fx

import fxquant
from fxquant import graph, meta
from fxquant.models import ideogram4_trajectory, reduced_ideogram4
from fxquant.ops.fold import scale_region
from fxquant.ops.w8a8 import quantize_weight_per_channel
from fxquant.ownership import _storage

SCALE = torch.ops.fxquant.scale_param.default


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(24, 40)

    def forward(self, x):
        return self.fc(x)


def _chained(dtype=torch.bfloat16, cols=(0, 24)):
    """A linear whose weight is read through a row fold (rows 8..31) and a column scaling (of ``cols``)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Lin()).to(dtype)
    g = gm.graph
    lin = next(n for n in g.nodes if n.op == "call_module")
    x = lin.args[0]
    with g.inserting_before(lin):
        w = g.get_attr("fc.weight")
        b = g.get_attr("fc.bias")
        s_rows, s_cols = g.get_attr("s_rows"), g.get_attr("s_cols")
        rows = g.call_function(SCALE, (w, s_rows, [0], 8, 0.0, True))
        scaled = g.call_function(SCALE, (rows, s_cols, [1], cols[0], 0.0, False))
        new = g.call_function(graph.LINEAR, (x, scaled, b))
    lin.replace_all_uses_with(new)
    g.erase_node(lin)
    gm.register_buffer("s_rows", torch.rand(24) + 0.5)
    gm.register_buffer("s_cols", torch.rand(cols[1] - cols[0]) * 4 + 0.1)
    gm.recompile()
    return gm, new


def test_weight_rows_is_bit_identical_to_the_whole_effective_weight():
    gm, node = _chained()
    p = gm.fc.weight
    whole = scale_region(scale_region(p, gm.s_rows, [0], 8, 0.0, True), gm.s_cols, [1], 0, 0.0, False)
    assert torch.equal(graph.weight(gm, node), whole)
    for elems in (24, 24 * 7, 1 << 22):  # one row, 7 rows (slices straddle the fold's region), all
        q, s = graph.weight_rows(gm, node, quantize_weight_per_channel, slice_elems=elems)
        q0, s0 = quantize_weight_per_channel(whole)
        assert torch.equal(q, q0) and torch.equal(s, s0)
        (rows,) = graph.weight_rows(gm, node, lambda r: (r.clone(),), slice_elems=elems)
        assert torch.equal(rows, whole)
    assert torch.equal(graph.root_weight(gm, node), p)  # the parameter itself, untouched


def test_weight_rows_of_a_column_window_are_those_columns_of_the_effective_weight():
    gm, node = _chained(cols=(6, 18))  # the column fold covers columns 6..17 only
    whole = graph.weight(gm, node)
    seen = []
    for a, b in ((0, 5), (3, 10), (6, 18), (10, 24), (18, 24), (0, 24)):
        for elems in (1, 7 * (b - a), 1 << 22):
            def fn(r):
                seen.append(r.shape)
                return (r.clone(),)
            (got,) = graph.weight_rows(gm, node, fn, slice_elems=elems, cols=(a, b))
            assert torch.equal(got, whole[:, a:b]), (a, b, elems)
    assert (7, 7) in seen  # a slice holds as many rows as fit in the window's width, not the row's


def test_watch_by_rows_never_computes_a_folded_weight_and_gives_the_same_outputs():
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        gm, node = _chained(dtype)
        x = torch.randn(3, 5, 24).to(dtype)
        seen = {}
        whole = graph.Watch(gm, {node}, lambda n, v: seen.setdefault("whole", v)).run(x)
        lean = graph.Watch(gm, {node}, lambda n, v: seen.setdefault("rows", v), by_rows=True)
        chain = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is SCALE}
        assert lean.by_rows == {node} and lean.skipped == chain
        env_seen = []
        orig = fx.Interpreter.run_node
        fx.Interpreter.run_node = lambda self, n: env_seen.append(n) or orig(self, n)
        try:
            out = lean.run(x)
        finally:
            fx.Interpreter.run_node = orig
        assert not chain & set(env_seen) and node not in env_seen  # the chain is never computed, the linear by rows
        torch.testing.assert_close(out, whole, rtol=tol, atol=tol)
        assert seen["rows"] is out


def test_replace_node_drops_the_weight_and_its_fold_chain():
    gm, node = _chained()
    q, s = graph.weight_rows(gm, node, quantize_weight_per_channel)
    gm.register_buffer("q", q)
    gm.register_buffer("scale", s)
    x = node.args[0]
    with gm.graph.inserting_before(node):
        args = (x, gm.graph.get_attr("q"), gm.graph.get_attr("scale"), node.args[2], None)
    graph.replace_node(gm, node, torch.ops.fxquant.linear_w8a8.default, args)
    names = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert "fc.weight" not in names and "s_rows" not in names and "s_cols" not in names
    assert "fc.bias" in names  # still read by the new node
    assert not [n for n in gm.graph.nodes if n.target is SCALE]


def _model_and_items():
    model = reduced_ideogram4(seed=2, num_layers=2)
    return model, ideogram4_trajectory(steps=3, seed=4, batch=2, text_len=6, image_hw=(3, 4))


RECIPE = fxquant.Recipe.preset("int8-w8a8").replace(protect=(fxquant.LayerRule("layers.1.feed_forward.w2"),))


def test_compiled_module_shares_nothing_with_the_source():
    model, items = _model_and_items()
    gm = fxquant.compile(model, RECIPE, calibration=items)
    rows = {r.name: r for r in fxquant.summary(gm).rows}
    assert rows["layers.1.feed_forward.w2"].kind == "protected"
    source = {_storage(t) for t in list(model.parameters()) + list(model.buffers())}
    assert not source & {_storage(t) for t in list(gm.parameters()) + list(gm.buffers())}
    with torch.no_grad():
        before = gm(**items[1])
        for p in model.parameters():  # an optimizer step / fuse_lora: every tensor changes in place
            p.add_(0.5 * torch.randn_like(p))
        model.layers[1].feed_forward.w2.weight.mul_(3.0)
        after = gm(**items[1])
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("hessian_bytes", [0, 200_000])  # default: one group a weight; small: w2 and others in groups
def test_consume_takes_the_weights_and_gives_the_same_module(monkeypatch, hessian_bytes):
    from fxquant.passes import round_gptq

    compacted = []
    compact = round_gptq._compact
    monkeypatch.setattr(round_gptq, "_compact", lambda w: compacted.append(w.shape) or compact(w))
    recipe = RECIPE.replace(gptq_hessian_bytes=hessian_bytes)
    model, items = _model_and_items()
    reference = fxquant.compile(model, recipe, calibration=items)
    assert compacted == []  # shared weights: never written
    gm = fxquant.compile(model, recipe, calibration=items, consume=True)
    # owned weights: GPTQ wrote each one's codes into its own memory (RoundGPTQ in_place), same codes
    assert len(compacted) == sum(r.scheme == "w8a8" for r in fxquant.summary(gm).rows) > 0
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in gm.state_dict().items())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    assert all(t.device.type == "cpu" for t in list(gm.parameters()) + list(gm.buffers()))
    assert {k: tuple(v.shape) for k, v in gm.state_dict().items()} == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(gm(**items[1]), reference(**items[1]), rtol=0, atol=0)
    assert [r.scheme for r in fxquant.summary(gm).rows] == [r.scheme for r in fxquant.summary(reference).rows]


def test_no_scale_param_and_no_group_vector_left_after_compile():
    model, items = _model_and_items()
    gm = fxquant.compile(model, "int8-w8a8", calibration=items)
    assert not [n for n in gm.graph.nodes if n.target is SCALE]
    assert not [k for k in gm.state_dict() if k.endswith(".smooth_vector")]
    assert {r.smoothing.target for _, r in meta.records(gm)} & {"norm", "adaln"}


def test_made_trims_once_every_trim_every_bytes(monkeypatch):
    from fxquant import memory

    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory, "_made", 0)
    monkeypatch.setattr(memory, "TRIM_EVERY", 1000)
    memory.made(600)
    assert calls == []
    memory.made({"a": torch.zeros(50, dtype=torch.float64), "b": [3, "x"]})  # 400 bytes of tensors: 1000 in all
    assert calls == [1] and memory._made == 0
    memory.made(torch.zeros(10))
    assert calls == [1] and memory._made == 40


def test_watch_counts_what_each_node_makes(monkeypatch):
    from fxquant import memory

    seen = []
    monkeypatch.setattr(memory, "made", lambda v: seen.append(v))
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    graph.Watch(gm, set(), lambda n, v: None).run(torch.ones(2, 4))
    assert [tuple(v.shape) for v in seen] == [(2, 3), (2, 3)]  # the linear's and the relu's outputs, not the input


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTNEED) and /proc: Linux")
def test_release_gives_the_pages_of_a_tail_back_and_keeps_the_head():
    from fxquant import memory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE

    t = torch.ones(64 << 20, dtype=torch.uint8)
    before = rss()
    n = memory.release(t[16 << 20:])
    assert n >= (48 << 20) - 2 * mmap.PAGESIZE
    assert before - rss() >= 0.9 * n
    assert bool(t[:16 << 20].all()) and int(t[32 << 20]) == 0  # the head keeps its values; the tail reads zeros
    assert memory.release(t[:10]) == 0  # no whole page inside
