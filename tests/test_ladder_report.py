"""protection_ladder and report on a reduced Ideogram 4 with planted, function-preserving outliers.

Planting: rows of a producer (w3, to_v) are multiplied by g and the matching input columns of the
consumer (w2, to_out) divided by g. The float model computes the same function, but the
consumer's input has outlier channels, as in trained DiTs, so per-token int8 of that input
loses the other channels: keeping the consumer in float must pay.
"""

import json

import pytest
import torch

import fxquant
from fxquant.ladder import Ladder, LadderPoint, protection_ladder
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4
from fxquant.report import fed_by, report

from .passes.util import traced

PLANTED = {"layers.0.feed_forward.w2": "layers.0.feed_forward.w3", "layers.1.attention.to_out.0": "layers.1.attention.to_v"}
KW = dict(batch=1, text_len=4, image_hw=(3, 3))


def planted_model(gain=100.0):
    model = reduced_ideogram4(seed=3, num_layers=2)
    with torch.no_grad():
        for consumer, producer in PLANTED.items():
            rows = [3, 11]
            model.get_submodule(producer).weight[rows] *= gain
            model.get_submodule(consumer).weight[:, rows] /= gain
    return model


@pytest.fixture(scope="module")
def setup():
    model = planted_model()
    calib = ideogram4_trajectory(steps=4, seed=5, **KW)
    held_out = [ideogram4_inputs(timestep=t, seed=90 + i, **KW) for i, t in enumerate((0.3, 0.7))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ladder = protection_ladder(model, [3, 0, 1, 2, 23], calib, held_out, recipe=fxquant.Recipe(name="naive"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched
    return model, calib, held_out, ladder


@pytest.mark.slow
def test_ladder_curve(setup):
    _, _, _, lad = setup
    assert [p.k for p in lad.points] == [0, 1, 2, 3, 23] and lad.num_linears == 23
    assert set(lad.ranking[:2]) == set(PLANTED)
    e = {p.k: p.rel_error for p in lad.points}
    assert lad.points[0].protected == ()
    assert set(lad.points[2].protected) == set(PLANTED)
    assert e[2] < 0.6 * e[0]  # protecting the planted pair pays ...
    assert e[3] > 0.8 * e[2]  # ... and the next one much less: the knee
    assert lad.knee() == 2
    assert e[23] < 1e-6  # everything float: the float model itself
    bytes_ = [p.weight_bytes for p in lad.points]
    assert bytes_ == sorted(bytes_) and bytes_[0] < bytes_[-1]
    assert json.loads(json.dumps(lad.to_json()))["knee"] == 2


def test_knee_on_synthetic_curves():
    def lad(errors, ks=None):
        ks = ks or list(range(len(errors)))
        pts = tuple(LadderPoint(k, (), e, e, 0) for k, e in zip(ks, errors))
        return Ladder("r", 10, pts, ())

    assert lad([1.0, 0.2, 0.15, 0.1, 0.05]).knee() == 1
    assert lad([1.0, 0.9, 0.3, 0.25, 0.2], ks=[0, 1, 2, 4, 8]).knee() == 2
    assert lad([1.0, 0.75, 0.5, 0.25, 0.0]).knee() is None  # straight line: no knee
    assert lad([0.5, 0.5, 0.5]).knee() is None
    assert lad([1.0, 0.1]).knee() is None


def test_ladder_input_errors(setup):
    model, calib, _, _ = setup
    with pytest.raises(fxquant.CalibrationError, match=r"evaluation\[1\] equals calibration\[2\]"):
        protection_ladder(model, [0], calib, [ideogram4_inputs(seed=77, **KW), dict(calib[2])])
    with pytest.raises(fxquant.RecipeError, match="ks must be a non-empty list"):
        protection_ladder(model, [], calib, calib)
    with pytest.raises(fxquant.RecipeError, match="ks must be"):
        protection_ladder(model, [1, -2], calib, calib)


def test_fed_by_stops_at_linears():
    _, gm = traced()
    assert fed_by(gm) == {"fc1": [], "fc2": ["fc1"]}


@pytest.mark.slow
def test_report_files_and_summary(setup, tmp_path):
    model, calib, _, lad = setup
    gm = fxquant.compile(model, "int8-w8a8-paper", calibration=calib)
    # the preset's k = 17 of 279 scales to round(17 * 23 / 279) = 1 here, plus the time-embedding output
    text = str(fxquant.summary(gm))
    assert "fragility rank 1 of 23 (top 1)" in text and "matches protect rule 't_embedding.mlp_out'" in text
    out = report(gm, tmp_path / "rep", ladder=lad)
    assert set(out) == {"json", "markdown", "fragility_png", "ladder_png"}
    for key in ("fragility_png", "ladder_png"):
        with open(out[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(open(out["json"]).read())
    rows = {r["name"]: r for r in doc["branches"][""]["linears"]}
    assert len(rows) == 23 and all("fragility" in r and "stats" in r for r in rows.values())
    first = min(rows.values(), key=lambda r: r["fragility"]["rank"])
    assert first["name"] in PLANTED and first["selection"]["kind"] == "protected"
    assert rows["layers.0.feed_forward.w2"]["fed_by"] == ["layers.0.feed_forward.w1", "layers.0.feed_forward.w3"]
    assert doc["branches"][""]["ladder"]["knee"] == 2
    md = open(out["markdown"]).read()
    assert f"| 1 | `{first['name']}` |" in md and "fragility rank 1 of 23 (top 1)" in md
    assert "![ladder](ladder.png)" in md and "knee: k = 2" in md


def test_report_branches(tmp_path):
    from .passes.util import TwoLinears

    calib = [(torch.randn(2, 3, 32),) for _ in range(4)]
    gms = fxquant.compile({"cond": TwoLinears(seed=1).eval(), "uncond": TwoLinears(seed=2).eval()},
                          fxquant.Recipe(protect_top_k=1), calibration={"cond": calib, "uncond": calib[:2]})
    out = report(gms, tmp_path)
    assert {"fragility_png_cond", "fragility_png_uncond", "json", "markdown"} == set(out)
    doc = json.loads(open(out["json"]).read())
    assert doc["branches"]["cond"]["graph"]["num_calibration"] == 4
    assert doc["branches"]["uncond"]["graph"]["num_calibration"] == 2
    assert "## Branch `cond`" in open(out["markdown"]).read()
    with pytest.raises(fxquant.FxquantError, match="ladder as a dict"):
        report(gms, tmp_path, ladder=Ladder("r", 1, (), ()))


def test_report_errors(tmp_path, monkeypatch):
    _, gm = traced()
    for n in gm.graph.nodes:
        n.meta.pop("fxquant", None)
        n.meta.pop("custom", None)
    with pytest.raises(fxquant.FxquantError, match="no fxquant records"):
        report(gm, tmp_path)
    _, gm = traced()
    for rank, (node, _) in enumerate(fxquant.meta.records(gm), 1):  # something to plot
        fxquant.meta.update(node, fragility=fxquant.meta.Fragility(score=1.0 / rank, rank=rank))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(fxquant.FxquantError, match="need matplotlib"):
        report(gm, tmp_path)


def test_report_without_fragility_scores(tmp_path):
    # A recipe that does not rank layers (w8a8-naive) still gets JSON and Markdown, with no fragility plot.
    gm = fxquant.compile(reduced_ideogram4(num_layers=1), "w8a8-naive", calibration=[ideogram4_inputs()])
    out = report(gm, str(tmp_path))
    assert "fragility_png" not in out
    assert "No fragility scores" in open(out["markdown"]).read()
    assert len(json.load(open(out["json"]))["branches"][""]["linears"]) == 15


@pytest.mark.slow
def test_ladder_by_sensitivity_and_report_of_both_rankings(setup, tmp_path):
    model, calib, held_out, lad_f = setup
    lad_s = protection_ladder(model, [0, 1, 2, 23], calib, held_out, recipe=fxquant.Recipe(name="naive"), by="sensitivity")
    assert lad_s.by == "sensitivity" and lad_f.by == "fragility"
    assert lad_s.ranking == lad_f.ranking and sorted(lad_s.ranking_sensitivity) == sorted(lad_f.ranking)
    assert lad_s.spearman_rankings is not None and -1 <= lad_s.spearman_rankings <= 1
    # the points follow the sensitivity ranking; float bytes grow with k, all-float is all of them
    assert lad_s.points[1].protected == lad_s.ranking_sensitivity[:1]
    fb = [p.float_bytes for p in lad_s.points]
    assert fb == sorted(fb) and fb[0] == 0 and lad_s.points[-1].float_fraction == pytest.approx(1.0)
    assert lad_s.points[-1].rel_error < 1e-6 and lad_s.points[1].rel_error < lad_s.points[0].rel_error
    gm = fxquant.compile(model, fxquant.Recipe(name="sens", protect_by="sensitivity", protect_budget=0.05),
                         calibration=calib)
    out = report(gm, tmp_path / "both", ladder=[lad_f, lad_s])
    assert {"sensitivity_png", "ladder_png", "fragility_png"} <= set(out)
    md = open(out["markdown"]).read()
    assert "### By fragility" in md and "### By sensitivity" in md and "Spearman rho of measured sensitivity vs fragility" in md
    assert "float % of linear weights" in md and "sens. rank" in md
    doc = json.loads(open(out["json"]).read())
    assert [x["by"] for x in doc["branches"][""]["ladder"]] == ["fragility", "sensitivity"]
    rows = doc["branches"][""]["linears"]
    assert all("sensitivity" in r for r in rows)
    kept = [r for r in rows if r["selection"]["kind"] == "protected"]
    assert kept and all(r["selection"]["by"] == "budget" for r in kept)
