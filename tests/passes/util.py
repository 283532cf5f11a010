"""Tiny exported graphs for pass-level tests."""

import torch

from fxquant.passes.find_linears import FindLinears
from fxquant.trace import trace


class TwoLinears(torch.nn.Module):
    """x -> fc1 -> gelu -> fc2 (bias-free), with fc1 wide enough to be interesting."""

    def __init__(self, d=32, h=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def traced(module=None, shape=(2, 5, 32)):
    module = module or TwoLinears().eval()
    gm = trace(module, (torch.randn(*shape),))
    FindLinears()(gm)
    return module, gm


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)
