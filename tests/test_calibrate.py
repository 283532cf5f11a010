"""record_inputs: calibration inputs recorded from an ordinary denoising loop, per CFG branch."""

import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.models import ideogram4_inputs, reduced_ideogram4


class Velocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, latents, timestep, scale=1.0):
        return self.proj(latents) * timestep[:, None, None] * scale


def loop(model, steps=5, latents=None):
    """Euler steps that update ``latents`` in place after each call, as samplers do."""
    latents = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) if latents is None else latents
    for i in range(steps):
        t = torch.full((2,), i / steps)
        with torch.no_grad():
            latents += 0.1 * model(latents, timestep=t)  # positional and keyword arguments mixed
    return latents


def test_records_keyword_dicts_cloned_on_cpu():
    model = Velocity()
    with fxquant.record_inputs(model, max_items=16) as rec:
        first = torch.randn(2, 3, 4)
        kept = first.clone()
        loop(model, latents=first)
    assert len(rec) == 5 and rec.calls == 5
    assert all(set(item) == {"latents", "timestep"} for item in rec)
    assert torch.equal(rec[0]["latents"], kept)  # cloned: the in-place update did not reach it
    assert rec[0]["latents"] is not first and rec[0]["latents"].device.type == "cpu"
    assert rec.timesteps == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    # the hook is gone after the block
    model(torch.randn(2, 3, 4), torch.zeros(2))
    assert rec.calls == 5 and not model._forward_pre_hooks


def test_max_items_keeps_an_even_spread():
    model = Velocity()
    with fxquant.record_inputs(model, max_items=8) as rec:
        loop(model, steps=50)
    assert rec.calls == 50 and rec.stride == 8
    assert rec.timesteps == pytest.approx([i / 50 for i in range(0, 50, 8)])


def test_bad_arguments():
    with pytest.raises(fxquant.CalibrationError, match="max_items must be an integer >= 1"):
        fxquant.record_inputs(Velocity(), max_items=0)
    with pytest.raises(fxquant.CalibrationError, match="expected an nn.Module"):
        fxquant.record_inputs(lambda x: x)


def test_recorder_is_usable_as_calibration():
    model = Velocity()
    with fxquant.record_inputs(model) as rec:
        loop(model, steps=4)
    gm = fxquant.compile(model, fxquant.Recipe(protect_top_k=1), calibration=rec)
    (rec0,) = [r for _, r in meta.records(gm)]
    assert rec0.stats.count == 4 * 24 and len(rec0.stats.per_step) == 4
    assert meta.graph_record(gm).timesteps == pytest.approx(rec.timesteps)
    x = dict(latents=torch.randn(2, 3, 4), timestep=torch.full((2,), 0.5))
    assert torch.allclose(gm(**x), model(**x))  # protected (top-1 of 1): still float


@pytest.mark.slow
def test_cfg_branches_get_the_inputs_they_see():
    """Asymmetric CFG as in the Ideogram 4 pipeline: two transformers, text features only in cond."""
    cond, uncond = reduced_ideogram4(seed=1, num_layers=1), reduced_ideogram4(seed=1, num_layers=1)  # same weights
    kw = dict(batch=1, text_len=4, image_hw=(3, 3))
    base = ideogram4_inputs(seed=0, **kw)
    with fxquant.record_inputs(cond) as rec_c, fxquant.record_inputs(uncond) as rec_u:
        latents = base["hidden_states"].clone()
        for t in (0.2, 0.5, 0.8):
            step = dict(base, hidden_states=latents, timestep=torch.full((1,), t))
            with torch.no_grad():
                v_c = cond(**step).sample
                v_u = uncond(**dict(step, encoder_hidden_states=torch.zeros_like(base["encoder_hidden_states"]))).sample
            latents += 0.3 * (2.0 * v_c - v_u)
    assert len(rec_c) == len(rec_u) == 3
    assert rec_c.timesteps == rec_u.timesteps == pytest.approx([0.2, 0.5, 0.8])
    recipe = fxquant.Recipe(protect_top_k=2)
    gms = fxquant.compile({"cond": cond, "uncond": uncond}, recipe, calibration={"cond": rec_c, "uncond": rec_u})
    stats = {b: {r.name: r.stats for _, r in meta.records(g)} for b, g in gms.items()}
    c, u = stats["cond"]["llm_cond_proj"], stats["uncond"]["llm_cond_proj"]
    assert c.max_abs > 0 and u.max_abs == 0  # the uncond branch never sees text features
    assert stats["cond"]["layers.0.feed_forward.w2"].per_step != stats["uncond"]["layers.0.feed_forward.w2"].per_step
    # Same weights and the same recorded inputs give the same statistics (the difference is the inputs).
    again = fxquant.compile(uncond, recipe, calibration=rec_u)
    assert {r.name: r.stats for _, r in meta.records(again)} == stats["uncond"]


def test_call_indices_say_which_calls_were_kept():
    from fxquant.calibrate import record_inputs
    m = torch.nn.Linear(4, 4)
    with record_inputs(m, max_items=4) as rec:
        for _ in range(10):
            m(torch.randn(2, 4))
    assert rec.calls == 10 and len(rec) == len(rec.call_indices) <= 4
    assert rec.call_indices == sorted(rec.call_indices) and rec.call_indices[0] == 0
    assert rec.call_indices[-1] >= 6  # spread over the whole run, not its first calls
