"""The int8-w8a8 preset (SmoothQuant + measured-sensitivity protection under a 5 % float budget + GPTQ)
end to end on a reduced Ideogram 4 with planted outliers: below the paper's recipe's error with fewer
float bytes, every record through save / load, and the caller's model untouched."""

import pytest
import torch

import fxquant
from fxquant.models import ideogram4_inputs, ideogram4_trajectory

from .conftest import rel_err
from .test_ladder_report import KW, planted_model

pytestmark = pytest.mark.slow


def test_default_preset_beats_the_paper_recipe_within_its_budget(tmp_path):
    model = planted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = ideogram4_trajectory(steps=4, seed=5, **KW)
    held = [ideogram4_inputs(timestep=t, seed=90 + i, **KW) for i, t in enumerate((0.3, 0.7))]
    gms = {name: fxquant.compile(model, name, calibration=calib) for name in ("int8-w8a8", "int8-w8a8-paper")}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        refs = [model(**ex).sample for ex in held]
        err = {k: sum(rel_err(g(**ex).sample, r) for ex, r in zip(held, refs)) / len(held) for k, g in gms.items()}
    assert err["int8-w8a8"] < err["int8-w8a8-paper"]
    rows = fxquant.summary(gms["int8-w8a8"]).rows
    total = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    kept = sum(r.weight_bytes for r in rows if r.scheme == "float")
    assert 0 < kept <= 0.05 * total
    assert all(r.kind == "protected" and "float budget" in r.reason for r in rows if r.scheme == "float")
    path = tmp_path / "m.safetensors"
    fxquant.save(gms["int8-w8a8"], path)
    loaded = fxquant.load(path)
    assert [(r.name, r.scheme, r.reason) for r in fxquant.summary(loaded).rows] == [(r.name, r.scheme, r.reason) for r in rows]
    recs = [r for _, r in fxquant.meta.records(loaded)]
    assert all(r.sensitivity is not None and r.sensitivity.rank >= 1 for r in recs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held[0]).sample, gms["int8-w8a8"](**held[0]).sample, rtol=0, atol=0)
