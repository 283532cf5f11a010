"""The ordered list of passes a recipe implies: the whole pipeline in one visible place.

    find_linears -> [collect_stats -> [score_fragility]] -> select_protected
                 -> [fold_smoothing] -> lower_w8a8 | lower_gguf -> [materialize_folds]

Bracketed passes run only when the recipe needs them: calibration statistics for SmoothQuant
or top-k protection, fragility scores for top-k protection, folding for SmoothQuant.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from .passes.base import FxquantPass
from .passes.collect_stats import CollectStats
from .passes.find_linears import FindLinears
from .passes.fold_smoothing import FoldSmoothing
from .passes.lower_gguf import LowerGGUF
from .passes.lower_w8a8 import LowerW8A8
from .passes.materialize_folds import MaterializeFolds
from .passes.score_fragility import ScoreFragility
from .passes.select_protected import SelectOptions, SelectProtected
from .recipe import Recipe, WeightScheme


def build(recipe: Recipe, calibration: Sequence[Any] | None = None, label: str = "") -> list[FxquantPass]:
    """The passes for ``recipe``, in order. ``calibration`` feeds the passes that observe
    activations; ``label`` (the CFG branch) prefixes their progress line."""
    passes: list[FxquantPass] = [FindLinears()]
    if recipe.needs_calibration:
        passes.append(CollectStats(calibration, label=f"collect_stats {label}".strip()))
        if recipe.protect_top_k > 0:
            passes.append(ScoreFragility(recipe.fragility_score))
    passes.append(SelectProtected(SelectOptions(recipe.protect_top_k, recipe.protect_reference_linears,
                                                recipe.protect, recipe.skip)))
    if recipe.smoothquant:
        passes.append(FoldSmoothing(recipe.alpha, recipe.alpha_search, calibration))
    if recipe.weights is WeightScheme.INT8:
        passes.append(LowerW8A8())
    else:
        passes.append(LowerGGUF(recipe.weights, recipe.misaligned))
    if recipe.smoothquant:
        passes.append(MaterializeFolds())
    return passes


def run(gm: fx.GraphModule, passes: Sequence[FxquantPass]) -> fx.GraphModule:
    for p in passes:
        gm = p(gm).graph_module
    return gm
