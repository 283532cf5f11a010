"""find_linears on   x -> linear(fc1) -> gelu -> linear(fc2)."""

import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.graph import LINEAR
from fxquant.passes.find_linears import FindLinears
from fxquant.trace import trace

from .util import count, traced


def test_records_every_linear_and_leaves_graph_alone():
    m, gm = traced()
    code_before = gm.code
    res = FindLinears()(gm)
    assert res.modified is False and gm.code == code_before
    recs = [r for _, r in meta.records(gm)]
    assert [(r.name, r.in_features, r.out_features, r.has_bias) for r in recs] == [
        ("fc1", 32, 64, True), ("fc2", 64, 32, False)]
    assert count(gm, LINEAR) == 2


def test_record_mirrored_as_json_for_export():
    _, gm = traced()
    node, rec = meta.records(gm)[0]
    assert node.meta["custom"]["fxquant"]["name"] == "fc1"
    del node.meta["fxquant"]  # as after torch.export.save/load
    assert meta.get(node) == rec


def test_no_linear_is_an_error():
    gm = trace(torch.nn.ReLU(), (torch.randn(2, 3),))
    with pytest.raises(fxquant.PassError, match="no aten.linear"):
        FindLinears()(gm)


class Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.fc(x))


def test_module_called_twice_gets_a_record_per_call():
    m = Shared().eval()
    gm = trace(m, (torch.randn(2, 3, 8),))
    FindLinears()(gm)
    assert [(r.name, r.call, r.key) for _, r in meta.records(gm)] == [("fc", 0, "fc"), ("fc", 1, "fc#1")]
    q = fxquant.compile(m, "w8a8-naive", calibration=[(torch.randn(2, 3, 8),)])
    assert [r.name for r in fxquant.summary(q).rows] == ["fc", "fc#1"]
    assert sorted(k for k in q.state_dict() if k.startswith("fc.")) == ["fc.bias", "fc.weight_int8", "fc.weight_scale"]
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert float((q(x) - m(x)).norm() / m(x).norm()) < 0.02


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8, bias=False)
        self.b = torch.nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_are_named_by_their_modules():
    gm = trace(Tied().eval(), (torch.randn(2, 3, 8),))
    FindLinears()(gm)
    assert [r.name for _, r in meta.records(gm)] == ["a", "b"]


class Computed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.nn.functional.linear(self.fc(x), self.w * 2)


def test_linear_with_computed_weight_is_left_alone_and_reported():
    m = Computed().eval()
    gm = fxquant.compile(m, "w8a8-naive", calibration=[(torch.randn(2, 3, 8),)])
    s = fxquant.summary(gm)
    assert [r.name for r in s.rows] == ["fc"]
    assert "1 linear op(s) with computed weights left in float: <root>" in str(s)
    assert count(gm, LINEAR) == 1  # the computed one, untouched
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert float((gm(x) - m(x)).norm() / m(x).norm()) < 0.02
