"""find_linears on   x -> linear(fc1) -> gelu -> linear(fc2)."""

import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.graph import LINEAR
from fxquant.passes.find_linears import FindLinears
from fxquant.trace import trace

from .util import TwoLinears, count, traced


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


def test_shared_linear_is_rejected_by_name():
    gm = trace(Shared(), (torch.randn(2, 3, 8),))
    with pytest.raises(fxquant.PassError, match=r"'fc' is called more than once"):
        FindLinears()(gm)
