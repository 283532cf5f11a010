"""The passes a recipe implies, in one visible list, in three phases: analyse, decide, rewrite.

    analysis:  find_linears -> [collect_stats -> [score_fragility] -> [score_sensitivity]]
    decide:    select_schemes                       (one Scheme per linear, from the recipe)
    rewrite:   [fold_smoothing] -> [round_gptq] -> the lowering of every scheme the recipe uses (LOWERINGS)
               -> [materialize_folds]

Bracketed passes run only when the recipe needs them: calibration statistics for SmoothQuant or
top-k protection, fragility scores for top-k, folding for SmoothQuant. Each lowering pass owns
its schemes and declines every other node, so their order does not matter and one module can mix
them (w8a8 with q8_0 protected layers, q4_k with q8_0 ones). After the rewrite every linear must
have a lowering record: a scheme no registered pass lowers is a `PassError`, never a silent float.

A `Pipeline` logs each pass to the ``fxquant`` logger (`logging`), can dump ``gm.code`` after
every pass into a folder, and re-raises a failure as the same error type, naming the pass and the
passes that ran before it::

    >>> p = fxquant.pipeline.build(Recipe.preset("q4_k_m"), calibration)   # doctest: +SKIP
    >>> print(p)                                                            # doctest: +SKIP
    analysis: FindLinears() -> CollectStats(...) -> ScoreFragility(kind=...)
    decide:   SelectSchemes(...)
    rewrite:  LowerGGUF() -> KeepFloat()
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch.fx as fx

from . import memory, meta
from .artifacts.common import atomic_write
from .errors import FxquantError, PassError, describe
from .passes.base import FxquantPass
from .passes.collect_stats import CollectStats
from .passes.find_linears import FindLinears
from .passes.fold_smoothing import FoldSmoothing
from .passes.keep_float import KeepFloat
from .passes.lower_gguf import LowerGGUF
from .passes.lower_w8a8 import LowerW8A8
from .passes.materialize_folds import MaterializeFolds
from .passes.round_gptq import RoundGPTQ
from .passes.score_fragility import ScoreFragility
from .passes.score_sensitivity import ScoreSensitivity
from .passes.select_schemes import SelectOptions, SelectSchemes
from .recipe import MisalignedPolicy, ProtectBy, Recipe
from .schemes import Scheme

log = logging.getLogger("fxquant")

# Which pass lowers each scheme. A new scheme is one line here (and its pass file).
LOWERINGS: dict[Scheme, type[FxquantPass]] = {
    Scheme.W8A8: LowerW8A8,
    Scheme.Q4_K: LowerGGUF,
    Scheme.Q8_0: LowerGGUF,
    Scheme.FLOAT: KeepFloat,
}

ANALYSIS, DECIDE, REWRITE = "analysis", "decide", "rewrite"


@dataclass(frozen=True)
class Phase:
    name: str
    passes: tuple[FxquantPass, ...]


class Pipeline:
    """An ordered list of phases of passes; calling it runs them on a GraphModule.

    Args:
        phases: the `Phase` s, in order.
        dump_dir: if set, ``gm.code`` is written there after every pass (``03_select_schemes.py``, ...).
    """

    def __init__(self, phases: Sequence[Phase], dump_dir: Optional[str | os.PathLike[str]] = None) -> None:
        self.phases = tuple(phases)
        self.dump_dir = None if dump_dir is None else os.fspath(dump_dir)

    @property
    def passes(self) -> list[FxquantPass]:
        return [p for ph in self.phases for p in ph.passes]

    def only(self, *names: str) -> "Pipeline":
        """The pipeline restricted to the named phases (e.g. ``only("decide", "rewrite")``)."""
        unknown = set(names) - {ph.name for ph in self.phases}
        if unknown:
            raise PassError(f"pipeline: no phase(s) {sorted(unknown)}; phases are {[ph.name for ph in self.phases]}")
        return Pipeline([ph for ph in self.phases if ph.name in names], self.dump_dir)

    def __str__(self) -> str:
        width = max((len(ph.name) for ph in self.phases), default=0) + 1
        return "\n".join(f"{ph.name + ':':{width}} " + " -> ".join(map(repr, ph.passes)) for ph in self.phases)

    __repr__ = __str__

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        done: list[str] = []
        if self.dump_dir is not None:
            os.makedirs(self.dump_dir, exist_ok=True)
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                gm = p(gm).graph_module
            except Exception as e:  # noqa: BLE001 - re-raised as its own type, with where it happened
                raise _where(e, p, done) from e
            done.append(p.name)
            memory.trim()
            log.info("fxquant: %s done in %.2fs", p.name, time.perf_counter() - t0)
            if self.dump_dir is not None:
                path = os.path.join(self.dump_dir, f"{len(done):02d}_{p.name}.py")
                atomic_write(path, f"# after {' -> '.join(done)}\n{gm.code}".encode(), "pipeline dump_dir")
        if any(ph.name == REWRITE for ph in self.phases):
            check_lowered(gm)
        return gm


def _where(e: Exception, p: FxquantPass, done: list[str]) -> Exception:
    """``e`` again (same type), its message prefixed with the pass and the passes before it."""
    after = f"after {' -> '.join(done)}" if done else "the first pass"
    text = f"{p.name} ({after}): {e if isinstance(e, FxquantError) else describe(e)}"
    try:
        return type(e)(text)
    except Exception:  # noqa: BLE001 - an exception type that takes other arguments
        return PassError(text)


def check_lowered(gm: fx.GraphModule) -> None:
    """Every linear was lowered by the pass owning its scheme (no silent float)."""
    for _, rec in meta.records(gm):
        if rec.lowering is None:
            scheme = rec.selection.scheme.value if rec.selection else "?"
            raise PassError(f"pipeline: linear {rec.name!r} was selected {scheme!r} but no lowering pass lowered it; "
                            f"registered lowerings: {sorted(s.value for s in LOWERINGS)}")


def lowerings(recipe: Recipe) -> list[FxquantPass]:
    """One instance of each pass lowering a scheme the recipe can produce (float always: protection,
    skips and the misaligned policy can keep any linear float)."""
    schemes = set(recipe.schemes) | {Scheme.FLOAT}
    if recipe.misaligned is MisalignedPolicy.Q8_0 and schemes & {Scheme.Q4_K}:
        schemes.add(Scheme.Q8_0)
    missing = sorted(s.value for s in schemes if s not in LOWERINGS)
    if missing:
        raise PassError(f"pipeline: no lowering pass is registered for scheme(s) {missing}")
    classes = list(dict.fromkeys(LOWERINGS[s] for s in Scheme if s in schemes))  # enum order, deduplicated
    return [cls() for cls in classes]


def build(recipe: Recipe, calibration: Sequence[Any] | None = None, label: str = "",
          dump_dir: Optional[str | os.PathLike[str]] = None, owns_weights: bool = False) -> Pipeline:
    """The `Pipeline` for ``recipe``. ``calibration`` feeds the passes that observe activations;
    ``label`` (the CFG branch) names them in progress messages; ``owns_weights`` (``compile(consume=True)``)
    lets GPTQ write codes into the float weights it replaces."""
    analysis: list[FxquantPass] = [FindLinears()]
    if recipe.needs_calibration:
        analysis.append(CollectStats(calibration, label=f"collect_stats {label}".strip()))
        ranks = recipe.protect_top_k > 0 or recipe.has_budget
        if ranks:
            analysis.append(ScoreFragility(recipe.fragility_score))
        if ranks and recipe.protect_by is ProtectBy.SENSITIVITY:
            analysis.append(ScoreSensitivity(calibration, recipe.sensitivity_samples,
                                             recipe.alpha if recipe.smoothquant else None))
    rewrite: list[FxquantPass] = []
    if recipe.smoothquant:
        rewrite.append(FoldSmoothing(recipe.alpha, recipe.alpha_search, calibration))
    if recipe.gptq:
        rewrite.append(RoundGPTQ(calibration, recipe.gptq_damp, recipe.gptq_hessian_bytes, in_place=owns_weights))
    rewrite += lowerings(recipe)
    if recipe.smoothquant:
        rewrite.append(MaterializeFolds())  # after every lowering: bakes what stays float
    return Pipeline([Phase(ANALYSIS, tuple(analysis)), Phase(DECIDE, (SelectSchemes(SelectOptions.of(recipe)),)),
                     Phase(REWRITE, tuple(rewrite))], dump_dir)


def run(gm: fx.GraphModule, passes: Sequence[FxquantPass] | Pipeline) -> fx.GraphModule:
    """Run a `Pipeline`, or a plain list of passes as one phase."""
    pipe = passes if isinstance(passes, Pipeline) else Pipeline([Phase("passes", tuple(passes))])
    return pipe(gm)
