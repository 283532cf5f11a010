"""inline_autocast on a model with a disabled-autocast block (as around Ideogram 4's MRoPE):

    x -> fc ----------------------------------------------> out0
    pos -> float -> [autocast off: outer(pos, freq) @ ...] -> out1

torch.export keeps the block as ``wrap_with_autocast(..., submod, pos)``; the pass puts the
block's ops back between ``_enter_autocast`` / ``_exit_autocast``.
"""

import operator

import pytest
import torch
import torch.fx as fx
from torch._dynamo.testing import CompileCounter

import fxquant
from fxquant.passes.inline_autocast import ENTER_AUTOCAST, EXIT_AUTOCAST, WRAP_WITH_AUTOCAST, InlineAutocast
from fxquant.trace import trace

from .util import count

D = torch.export.Dim.AUTO


class Rope(torch.nn.Module):
    def __init__(self, nested: bool = False, disable: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 8)
        self.register_buffer("freq", torch.rand(4))
        self.nested, self.disable = nested, disable

    def forward(self, x, pos):
        p = pos.float()
        # Positions past 65536 lose their low bits in bfloat16: the block must stay float32.
        with torch.autocast("cpu", enabled=not self.disable):
            f = p.unsqueeze(-1) @ self.freq.unsqueeze(0)
            if self.nested:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    f = f + (f @ f.transpose(-1, -2)).float().mean(-1, keepdim=True)
        return self.fc(x), torch.cos(f)


def inputs(batch=2, length=5):
    return torch.randn(batch, length, 8), 65536 + torch.arange(batch * length).reshape(batch, length)


def exported(model):
    """The module torch.export gives (the region left as a higher-order op), as trace saw it."""
    ep = torch.export.export(model.eval(), inputs(), dynamic_shapes=({0: D, 1: D}, {0: D, 1: D}), strict=False)
    return ep.module()


def test_region_inlined_between_enter_and_exit():
    gm = exported(Rope())
    assert count(gm, WRAP_WITH_AUTOCAST) == 1 and count(gm, ENTER_AUTOCAST) == 0
    res = InlineAutocast()(gm)
    assert res.modified is True
    assert count(gm, WRAP_WITH_AUTOCAST) == 0 and count(gm, operator.getitem) == 0
    assert count(gm, ENTER_AUTOCAST) == 1 and count(gm, EXIT_AUTOCAST) == 1
    order = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    enter, matmul, leave = (order.index(ENTER_AUTOCAST), order.index(torch.ops.aten.matmul.default),
                            order.index(EXIT_AUTOCAST))
    assert enter < matmul < leave
    assert not [name for name, _ in gm.named_children() if name.startswith("submod")]
    matmul_node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.matmul.default)
    assert "val" in matmul_node.meta and matmul_node.meta.get("nn_module_stack")


@pytest.mark.parametrize("ambient", [False, True], ids=["plain", "under-bf16-autocast"])
def test_outputs_bit_identical_to_the_region_with_or_without_ambient_autocast(ambient):
    model = Rope(nested=True)
    before, after = exported(model), InlineAutocast()(exported(model)).graph_module
    x = inputs(batch=3, length=7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=ambient):
        ref, out = before(*x), after(*x)
        eager = model(*x)
    for r, o, e in zip(ref, out, eager):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
        torch.testing.assert_close(o, e, rtol=0, atol=0)


def test_keeps_the_autocast_state_a_plain_inline_would_lose():
    """Dropping enter/exit (a naive inline) changes the result under an ambient autocast."""
    gm = InlineAutocast()(exported(Rope())).graph_module
    naive = InlineAutocast()(exported(Rope())).graph_module
    for n in reversed(list(naive.graph.nodes)):
        if n.target in (EXIT_AUTOCAST, ENTER_AUTOCAST):
            naive.graph.erase_node(n)
    naive.recompile()
    x = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept, lost = gm(*x)[1], naive(*x)[1]
        eager_undisabled = Rope(disable=False).eval()(*x)[1]
    torch.testing.assert_close(lost, eager_undisabled, rtol=0, atol=0)
    assert (kept - lost).abs().max() > 0.1


def test_nested_regions_inlined():
    gm = InlineAutocast()(exported(Rope(nested=True))).graph_module
    assert count(gm, WRAP_WITH_AUTOCAST) == 0
    assert count(gm, ENTER_AUTOCAST) == 2 and count(gm, EXIT_AUTOCAST) == 2
    assert [name for name, _ in gm.named_children()] == ["fc", "_guards_fn"]


def test_graph_without_regions_untouched_and_idempotent():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    gm = exported_plain = torch.export.export(Plain(), (torch.randn(2, 3),)).module()
    code = gm.code
    assert InlineAutocast()(exported_plain).modified is False and gm.code == code
    once = InlineAutocast()(exported(Rope())).graph_module
    code = once.code
    assert InlineAutocast()(once).modified is False and once.code == code


def test_malformed_region_is_an_error():
    g = fx.Graph()
    x = g.placeholder("x")
    hop = g.call_function(WRAP_WITH_AUTOCAST, ("cpu", None, False, None, x, x))
    g.output(hop)
    with pytest.raises(fxquant.PassError, match="inline_autocast: node 'wrap_with_autocast'.*<get_attr body>"):
        InlineAutocast()(fx.GraphModule(torch.nn.Module(), g))


def test_trace_inlines_and_torch_compile_fullgraph_runs_at_new_shapes():
    """Before the pass dynamo refuses the region at the second length; after it, no break."""
    with pytest.raises(torch._dynamo.exc.Unsupported, match="wrap_with_autocast: unexpected freevars"):
        _compile_at_lengths(exported(Rope()), (5, 7))
    gm = trace(Rope().eval(), inputs())
    assert count(gm, WRAP_WITH_AUTOCAST) == 0
    assert _compile_at_lengths(gm, (5, 7, 9)) == 2  # static, then one dynamic graph


def _compile_at_lengths(gm, lengths):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(gm, fullgraph=True, backend=counter)
    for n in lengths:
        x = inputs(length=n)
        for o, r in zip(compiled(*x), gm(*x)):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
    return counter.frame_count
