"""collect_stats on a tiny graph, checked against NumPy over the stored activations.

    x, timestep -> fc1(x + timestep) -> relu -> fc2        (two linears, a timestep argument)
"""

import logging


import numpy as np
import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.passes import collect_stats as cs
from fxquant.passes.collect_stats import CollectStats, Moments
from fxquant.passes.find_linears import FindLinears
from fxquant.trace import trace

from .util import count


class Timed(torch.nn.Module):
    def __init__(self, d=8, h=12):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, 4, bias=False)

    def forward(self, x, timestep):
        return self.fc2(torch.relu(self.fc1(x + timestep[:, None, None])))


def items(ts, seed=0, shape=(2, 5, 8)):
    g = torch.Generator().manual_seed(seed)
    return [dict(x=torch.randn(*shape, generator=g) * (1 + i), timestep=torch.full((shape[0],), t))
            for i, t in enumerate(ts)]


def analysed(model, calib):
    gm = trace(model, calib[0])
    FindLinears()(gm)
    return gm, CollectStats(calib)(gm)


def inputs_of(model, calib):
    """Each linear's input on each calibration item, recorded with plain module hooks."""
    seen = {"fc1": [], "fc2": []}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].double().numpy()))
             for n in seen]
    with torch.no_grad():
        for it in calib:
            model(**it)
    for h in hooks:
        h.remove()
    return seen


def np_stats(arrays):
    x = np.concatenate([a.reshape(-1) for a in arrays])
    d = x - x.mean()
    return np.abs(x).max(), np.sqrt(np.mean(d ** 2)), np.mean(d ** 4) / np.mean(d ** 2) ** 2


def test_stats_equal_numpy_per_step_and_aggregate():
    model = Timed().eval()
    ts = [0.25, 0.5, 0.25, 0.75]  # step 0.25 seen twice: its inputs are pooled
    calib = items(ts)
    gm, res = analysed(model, calib)
    assert res.modified is False
    ref = inputs_of(model, calib)
    recs = {r.name: r for _, r in meta.records(gm)}
    for name, acts in ref.items():
        s = recs[name].stats
        mx, sd, ku = np_stats(acts)
        np.testing.assert_allclose([s.max_abs, s.std, s.kurtosis], [mx, sd, ku], rtol=1e-9)
        assert s.count == sum(a.size for a in acts)
        chan = np.abs(np.concatenate([a.reshape(-1, a.shape[-1]) for a in acts])).max(0)
        assert s.channel_max_abs.dtype == torch.float32 and s.channel_max_abs.shape == (acts[0].shape[-1],)
        np.testing.assert_array_equal(s.channel_max_abs.numpy(), chan.astype(np.float32))
        # per step, in order of first appearance
        assert [p[0] for p in s.per_step] == pytest.approx([0.25, 0.5, 0.75])
        for t, mx_t, sd_t, ku_t in s.per_step:
            sel = [a for a, ti in zip(acts, ts) if ti == pytest.approx(t)]
            np.testing.assert_allclose([mx_t, sd_t, ku_t], np_stats(sel), rtol=1e-9)
    g = meta.graph_record(gm)
    assert g.num_calibration == 4 and g.timesteps == pytest.approx((0.25, 0.5, 0.75))


def test_graph_unchanged():
    model = Timed().eval()
    gm = trace(model, items([0.5])[0])
    FindLinears()(gm)
    before = [(n.op, n.target) for n in gm.graph.nodes]
    CollectStats(items([0.1, 0.9]))(gm)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before
    assert count(gm, torch.ops.aten.linear.default) == 2


def test_moments_merge_is_exact_and_stable():
    g = torch.Generator().manual_seed(1)
    # A large mean over a small spread: raw power sums would cancel catastrophically.
    x = 1e4 + torch.randn(3001, generator=g, dtype=torch.float64) ** 3
    parts = [x[:7], x[7:1000], x[1000:]]
    merged = Moments()
    for p in parts:
        merged = merged.merge(Moments.of(p))
    whole = x.numpy()
    d = whole - whole.mean()
    np.testing.assert_allclose([merged.std, merged.kurtosis],
                               [np.sqrt(np.mean(d ** 2)), np.mean(d ** 4) / np.mean(d ** 2) ** 2], rtol=1e-9)
    assert merged.n == 3001 and merged.max_abs == float(x.abs().max())


def test_chunked_moments_match(monkeypatch):
    monkeypatch.setattr(cs, "CHUNK", 64)  # force several chunks on a small tensor
    x = torch.randn(10, 33, generator=torch.Generator().manual_seed(2))
    d = x.double().numpy().reshape(-1)
    d = d - d.mean()
    assert Moments.of(x).kurtosis == pytest.approx(np.mean(d ** 4) / np.mean(d ** 2) ** 2, rel=1e-9)


def test_constant_input_has_zero_kurtosis():
    m = Moments.of(torch.full((4, 4), 2.0))
    assert (m.std, m.kurtosis, m.max_abs) == (0.0, 0.0, 2.0)


def test_timestep_defaults():
    model = Timed().eval()
    # Per-sample timesteps that differ: the input's step is their mean.
    calib = items([0.0, 0.0])
    calib[0]["timestep"] = torch.tensor([0.2, 0.4])
    calib[1]["timestep"] = torch.tensor([0.8, 0.8])
    gm, _ = analysed(model, calib)
    assert meta.graph_record(gm).timesteps == pytest.approx((0.3, 0.8))
    # No timestep argument: each input's index is its step.
    from .util import TwoLinears
    gm2 = trace(TwoLinears().eval(), (torch.randn(2, 3, 32),))
    FindLinears()(gm2)
    CollectStats([(torch.randn(2, 3, 32),) for _ in range(3)])(gm2)
    assert meta.graph_record(gm2).timesteps == (0.0, 1.0, 2.0)


def test_positional_timestep_is_read():
    model = Timed().eval()
    calib = [(it["x"], it["timestep"]) for it in items([0.1, 0.6])]
    gm, _ = analysed(model, calib)
    assert meta.graph_record(gm).timesteps == pytest.approx((0.1, 0.6))


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_activation_names_layer_and_input(bad, word):
    model = Timed().eval()
    calib = items([0.1, 0.2, 0.3])
    calib[2]["x"] = calib[2]["x"].clone()
    calib[2]["x"][0, 1, 3] = bad
    gm = trace(model, calib[0])
    FindLinears()(gm)
    with pytest.raises(fxquant.CalibrationError, match=rf"{word} in the input of linear 'fc1' on calibration input 2"):
        CollectStats(calib)(gm)


def test_inputs_of_another_form_are_an_error():
    model = Timed().eval()
    calib = items([0.1, 0.2])
    calib[1] = (calib[1]["x"], calib[1]["timestep"])
    gm = trace(model, calib[0])
    FindLinears()(gm)
    with pytest.raises(fxquant.CalibrationError, match=r"calibration\[1\] has 2 positional.*traced on calibration\[0\]"):
        CollectStats(calib)(gm)


def test_empty_calibration_is_an_error():
    with pytest.raises(fxquant.CalibrationError, match="at least one calibration input"):
        CollectStats([])


def test_needs_records():
    gm = trace(Timed().eval(), items([0.5])[0])
    with pytest.raises(fxquant.PassError, match="run find_linears first"):
        CollectStats(items([0.5]))(gm)


def test_progress_goes_to_the_fxquant_logger_never_to_stderr(capsys, caplog):
    model = Timed().eval()
    with caplog.at_level(logging.INFO, logger="fxquant"):
        analysed(model, items([0.1, 0.2]))
    assert capsys.readouterr().err == ""  # the library never writes to the terminal itself
    assert [r.getMessage() for r in caplog.records if r.name == "fxquant"] == [
        "collect_stats: 1/2 calibration inputs", "collect_stats: 2/2 calibration inputs"]


@pytest.mark.parametrize("bad, match", [
    (lambda x: x[..., :16], r"calibration\[1\] does not fit the module traced on calibration\[0\]"),
    (lambda x: x.double(), r"calibration\[1\] does not fit"),
    (lambda x: x[0], r"calibration\[1\] does not fit"),
])
def test_later_calibration_item_of_another_shape_is_a_calibration_error(bad, match):
    from fxquant.passes.collect_stats import CollectStats
    from .util import traced
    _, gm = traced()
    x = torch.randn(2, 5, 32)
    with pytest.raises(fxquant.CalibrationError, match=match) as e:
        CollectStats([(x,), (bad(x),)])(gm)
    assert "traced inputs: " in str(e.value)
