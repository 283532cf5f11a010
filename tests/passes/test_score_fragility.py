"""score_fragility: formulas on hand-set statistics, Spearman against NumPy, and a planted outlier
on a reduced Ideogram 4 that must rank first."""

import numpy as np
import pytest
import torch

import fxquant
from fxquant import meta
from fxquant.models import ideogram4_trajectory, reduced_ideogram4
from fxquant.passes.collect_stats import CollectStats
from fxquant.passes.find_linears import FindLinears
from fxquant.passes.score_fragility import ScoreFragility, spearman
from fxquant.recipe import FragilityScore

from .util import count, traced

# per_step rows: (timestep, max_abs, std, kurtosis); fc1 has the larger tails, fc2 the larger max.
STEPS = {
    "fc1": ((0.1, 2.0, 1.0, 9.0), (0.5, 3.0, 1.0, 7.0), (0.9, 1.0, 1.0, 5.0)),
    "fc2": ((0.1, 4.0, 1.0, 3.0), (0.5, 5.0, 1.0, 3.5), (0.9, 4.5, 1.0, 4.0)),
}


def with_stats(steps=STEPS):
    _, gm = traced()
    for node, rec in meta.records(gm):
        s = steps[rec.name]
        meta.update(node, stats=meta.ActStats(max(x[1] for x in s), 1.0, 0.0, 10, s))
    meta.set_graph_record(gm, meta.GraphRecord(recipe={}))
    return gm


def frag(gm):
    return {r.name: r.fragility for _, r in meta.records(gm)}


@pytest.mark.parametrize("kind, fn", [
    (FragilityScore.KURTOSIS_X_MAXABS, lambda s: np.mean(s[:, 3]) * np.max(s[:, 1])),
    (FragilityScore.KURTOSIS, lambda s: np.mean(s[:, 3])),
    (FragilityScore.MAXABS, lambda s: np.max(s[:, 1])),
])
def test_scores_follow_the_formula(kind, fn):
    gm = with_stats()
    res = ScoreFragility(kind)(gm)
    assert res.modified is False
    f = frag(gm)
    for name, s in STEPS.items():
        assert f[name].score == pytest.approx(fn(np.array(s)))
    ranked = sorted(f, key=lambda n: f[n].rank)
    assert ranked == sorted(STEPS, key=lambda n: -fn(np.array(STEPS[n])))
    assert {x.rank for x in f.values()} == {1, 2}


def test_paper_score_ranks_and_early_late_halves():
    gm = with_stats()
    ScoreFragility("kurtosis_x_maxabs")(gm)
    f = frag(gm)
    # all: fc1 7*3=21, fc2 3.5*5=17.5; early (t=0.1): fc1 18, fc2 12; late (t=0.9): fc1 5, fc2 18
    assert (f["fc1"].rank, f["fc2"].rank) == (1, 2)
    assert (f["fc1"].early_rank, f["fc1"].late_rank) == (1, 2)
    assert meta.graph_record(gm).spearman_rho == pytest.approx(-1.0)


def test_one_timestep_has_no_stability():
    gm = with_stats({k: v[:1] for k, v in STEPS.items()})
    ScoreFragility()(gm)
    assert meta.graph_record(gm).spearman_rho is None
    assert all(f.early_rank is None and f.late_rank is None for f in frag(gm).values())


def test_ties_are_broken_by_name():
    same = ((0.1, 2.0, 1.0, 3.0), (0.9, 2.0, 1.0, 3.0))
    gm = with_stats({"fc1": same, "fc2": same})
    ScoreFragility()(gm)
    assert (frag(gm)["fc1"].rank, frag(gm)["fc2"].rank) == (1, 2)
    assert meta.graph_record(gm).spearman_rho is None  # every linear scores the same


def _np_rankdata(a):
    """Average ranks (1-based) by brute force."""
    a = np.asarray(a, dtype=float)
    return np.array([np.sum(a < v) + (np.sum(a == v) + 1) / 2 for v in a])


@pytest.mark.parametrize("a, b", [
    ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]),
    ([0.3, 0.1, 0.2, 0.2, 0.9, 0.5], [1, 3, 2, 2, 8, 4]),
    (list(np.random.default_rng(0).normal(size=30)), list(np.random.default_rng(1).normal(size=30))),
])
def test_spearman_matches_numpy(a, b):
    ref = np.corrcoef(_np_rankdata(a), _np_rankdata(b))[0, 1]
    assert spearman(a, b) == pytest.approx(ref, abs=1e-12)


def test_needs_stats():
    _, gm = traced()
    with pytest.raises(fxquant.PassError, match="lack 'stats'.*collect_stats"):
        ScoreFragility()(gm)


def test_unknown_kind_is_an_error():
    with pytest.raises(fxquant.RecipeError, match="fragility_score"):
        ScoreFragility("variance")


# ---- reduced Ideogram 4 with planted outlier channels

def analysed(model, calib, gm=None):
    if gm is None:
        gm = fxquant.trace.trace(model, calib[0])
        FindLinears()(gm)
    CollectStats(calib)(gm)
    ScoreFragility()(gm)
    assert count(gm, torch.ops.aten.linear.default) == 23
    return {r.name: r.fragility for _, r in meta.records(gm)}, meta.graph_record(gm), gm


def planted(target, source, channels=(5, 17), gain=40.0):
    """A reduced Ideogram 4 whose ``source`` linear emits outlier channels into ``target``'s input."""
    model = reduced_ideogram4(seed=3, num_layers=2)
    w = model.get_submodule(source).weight
    with torch.no_grad():
        w[list(channels)] *= gain
    return model


@pytest.fixture(scope="module")
def calib_and_base():
    calib = ideogram4_trajectory(steps=4, seed=5, batch=1, text_len=4, image_hw=(3, 3))
    return calib, analysed(reduced_ideogram4(seed=3, num_layers=2), calib)


@pytest.mark.slow
@pytest.mark.parametrize("target, source", [
    ("layers.0.attention.to_out.0", "layers.0.attention.to_v"),  # input = attention-weighted V
    ("layers.1.feed_forward.w2", "layers.1.feed_forward.w3"),  # input = silu(w1 x) * w3 x
])
def test_planted_outliers_rank_first(calib_and_base, target, source):
    calib, (base, _, _) = calib_and_base
    assert base[target].rank > 1  # not first without the outliers: the test can fail
    f, g, _ = analysed(planted(target, source), calib)
    assert f[target].rank == 1
    assert f[target].early_rank == 1 and f[target].late_rank == 1
    assert g.spearman_rho is not None and g.spearman_rho > 0.5


@pytest.mark.slow
def test_ranking_is_deterministic(calib_and_base):
    calib, (base, g, gm) = calib_and_base
    rho = g.spearman_rho
    again, g2, _ = analysed(None, calib, gm)  # the passes again, from scratch, on the same graph
    assert again == base and g2.spearman_rho == rho  # same scores and ranks, bit for bit
