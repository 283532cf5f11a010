"""The protection ladder: output error against the float model as more fragile linears stay float.

    trace -> find_linears -> collect_stats -> score_fragility -> score_sensitivity      (once)
    for k in ks:  deepcopy -> select_schemes(top k by ``by``) -> [fold_smoothing] -> [round_gptq] -> lower
                  -> relative error vs the float model on held-out inputs

The passes are the pipeline's own (`fxquant.pipeline.build`), its analysis phase once, then its
decide and rewrite phases per k; the
calibration statistics are computed once and never per k. ``k`` here is a literal count (no
scaling by ``protect_reference_linears``); the recipe's explicit ``protect`` rules still apply
at every k, so the curve is the recipe's own with a varying top-k.

    error(k) = sqrt( sum_i ||f_k(x_i) - f(x_i)||^2 / sum_i ||f(x_i)||^2 )

over every floating-point tensor of every output, pooled over the evaluation inputs ``x_i``.
`Ladder.knee` finds where adding protection stops paying (see there). Both rankings are computed
once (the paper's fragility score and the measured sensitivity, `score_sensitivity`); ``by`` picks
the one the ladder climbs, and `Ladder.spearman_rankings` says how much they agree. Each point
holds the bytes of linear weights kept in float and their share of all linear weight bytes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import graph, meta, pipeline
from .errors import CalibrationError, RecipeError
from .passes.score_fragility import spearman
from .recipe import ProtectBy, Recipe, _enum, resolve
from .schemes import Scheme, SelectionKind
from .trace import as_args_kwargs, check_calibration, trace



@dataclass(frozen=True)
class LadderPoint:
    k: int  # top-k by fragility kept in float (literal)
    protected: tuple[str, ...]  # every linear left in float at this k (top-k and protect rules)
    rel_error: float  # pooled relative L2 error vs the float model
    max_rel_error: float  # the worst single evaluation input
    weight_bytes: int  # all linear weights after lowering
    float_bytes: int = 0  # the linear weights kept in float
    float_fraction: float = 0.0  # float_bytes over the bytes of all linear weights before lowering

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "protected": list(self.protected), "rel_error": self.rel_error,
                "max_rel_error": self.max_rel_error, "weight_bytes": self.weight_bytes,
                "float_bytes": self.float_bytes, "float_fraction": self.float_fraction}


@dataclass(frozen=True)
class Ladder:
    """The curve, one point per k in increasing k, and the ranking it was built on."""

    recipe: str
    num_linears: int
    points: tuple[LadderPoint, ...]
    ranking: tuple[str, ...]  # linear names, most fragile first
    spearman_rho: Optional[float] = None
    num_evaluation: int = 0
    by: str = "fragility"  # the ranking the ladder climbs
    ranking_sensitivity: tuple[str, ...] = ()  # linear names, most sensitive first
    spearman_rankings: Optional[float] = None  # Spearman of the sensitivity and fragility scores
    analysed: Optional[fx.GraphModule] = field(default=None, compare=False, repr=False)  # stats + fragility, not lowered

    def knee(self) -> Optional[int]:
        """The k after which extra protection stops paying, or None with fewer than 3 points.

        Kneedle on the normalised curve: x = (k - k_min) / (k_max - k_min),
        y = (e(k_min) - e(k)) / (e(k_min) - e_min), the knee maximises y - x (the point
        farthest above the diagonal). A flat curve, or one never above the diagonal (error
        falling no faster than linearly in k), has no knee.
        """
        pts = self.points
        if len(pts) < 3:
            return None
        k0, k1 = pts[0].k, pts[-1].k
        e0, emin = pts[0].rel_error, min(p.rel_error for p in pts)
        if k1 == k0 or e0 - emin <= 0:
            return None
        gains = [((e0 - p.rel_error) / (e0 - emin) - (p.k - k0) / (k1 - k0), -p.k) for p in pts]
        best = max(range(len(pts)), key=lambda i: gains[i])
        return pts[best].k if gains[best][0] > 0 else None  # nothing above the diagonal: no knee

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "num_linears": self.num_linears, "knee": self.knee(), "by": self.by,
                "spearman_rho": self.spearman_rho, "num_evaluation": self.num_evaluation,
                "ranking": list(self.ranking), "ranking_sensitivity": list(self.ranking_sensitivity),
                "spearman_rankings": self.spearman_rankings, "points": [p.to_json() for p in self.points]}


def _float_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _same_input(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
               for x, y in zip(la, lb))


def _call(fn: Any, item: Any) -> Any:
    args, kwargs = as_args_kwargs(item, "evaluation")
    with torch.no_grad():
        return fn(*args, **kwargs)


def protection_ladder(
    model: torch.nn.Module,
    ks: Sequence[int],
    calibration: Sequence[Any],
    evaluation: Sequence[Any],
    recipe: Recipe | str = "int8-w8a8",
    by: ProtectBy | str = ProtectBy.FRAGILITY,
) -> Ladder:
    """Lower ``model`` with the top-k most fragile linears in float, for each k, and measure.

    Args:
        model: the float transformer (one CFG branch); not modified.
        ks: the k to try (integers >= 0, any order, deduplicated).
        calibration: example inputs for the statistics (as for `fxquant.compile`).
        evaluation: held-out example inputs, none equal to a calibration input.
        recipe: a `Recipe` or preset name; its ``protect_top_k`` is replaced by each k (and its
            float budget dropped: the ladder is top-k).
        by: the ranking k follows, ``"fragility"`` or ``"sensitivity"`` (both are computed).

    Returns:
        A `Ladder` (``.points``, ``.knee()``, ``.to_json()``; ``.analysed`` is the traced graph
        with statistics and fragility, for `fxquant.report`).

    Raises:
        RecipeError: a bad ``ks``, or any error of the recipe itself.
        CalibrationError: empty inputs, or an evaluation input that is also a calibration input.

    Example:
        >>> lad = fxquant.protection_ladder(model, [0, 1, 2, 4, 8], calib, held_out)  # doctest: +SKIP
        >>> [(p.k, round(p.rel_error, 4)) for p in lad.points], lad.knee()  # doctest: +SKIP
    """
    recipe = resolve(recipe)
    by = _enum(ProtectBy, by, "by")
    ks, calibration, evaluation = _check_inputs(ks, calibration, evaluation)
    gm = _analyse(model, recipe, ks, calibration)
    refs = [_float_leaves(_call(model, ev)) for ev in evaluation]
    ref_sq = sum(float(r.double().pow(2).sum()) for leaves in refs for r in leaves)
    elsize = {r.key: graph.weight(gm, n).element_size() for n, r in meta.records(gm)}
    total = sum(r.in_features * r.out_features * elsize[r.key] for _, r in meta.records(gm))
    points = tuple(_point(gm, recipe.replace(protect_top_k=k, protect_by=by, **_FLAT), k, calibration, evaluation,
                          refs, ref_sq, total) for k in ks)
    recs = [r for _, r in meta.records(gm)]
    ranking = tuple(r.name for r in sorted(recs, key=lambda r: r.fragility.rank))
    by_sens, rho = (), None
    if all(r.sensitivity is not None for r in recs):
        by_sens = tuple(r.name for r in sorted(recs, key=lambda r: r.sensitivity.rank))
        rho = spearman([r.sensitivity.error for r in recs], [r.fragility.score for r in recs])
    return Ladder(recipe.name, len(recs), points, ranking,
                  meta.graph_record(gm).spearman_rho, len(evaluation), by.value, by_sens, rho, gm)


_FLAT = dict(protect_reference_linears=0, protect_budget=0.0, protect_budget_bytes=0)  # the ladder is top-k only


def _check_inputs(ks: Sequence[int], calibration: Sequence[Any], evaluation: Sequence[Any]) -> tuple[list[int], list, list]:
    """Sorted unique ``ks`` and the checked inputs; evaluation must be held out from calibration."""
    if isinstance(ks, (str, bytes)) or not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ks):
        raise RecipeError(f"protection_ladder: ks must be a non-empty list of integers >= 0, got {ks!r}")
    calibration = check_calibration(calibration, "calibration")
    evaluation = check_calibration(evaluation, "evaluation")
    for i, ev in enumerate(evaluation):
        for j, cal in enumerate(calibration):
            if ev is cal or _same_input(ev, cal):
                raise CalibrationError(f"protection_ladder: evaluation[{i}] equals calibration[{j}]; the error must "
                                       "be measured on held-out inputs")
    return sorted(set(ks)), calibration, evaluation


def _analyse(model: torch.nn.Module, recipe: Recipe, ks: list[int], calibration: Sequence[Any]) -> fx.GraphModule:
    """The traced graph after the analysis passes (statistics, fragility, sensitivity where W8A8)."""
    # Sensitivity is measured for W8A8 (score_sensitivity); another default has the fragility ranking only.
    both = ProtectBy.SENSITIVITY if recipe.default is Scheme.W8A8 else ProtectBy.FRAGILITY
    analysis_recipe = recipe.replace(protect_top_k=max(1, ks[-1]), protect_by=both, **_FLAT)
    analysis = pipeline.build(analysis_recipe, calibration).only(pipeline.ANALYSIS)
    gm = trace(model, calibration[0])
    meta.set_graph_record(gm, meta.GraphRecord(recipe=recipe.to_dict()))
    with torch.no_grad():
        return analysis(gm)


def _point(gm: fx.GraphModule, recipe: Recipe, k: int, calibration: Sequence[Any], evaluation: Sequence[Any],
           refs: list[list[torch.Tensor]], ref_sq: float, total: int) -> LadderPoint:
    """Lower a copy of the analysed graph with ``recipe`` (top-k protected) and measure it against ``refs``."""
    lowered = pipeline.build(recipe, calibration).only(pipeline.DECIDE, pipeline.REWRITE)(copy.deepcopy(gm))
    err_sq, worst = 0.0, 0.0
    for ev, ref in zip(evaluation, refs):
        out = _float_leaves(_call(lowered, ev))
        e = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
        err_sq += e
        worst = max(worst, math.sqrt(e / max(sum(float(r.double().pow(2).sum()) for r in ref), 1e-300)))
    recs = [r for _, r in meta.records(lowered)]
    kept = sum(r.lowering.weight_bytes for r in recs if r.lowering is not None and r.lowering.scheme is Scheme.FLOAT)
    return LadderPoint(
        k=k, protected=tuple(r.name for r in recs if r.selection.kind is not SelectionKind.QUANTIZE),
        rel_error=math.sqrt(err_sq / max(ref_sq, 1e-300)), max_rel_error=worst,
        weight_bytes=sum(r.lowering.weight_bytes for r in recs if r.lowering is not None),
        float_bytes=kept, float_fraction=kept / max(total, 1))
