"""select_protected: decide, per linear, quantize / protected / skipped, and why (no rewrite).

    rules (recipe.skip, recipe.protect) + top-k by fragility rank
        -> meta["fxquant"].selection = Selection("protected", "fragility rank 2 of 279")

Top-k is taken among the linears no rule has decided, so the rules' layers come on top of k.

Top-k scaling: ``protect_top_k`` is chosen for a model with ``reference_linears`` linears (the paper:
17 of Ideogram 4's 279). A model with n < reference linears protects ``max(1, round(k * n / reference))``
so that the same *fraction* stays in float; a larger model keeps k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .. import meta
from ..errors import RecipeError
from ..recipe import LayerRule
from .base import FxquantPass, PassResult, require_records


@dataclass(frozen=True)
class SelectOptions:
    top_k: int = 0
    reference_linears: int = 0
    protect: tuple[LayerRule, ...] = ()
    skip: tuple[LayerRule, ...] = ()


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
        if self.options.top_k > 0:
            require_records(gm, self.name, "fragility", before="collect_stats and score_fragility (the recipe has protect_top_k > 0)")

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
        candidates = sorted((rec.fragility.rank, rec.name) for _, rec in recs
                            if by_rule[rec.name] is None and rec.fragility is not None)
        top = {name for _, name in candidates[:k]}
        for node, rec in recs:
            sel = by_rule[rec.name]
            if sel is None and rec.name in top:
                sel = meta.Selection("protected", f"fragility rank {rec.fragility.rank} of {len(recs)} (top {k})", by="top_k")
            meta.update(node, selection=sel or meta.Selection("quantize"))
        return PassResult(gm, False)


def _first_match(rules: tuple[LayerRule, ...], name: str, kind: str) -> meta.Selection | None:
    for rule in rules:
        if rule.matches(name):
            return meta.Selection(kind, f"matches {'skip' if kind == 'skipped' else 'protect'} rule {rule.pattern!r}", by="rule")
    return None
