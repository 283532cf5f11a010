"""End to end: a seeded reduced Ideogram 4, both CFG branches, through fxquant.compile."""

import pytest
import torch

import fxquant
from fxquant.models import ideogram4_inputs, ideogram4_trajectory

from .conftest import rel_err

W8A8 = torch.ops.fxquant.linear_w8a8.default
RECIPE = fxquant.Recipe(name="naive+protect", protect=("layers.*.feed_forward.w2", "t_embedding.mlp_out"))


@pytest.fixture(scope="module")
def compiled(ideogram_pair):
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in ideogram_pair.items()}
    calib = {"cond": ideogram4_trajectory(steps=3, seed=1), "uncond": ideogram4_trajectory(steps=3, seed=2)}
    gms = fxquant.compile(ideogram_pair, RECIPE, calibration=calib)
    return gms, before


def test_one_graph_module_per_branch(compiled, ideogram_pair):
    gms, _ = compiled
    assert set(gms) == {"cond", "uncond"}
    for name, gm in gms.items():
        assert isinstance(gm, torch.fx.GraphModule)
        assert gm.meta["fxquant"].branch == name
        # 2 layers x 8 linears + 7 outside the blocks; w2 x2 and mlp_out protected
        ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is W8A8]
        assert len(ops) == 23 - 3


def test_inputs_are_not_mutated(compiled, ideogram_pair):
    _, before = compiled
    for name, m in ideogram_pair.items():
        after = m.state_dict()
        assert before[name].keys() == after.keys()
        assert all(torch.equal(before[name][k], after[k]) for k in after), name


@pytest.mark.parametrize("batch, text_len, hw", [(2, 6, (4, 4)), (1, 3, (2, 5)), (3, 10, (6, 6))])
def test_other_batch_and_sequence_lengths_track_float(compiled, ideogram_pair, batch, text_len, hw):
    gms, _ = compiled
    for name, gm in gms.items():
        ex = ideogram4_inputs(batch=batch, text_len=text_len, image_hw=hw, seed=123, timestep=0.3)
        with torch.no_grad():
            ref, out = ideogram_pair[name](**ex), gm(**ex)
        assert type(out) is type(ref) and out.sample.shape == ref.sample.shape and out.sample.dtype == ref.sample.dtype
        assert rel_err(out.sample, ref.sample) < 0.03, name


def test_branches_are_distinct(compiled, ideogram_pair):
    gms, _ = compiled
    ex = ideogram4_inputs(batch=2, seed=5)
    with torch.no_grad():
        assert not torch.allclose(gms["cond"](**ex).sample, gms["uncond"](**ex).sample)


def test_state_dict_holds_int8_not_float_copies(compiled, ideogram_pair):
    gm = compiled[0]["cond"]
    sd = gm.state_dict()
    assert "layers.0.attention.to_q.weight" not in sd and sd["layers.0.attention.to_q.weight_int8"].dtype == torch.int8
    assert "layers.0.feed_forward.w2.weight" in sd  # protected
    q_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    f_bytes = sum(v.numel() * v.element_size() for v in ideogram_pair["cond"].state_dict().values())
    assert q_bytes < 0.55 * f_bytes


def test_summary_rows(compiled):
    s = fxquant.summary(compiled[0]["cond"])
    rows = {r.name: r for r in s.rows}
    assert len(rows) == 23
    assert (rows["layers.1.feed_forward.w2"].scheme, rows["layers.1.feed_forward.w2"].kind) == ("float", "protected")
    assert rows["layers.1.feed_forward.w2"].reason == "matches protect rule 'layers.*.feed_forward.w2'"
    assert rows["layers.0.attention.to_q"].scheme == "w8a8"
    assert rows["layers.0.attention.to_q"]["in_features"] == 128
    text = str(s)
    assert "layers.0.attention.to_q" in text and "20 w8a8" in text and "3 protected" in text
    both = fxquant.summary(compiled[0])
    assert {r.branch for r in both.rows} == {"cond", "uncond"} and len(both.rows) == 46


def test_single_module_and_positional_examples(ideogram_pair):
    m = ideogram_pair["cond"]
    ex = ideogram4_inputs(batch=2, seed=3)
    keys = ["hidden_states", "timestep", "encoder_hidden_states", "position_ids", "segment_ids", "indicator"]
    gm = fxquant.compile(m, "w8a8-naive", calibration=[tuple(ex[k] for k in keys)])
    with torch.no_grad():
        out = gm(*[ex[k] for k in keys])
        ref = m(**ex)
    assert rel_err(out.sample, ref.sample) < 0.03


def test_bf16_model_outputs_bf16(ideogram_pair):
    from fxquant.models import reduced_ideogram4
    m = reduced_ideogram4(seed=4, num_layers=1, dtype=torch.bfloat16)
    ex = ideogram4_inputs(batch=2, seed=3, dtype=torch.bfloat16)
    gm = fxquant.compile(m, "w8a8-naive", calibration=[ex])
    with torch.no_grad():
        out, ref = gm(**ex).sample, m(**ex).sample
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.05


@pytest.mark.parametrize("calibration, match", [
    (None, "calibration inputs are required"),
    ([], "calibration is empty"),
    ([3], r"calibration\[0\]: expected a dict"),
    ({"cond": []}, "calibration is a dict but model is a single module"),
])
def test_bad_calibration(ideogram_pair, calibration, match):
    with pytest.raises(fxquant.CalibrationError, match=match):
        fxquant.compile(ideogram_pair["cond"], "w8a8-naive", calibration=calibration)


def test_branch_keys_must_match(ideogram_pair):
    with pytest.raises(fxquant.CalibrationError, match=r"keys \['cond'\] do not match branch keys \['cond', 'uncond'\]"):
        fxquant.compile(ideogram_pair, "w8a8-naive", calibration={"cond": [ideogram4_inputs()]})


def test_lowered_module_reexports_and_runs_under_torch_compile(compiled, ideogram_pair):
    gm = compiled[0]["cond"]
    ex = ideogram4_inputs(batch=2, text_len=5, image_hw=(3, 3), seed=8)
    with torch.no_grad():
        expected = gm(**ex).sample
        ep = torch.export.export(gm, (), ex, strict=False)
        assert any(n.target is W8A8 for n in ep.graph.nodes)
        torch.testing.assert_close(ep.module()(**ex).sample, expected, rtol=0, atol=0)
        compiled_gm = torch.compile(gm, fullgraph=True)
        torch.testing.assert_close(compiled_gm(**ex).sample, expected, rtol=1e-4, atol=1e-4)
