import pytest
import torch

import fxquant
from fxquant import graph
from fxquant.trace import trace


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x).relu()


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on tensor values cannot be traced
            return x
        return -x


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.bad = DataDependent()

    def forward(self, x):
        return self.bad(self.block(x))


def test_linears_named_by_module_path_and_shapes_dynamic():
    m = torch.nn.Sequential(Block(), Block()).eval()
    gm = trace(m, (torch.randn(1, 5, 8),))  # batch 1 is traced as 2 so it stays dynamic
    names = [graph.module_name(n) for n in graph.linear_nodes(gm)]
    assert names == ["0.proj", "1.proj"]
    for shape in [(3, 7, 8), (1, 2, 8), (4, 11, 8)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_untraceable_model_names_the_module():
    with pytest.raises(fxquant.TraceError, match=r"failed in module 'bad'"):
        trace(Outer(), (torch.randn(2, 3, 8),))


def test_trace_does_not_change_training_mode():
    m = Block().train()
    trace(m, (torch.randn(2, 3, 8),))
    assert m.training


def test_caller_keeps_requires_grad_and_per_module_training_flags():
    m = torch.nn.Sequential(Block(), Block()).train()
    m[1].eval()
    gm = trace(m, (torch.randn(2, 3, 8),))
    assert all(p.requires_grad for p in m.parameters())
    assert not any(p.requires_grad for p in gm.parameters())
    assert [x.training for x in m.modules()] == [True, True, True, False, False]
    assert gm.get_parameter("0.proj.weight").data_ptr() == m[0].proj.weight.data_ptr()  # shared, not copied


class WithIds(torch.nn.Module):
    """Like Flux: ``ids`` has no batch dim (its dim 0 is the sequence)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.pos = torch.nn.Linear(3, 8)

    def forward(self, x, ids):
        return self.proj(x) + self.pos(ids)


def test_batch_one_example_with_unbatched_inputs_stays_dynamic():
    m = WithIds().eval()
    gm = trace(m, (torch.randn(1, 5, 8), torch.randn(5, 3)))
    for b, l in [(1, 5), (3, 7)]:
        x, ids = torch.randn(b, l, 8), torch.randn(l, 3)
        torch.testing.assert_close(gm(x, ids), m(x, ids), rtol=0, atol=0)


class PinsBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("per_sample", torch.randn(2, 1, 8))

    def forward(self, x):
        return self.proj(x) + self.per_sample  # broadcasting pins the batch to 2


def test_model_that_pins_the_repeated_batch_is_an_error():
    with pytest.raises(fxquant.TraceError, match=r"input 'x': the model pins its dim 0 \(batch\)"):
        trace(PinsBatch().eval(), (torch.randn(1, 4, 8),))
