"""The ordered list of passes a recipe implies: the whole pipeline in one visible place.

    find_linears -> [collect_stats -> score_fragility] -> select_protected
                 -> [fold_smoothing] -> lower_w8a8 | lower_gguf

Bracketed passes run only when the recipe needs calibration statistics (SmoothQuant,
top-k protection). A recipe that needs a pass fxquant does not have raises
`PassNotAvailableError` naming it, never a partial result.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Sequence

import torch.fx as fx

from .errors import PassNotAvailableError
from .passes.base import FxquantPass
from .passes.find_linears import FindLinears
from .passes.select_protected import SelectOptions, SelectProtected
from .recipe import Recipe, WeightScheme


def _load(module: str, cls: str, recipe: Recipe, why: str) -> Any:
    if importlib.util.find_spec(f"fxquant.passes.{module}") is None:
        raise PassNotAvailableError(
            f"recipe {recipe.name!r} needs pass '{module}' ({why}), which this version of fxquant does not implement yet"
        )
    return getattr(importlib.import_module(f"fxquant.passes.{module}"), cls)


def build(recipe: Recipe, calibration: Sequence[Any] | None = None) -> list[FxquantPass]:
    """The passes for ``recipe``, in order. ``calibration`` feeds the statistics pass."""
    passes: list[FxquantPass] = [FindLinears()]
    if recipe.needs_calibration:
        why = "SmoothQuant" if recipe.smoothquant else "top-k protection"
        stats = _load("collect_stats", "CollectStats", recipe, f"{why} needs activation statistics")
        passes.append(stats(calibration))
        if recipe.protect_top_k > 0:
            score = _load("score_fragility", "ScoreFragility", recipe, "protect_top_k > 0")
            passes.append(score(recipe.fragility_score))
    passes.append(SelectProtected(SelectOptions(recipe.protect_top_k, recipe.protect_reference_linears,
                                                recipe.protect, recipe.skip)))
    if recipe.smoothquant:
        fold = _load("fold_smoothing", "FoldSmoothing", recipe, "smoothquant = true")
        passes.append(fold(recipe.alpha, recipe.alpha_search, calibration))
    if recipe.weights is WeightScheme.INT8:
        from .passes.lower_w8a8 import LowerW8A8

        passes.append(LowerW8A8())
    else:
        lower = _load("lower_gguf", "LowerGGUF", recipe, f"{recipe.weights.value} weights")
        passes.append(lower(recipe.weights, recipe.misaligned))
    return passes


def run(gm: fx.GraphModule, passes: Sequence[FxquantPass]) -> fx.GraphModule:
    for p in passes:
        gm = p(gm).graph_module
    return gm
