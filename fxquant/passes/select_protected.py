"""select_protected: decide, per linear, quantize / protected / skipped, and why (no rewrite).

    rules (recipe.skip, recipe.protect) + top-k by fragility rank
        -> meta["fxquant"].selection = Selection("protected", "fragility rank 2 of 279")

Top-k is taken among the linears no rule has decided, so the rules' layers come on top of k. It ranks
by ``fragility`` (the paper's score) or by measured ``sensitivity`` (``by``). A float budget (a fraction
of all linear weight bytes, or bytes) then adds linears greedily by measured error removed per float
byte (`fxquant.passes.score_sensitivity.choose_within_budget`); what rules and top-k keep in float
counts against it.

Top-k scaling: ``protect_top_k`` is chosen for a model with ``reference_linears`` linears (the paper:
17 of Ideogram 4's 279). A model with n < reference linears protects ``max(1, round(k * n / reference))``
so that the same *fraction* stays in float; a larger model keeps k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .. import graph, meta
from ..errors import RecipeError
from ..recipe import LayerRule, ProtectBy
from .base import FxquantPass, PassResult, require_records
from .score_sensitivity import choose_within_budget


@dataclass(frozen=True)
class SelectOptions:
    top_k: int = 0
    reference_linears: int = 0
    protect: tuple[LayerRule, ...] = ()
    skip: tuple[LayerRule, ...] = ()
    by: ProtectBy = ProtectBy.FRAGILITY
    budget_fraction: float = 0.0
    budget_bytes: int = 0


def effective_top_k(top_k: int, num_linears: int, reference: int) -> int:
    if top_k <= 0:
        return 0
    if reference and num_linears < reference:
        return min(num_linears, max(1, round(top_k * num_linears / reference)))
    return min(top_k, num_linears)


class SelectProtected(FxquantPass):
    name = "select_protected"

    def __init__(self, options: SelectOptions) -> None:
        self.options = options

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name)
        if self.options.by is ProtectBy.SENSITIVITY and (self.options.top_k > 0 or self._budget):
            require_records(gm, self.name, "sensitivity", before="score_sensitivity (the recipe protects by sensitivity)")
        elif self.options.top_k > 0:
            require_records(gm, self.name, "fragility", before="collect_stats and score_fragility (the recipe has protect_top_k > 0)")

    @property
    def _budget(self) -> bool:
        return self.options.budget_fraction > 0 or self.options.budget_bytes > 0

    def call(self, gm: fx.GraphModule) -> PassResult:
        o = self.options
        recs = meta.records(gm)
        names = [r.name for _, r in recs]
        for kind, rules in (("skip", o.skip), ("protect", o.protect)):
            for rule in rules:
                if rule.required and not any(rule.matches(n) for n in names):
                    raise RecipeError(f"recipe.{kind}: pattern {rule.pattern!r} matches no linear in the model "
                                      f"({len(names)} linears, e.g. {names[0]!r})")
        k = effective_top_k(o.top_k, len(recs), o.reference_linears)
        by_rule = {rec.name: _first_match(o.skip, rec.name, "skipped") or _first_match(o.protect, rec.name, "protected")
                   for _, rec in recs}
        # Top-k counts only linears no rule has decided: "k plus the patterns", as the paper's recipe.
        by = o.by.value
        candidates = sorted((getattr(rec, by).rank, rec.name) for _, rec in recs
                            if by_rule[rec.name] is None and getattr(rec, by) is not None)
        top = {name for _, name in candidates[:k]}
        chosen = {}
        for node, rec in recs:
            sel = by_rule[rec.name]
            if sel is None and rec.name in top:
                sel = meta.Selection("protected", f"{by} rank {getattr(rec, by).rank} of {len(recs)} (top {k})", by="top_k")
            chosen[node] = sel
        if self._budget:
            chosen.update(budget_selection(gm, recs, chosen, o.budget_fraction, o.budget_bytes))
        for node, _ in recs:
            meta.update(node, selection=chosen[node] or meta.Selection("quantize"))
        return PassResult(gm, False)


def _first_match(rules: tuple[LayerRule, ...], name: str, kind: str) -> meta.Selection | None:
    for rule in rules:
        if rule.matches(name):
            return meta.Selection(kind, f"matches {'skip' if kind == 'skipped' else 'protect'} rule {rule.pattern!r}", by="rule")
    return None


def budget_selection(gm: fx.GraphModule, recs, chosen: dict, fraction: float, nbytes: int) -> dict:
    """Selections for the linears the float budget adds (greedy by sensitivity**2 per float byte)."""
    size = {n: graph.weight(gm, n).numel() * graph.weight(gm, n).element_size() for n, _ in recs}
    total = sum(size.values())
    caps = [c for c in (round(fraction * total) if fraction > 0 else 0, nbytes) if c > 0]
    budget = min(caps) - sum(size[n] for n, _ in recs if chosen[n] is not None and chosen[n].kind == "protected")
    free = {r.key: (n, r) for n, r in recs if chosen[n] is None and r.sensitivity is not None}
    picked = choose_within_budget([(key, r.sensitivity.error ** 2, size[n]) for key, (n, r) in free.items()], budget)
    return {free[key][0]: meta.Selection(
        "protected", f"sensitivity {free[key][1].sensitivity.error:.3g} (rank {free[key][1].sensitivity.rank}), "
                     f"within the float budget of {min(caps)} bytes", by="budget") for key in picked}
