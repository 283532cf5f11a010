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
