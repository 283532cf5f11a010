"""Streaming calibration (`fxquant.observe`) and record_inputs' memory budget.

observe's hooks on the real diffusers module must give exactly the statistics collect_stats
computes by running the traced graph on the same inputs, and compile from them must give the
same module as compile from the stored inputs.
"""

import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.models import ideogram4_trajectory, reduced_ideogram4
from fxquant.passes.collect_stats import CollectStats
from fxquant.passes.find_linears import FindLinears
from fxquant.trace import trace


def _run(model, items):
    with torch.no_grad():
        for it in items:
            model(**it)


def _stats(gm):
    return {r.key: r.stats for _, r in meta.records(gm)}


@pytest.fixture(scope="module")
def model_and_items():
    model = reduced_ideogram4(seed=3, num_layers=2)
    items = ideogram4_trajectory(steps=4, seed=5, batch=2, text_len=6, image_hw=(3, 4))
    return model, items


def test_hooks_on_the_real_module_give_collect_stats_exactly(model_and_items):
    model, items = model_and_items
    with fxquant.observe(model) as cal:
        _run(model, items)
    assert cal.calls == 4 and cal.samples == {}
    assert len(cal) == 2 and cal.inputs.call_indices == [0, 2]  # keep_inputs=2: spread as record_inputs spreads
    assert torch.equal(cal[0]["hidden_states"], items[0]["hidden_states"])  # the tracing example
    from_graph = CollectStats(items)(FindLinears()(trace(model, items[0])).graph_module).graph_module
    from_hooks = CollectStats(cal)(FindLinears()(trace(model, cal[0])).graph_module).graph_module
    a, b = _stats(from_graph), _stats(from_hooks)
    assert set(a) == set(b) and len(a) > 20
    for key in a:
        assert a[key] == b[key], key  # max_abs, std, kurtosis, count, per_step: exactly
        assert torch.equal(a[key].channel_max_abs, b[key].channel_max_abs), key
    ga, gb = meta.graph_record(from_graph), meta.graph_record(from_hooks)
    assert ga.timesteps == gb.timesteps and ga.num_calibration == gb.num_calibration == 4


def test_compile_from_observed_equals_compile_from_inputs(model_and_items):
    model, items = model_and_items
    with fxquant.observe(model) as cal:
        _run(model, items)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The paper's recipe (fragility ranking, no GPTQ): from statistics alone, so both routes agree exactly.
    recipe = "int8-w8a8-paper"
    gm_items = fxquant.compile(model, recipe, calibration=items)
    gm_cal = fxquant.compile(model, recipe, calibration=cal)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm_cal(**items[1]), gm_items(**items[1]), rtol=0, atol=0)
    assert [str(r) for r in fxquant.summary(gm_cal).rows] == [str(r) for r in fxquant.summary(gm_items).rows]
    # The default preset (sensitivity ranking, GPTQ) re-runs the model on the few kept calls.
    gm_default = fxquant.compile(model, "int8-w8a8", calibration=cal)
    assert {r.kind for r in fxquant.summary(gm_default).rows} >= {"quantize", "protected"}


def test_stride_observes_every_kth_call(model_and_items):
    model, items = model_and_items
    with fxquant.observe(model) as every, fxquant.observe(model, keep_inputs=1) as strided:
        strided.stride = 2
        _run(model, items)
    assert every.calls == 4 and strided.calls == 2 and strided.timesteps == every.timesteps[::2]
    # the strided statistics are those of calls 0 and 2 alone
    with fxquant.observe(model, keep_inputs=1) as two:
        _run(model, items[::2])
    assert set(two.stats.channel) == set(strided.stats.channel) and len(two.stats.channel) > 20
    for key in two.stats.channel:
        a, b = two.stats.result(key), strided.stats.result(key)
        assert a == b and torch.equal(a.channel_max_abs, b.channel_max_abs), key


def test_kept_calls_with_pipeline_arguments_feed_passes_that_rerun(model_and_items):
    """A pipeline calls the model with return_dict / attention_kwargs: the kept calls are re-run by
    sensitivity ranking and GPTQ in the graph's own (tensor-only) form."""
    model, items = model_and_items
    with fxquant.observe(model, keep_inputs=2) as cal:
        with torch.no_grad():
            for it in items:
                model(**it, return_dict=False, attention_kwargs=None)
    gm = fxquant.compile(model, "int8-w8a8", calibration=cal)
    assert "return_dict" in cal[0]  # the user's Observed is not rewritten
    with torch.no_grad():
        out = gm(**items[1], return_dict=False)[0]
        ref = model(**items[1], return_dict=False)[0]
    assert (out - ref).norm() / ref.norm() < 0.05


def test_sample_is_bounded_spread_and_shared_by_readers_of_one_tensor(model_and_items):
    model, items = model_and_items
    many = items * 5  # 20 calls
    with fxquant.observe(model, search_tokens=16) as cal:
        _run(model, many)
    assert cal.calls == 20
    q, k = cal.samples["layers.0.attention.to_q"], cal.samples["layers.0.attention.to_k"]
    assert all(a is b for a, b in zip(q, k))  # one tensor read by q, k, v: one sample
    for key, rows in cal.samples.items():
        assert 1 <= sum(len(r) for r in rows) <= 2 * 16, key
        assert cal.sample(key).shape[0] <= 16
    # thinned as record_inputs thins: kept calls stay spread over the whole run
    assert cal._stride == 4 and len(q) <= 8
    recipe = fxquant.Recipe.preset("int8-w8a8-paper").replace(alpha_search=(0.3, 0.5, 0.7))
    gm = fxquant.compile(model, recipe, calibration=cal)
    assert {r.smoothing.alpha for _, r in meta.records(gm) if r.smoothing.target != "none"} <= {0.3, 0.5, 0.7}


def test_alpha_search_without_sample_names_search_tokens(model_and_items):
    model, items = model_and_items
    with fxquant.observe(model) as cal:
        _run(model, items[:1])
    recipe = fxquant.Recipe.preset("int8-w8a8-paper").replace(alpha_search=(0.3, 0.5))
    with pytest.raises(fxquant.PassError, match="search_tokens"):
        fxquant.compile(model, recipe, calibration=cal)


def test_nan_names_linear_and_call(model_and_items):
    model, items = model_and_items
    bad = dict(items[1])
    bad["hidden_states"] = bad["hidden_states"].clone()
    bad["hidden_states"][0, 0, 0] = float("nan")
    with pytest.raises(fxquant.CalibrationError, match=r"NaN in the input of linear 'input_proj' on call 1"):
        with fxquant.observe(model):
            _run(model, [items[0], bad])
    assert not model._forward_pre_hooks  # removed even on error


def test_no_call_observed_is_an_error(model_and_items):
    model, _ = model_and_items
    with fxquant.observe(model) as cal:
        pass
    with pytest.raises(fxquant.CalibrationError, match="observe saw no call"):
        fxquant.compile(model, "int8-w8a8", calibration=cal)
    with pytest.raises(fxquant.CalibrationError, match="search_tokens"):
        fxquant.observe(model, search_tokens=-1)


def test_record_inputs_budget_names_the_call_and_the_budget(model_and_items):
    model, items = model_and_items
    one = sum(t.numel() * t.element_size() for t in items[0].values())
    with pytest.raises(fxquant.CalibrationError, match=rf"call 2: .*max_bytes={2 * one + 10}.*fxquant.observe"):
        with fxquant.record_inputs(model, max_bytes=2 * one + 10):
            _run(model, items)
    with fxquant.record_inputs(model, max_items=2, max_bytes=3 * one) as rec:  # thinning frees room
        _run(model, items)
    assert len(rec) == 2 and rec.nbytes <= 3 * one
    with pytest.raises(fxquant.CalibrationError, match="max_bytes"):
        fxquant.record_inputs(model, max_bytes=0)
    assert fxquant.calibrate.DEFAULT_MAX_BYTES == 4 << 30
