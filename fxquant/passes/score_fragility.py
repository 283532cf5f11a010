"""score_fragility: score and rank every linear from its activation statistics (no rewrite).

    meta["fxquant"].stats = ActStats(max_abs=9.4, per_step=((t, max_abs, std, kurtosis), ...))
        -> meta["fxquant"].fragility = Fragility(score=41.2, rank=1, early_rank=1, late_rank=2)
    gm.meta["fxquant"].spearman_rho = 0.93

Scores (`FragilityScore`), from the per-timestep statistics:

    kurtosis_x_maxabs   mean over timesteps of kurtosis  x  max over timesteps of max |x|   (the paper's)
    kurtosis            mean over timesteps of kurtosis
    maxabs              max over timesteps of max |x|

Rank 1 is the most fragile; ties go to the name, so the ranking is deterministic. Stability:
the timesteps in denoising order (``ActStats.per_step`` order) are split into an early and a late
half (the middle one of an odd count is in neither); each half scores and ranks every linear on
its own timesteps, and ``spearman_rho`` is Spearman's rank correlation of the two rankings
(average ranks for ties; None with fewer than two timesteps, or if either half scores every
linear the same).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch.fx as fx

from .. import meta
from ..recipe import FragilityScore, _enum
from .base import FxquantPass, PassResult, require_records

Step = meta.StepStats


def score(steps: Sequence[Step], kind: FragilityScore) -> float:
    """The fragility score of one linear over the given timesteps."""
    steps = [meta.StepStats(*s) for s in steps]
    mean_kurtosis = sum(s.kurtosis for s in steps) / len(steps)
    max_abs = max(s.max_abs for s in steps)
    if kind is FragilityScore.KURTOSIS:
        return mean_kurtosis
    if kind is FragilityScore.MAXABS:
        return max_abs
    return mean_kurtosis * max_abs


def ranking(names: Sequence[str], scores: Sequence[float]) -> list[int]:
    """1-based ranks, highest score first, ties broken by name."""
    order = sorted(range(len(names)), key=lambda i: (-scores[i], names[i]))
    ranks = [0] * len(names)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman's rho of two score vectors (Pearson correlation of their average ranks)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = _average_ranks(a), _average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


class ScoreFragility(FxquantPass):
    """Attach `meta.Fragility` to every linear and ``spearman_rho`` to the graph (see module doc).

    Args:
        kind: a `FragilityScore` (or its value, e.g. ``"kurtosis_x_maxabs"``).

    Raises:
        PassError: a linear lacks statistics (run ``collect_stats`` first).
        RecipeError: an unknown score kind.
    """

    name = "score_fragility"

    def __init__(self, kind: FragilityScore | str = FragilityScore.KURTOSIS_X_MAXABS) -> None:
        self.kind = _enum(FragilityScore, kind, "fragility_score")

    def __repr__(self) -> str:
        return f"ScoreFragility(kind={self.kind.value!r})"

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "stats", before="collect_stats")

    def call(self, gm: fx.GraphModule) -> PassResult:
        recs = meta.records(gm)
        names = [r.name for _, r in recs]
        steps = [r.stats.per_step or (meta.StepStats(0.0, r.stats.max_abs, r.stats.std, r.stats.kurtosis),) for _, r in recs]
        scores = [score(s, self.kind) for s in steps]
        ranks = ranking(names, scores)
        # Halves of the trajectory, by position in the shared timestep order.
        order = list(dict.fromkeys(t for s in steps for t, *_ in s))
        half = len(order) // 2
        early_t, late_t = set(order[:half]), set(order[len(order) - half:])
        early_ranks: list[Optional[int]] = [None] * len(recs)
        late_ranks: list[Optional[int]] = [None] * len(recs)
        rho = None
        if half and all(any(t in early_t for t, *_ in s) and any(t in late_t for t, *_ in s) for s in steps):
            early = [score([x for x in s if x[0] in early_t], self.kind) for s in steps]
            late = [score([x for x in s if x[0] in late_t], self.kind) for s in steps]
            early_ranks, late_ranks = ranking(names, early), ranking(names, late)
            rho = spearman(early, late)
        for (node, _), sc, r, e, la in zip(recs, scores, ranks, early_ranks, late_ranks):
            meta.update(node, fragility=meta.Fragility(sc, r, e, la))
        rec = meta.graph_record(gm) or meta.GraphRecord(recipe={})
        meta.set_graph_record(gm, dataclasses.replace(rec, spearman_rho=rho))
        return PassResult(gm, False)
