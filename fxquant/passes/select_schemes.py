"""select_schemes: decide, per linear, its scheme and why (no rewrite). Decide, then lower: the
lowering passes carry the decision out and never re-decide.

    recipe (skip / protect / scheme rules, fragility top-k, default, misaligned policy)
        -> meta["fxquant"].selection = Selection(kind, scheme, reason, by)

    first of:  skip rule            -> skipped,   float         (untouched by every pass)
               protect rule         -> protected, protect_scheme
               scheme rule          -> quantize,  the rule's scheme (first match)
               top-k by ranking     -> protected, protect_scheme  (among linears no rule decided;
                                                              fragility or measured sensitivity, ``by``)
               float budget         -> protected, protect_scheme  (greedy by sensitivity^2 per byte,
                                                              `score_sensitivity.choose_within_budget`)
               otherwise            -> quantize,  default
    then, if the scheme's block (256 for Q4_K, 32 for Q8_0) does not divide in_features, the
    misaligned policy: keep_float -> float; q8_0 -> Q8_0 if 32 divides it, else float; by "misaligned".

Top-k is taken among the linears no rule has decided, so the rules' layers come on top of k.
Top-k scaling: ``top_k`` is chosen for a model with ``reference_linears`` linears (the paper:
17 of Ideogram 4's 279). A model with n < reference linears protects ``max(1, round(k * n / reference))``
so that the same *fraction* stays protected; a larger model keeps k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

from .. import graph, meta
from ..errors import RecipeError, is_int
from ..recipe import LayerRule, MisalignedPolicy, ProtectBy, Recipe, SchemeRule
from ..schemes import DecidedBy, Scheme, SelectionKind, info
from .base import FxquantPass, PassResult, require_records
from .score_sensitivity import choose_within_budget


@dataclass(frozen=True)
class SelectOptions:
    """The part of a `Recipe` the selection reads (``SelectOptions.of(recipe)``)."""

    default: Scheme = Scheme.W8A8
    rules: tuple[SchemeRule, ...] = ()
    top_k: int = 0
    reference_linears: int = 0
    protect: tuple[LayerRule, ...] = ()
    protect_scheme: Scheme = Scheme.FLOAT
    skip: tuple[LayerRule, ...] = ()
    misaligned: MisalignedPolicy = MisalignedPolicy.KEEP_FLOAT
    by: ProtectBy = ProtectBy.FRAGILITY
    budget_fraction: float = 0.0
    budget_bytes: int = 0

    def __post_init__(self) -> None:
        # Validated as a recipe is: the same errors, whichever way the options come in.
        Recipe(default=self.default, rules=self.rules, protect=self.protect, skip=self.skip,
               protect_scheme=self.protect_scheme, misaligned=self.misaligned, protect_by=self.by,
               protect_budget=self.budget_fraction, protect_budget_bytes=self.budget_bytes)
        object.__setattr__(self, "by", ProtectBy(self.by))
        for key in ("default", "protect_scheme"):
            object.__setattr__(self, key, Scheme(getattr(self, key)))
        object.__setattr__(self, "misaligned", MisalignedPolicy(self.misaligned))
        if not is_int(self.top_k):
            raise RecipeError(f"select_schemes: top_k must be an integer >= 0, got {self.top_k!r}")

    @staticmethod
    def of(recipe: Recipe) -> "SelectOptions":
        return SelectOptions(recipe.default, recipe.rules, recipe.protect_top_k, recipe.protect_reference_linears,
                             recipe.protect, recipe.protect_scheme, recipe.skip, recipe.misaligned,
                             recipe.protect_by, recipe.protect_budget, recipe.protect_budget_bytes)

    @property
    def has_budget(self) -> bool:
        return self.budget_fraction > 0 or self.budget_bytes > 0


def effective_top_k(top_k: int, num_linears: int, reference: int) -> int:
    if top_k <= 0:
        return 0
    if reference and num_linears < reference:
        return min(num_linears, max(1, round(top_k * num_linears / reference)))
    return min(top_k, num_linears)


def fit_block(sel: meta.Selection, in_features: int, policy: MisalignedPolicy) -> meta.Selection:
    """``sel``, or the misaligned policy's outcome if its scheme's block does not divide ``in_features``.

    Example: a Q4_K linear with 128 inputs under ``q8_0`` -> Q8_0, by ``misaligned``, with the reason.
    """
    block = info(sel.scheme).block
    if in_features % block == 0:
        return sel
    why = f"in_features {in_features} is not a multiple of the {sel.scheme.value.upper()} block ({block})"
    q8 = info(Scheme.Q8_0).block
    if policy is MisalignedPolicy.Q8_0 and sel.scheme is not Scheme.Q8_0 and in_features % q8 == 0:
        scheme, why = Scheme.Q8_0, f"{why}: stored as Q8_0 (misaligned policy q8_0)"
    elif policy is MisalignedPolicy.Q8_0:
        scheme, why = Scheme.FLOAT, f"{why} nor of the Q8_0 block ({q8}): kept float (misaligned policy q8_0)"
    else:
        scheme, why = Scheme.FLOAT, f"{why}: kept float (misaligned policy keep_float)"
    reason = f"{sel.reason}; {why}" if sel.reason else why
    return meta.Selection(sel.kind, scheme, reason, DecidedBy.MISALIGNED)


class SelectSchemes(FxquantPass):
    """Write `meta.Selection` on every linear (see the module docstring).

    Args:
        options: `SelectOptions` (``SelectOptions.of(recipe)``).

    Raises:
        RecipeError: a required rule matches no linear.
        PassError: no records (run find_linears), or top-k without fragility (run score_fragility).
    """

    name = "select_schemes"

    def __init__(self, options: SelectOptions = SelectOptions()) -> None:
        if not isinstance(options, SelectOptions):
            raise RecipeError(f"{self.name}: options must be SelectOptions, got {type(options).__name__}")
        self.options = options

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name)
        o = self.options
        if o.by is ProtectBy.SENSITIVITY and (o.top_k > 0 or o.has_budget):
            require_records(gm, self.name, "sensitivity", before="score_sensitivity (the recipe protects by sensitivity)")
        elif o.top_k > 0:
            require_records(gm, self.name, "fragility", before="collect_stats and score_fragility (the recipe has protect_top_k > 0)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        o = self.options
        recs = meta.records(gm)
        names = [r.name for _, r in recs]
        for key, rules in (("skip", o.skip), ("protect", o.protect), ("rules", o.rules)):
            for rule in rules:
                if rule.required and not any(rule.matches(n) for n in names):
                    pattern = getattr(rule, "pattern", None) or rule.match
                    raise RecipeError(f"recipe.{key}: pattern {pattern!r} matches no linear in the model "
                                      f"({len(names)} linears, e.g. {names[0]!r})")
        by_rule = {rec.name: self._by_rule(rec.name) for _, rec in recs}
        k = effective_top_k(o.top_k, len(recs), o.reference_linears)
        # Top-k counts only linears no rule has decided: "k plus the patterns", as the paper's recipe.
        by = o.by.value  # the record field holding the ranking: fragility or sensitivity
        candidates = sorted((getattr(rec, by).rank, rec.name) for _, rec in recs
                            if by_rule[rec.name] is None and getattr(rec, by) is not None)
        top = {name for _, name in candidates[:k]}
        chosen: dict[fx.Node, Optional[meta.Selection]] = {}
        for node, rec in recs:
            sel = by_rule[rec.name]
            if sel is None and rec.name in top:
                sel = meta.Selection(SelectionKind.PROTECTED, o.protect_scheme,
                                     f"{by} rank {getattr(rec, by).rank} of {len(recs)} (top {k})", DecidedBy.TOP_K)
            chosen[node] = sel
        if o.has_budget:
            chosen.update(budget_selection(gm, recs, chosen, o))
        for node, rec in recs:
            sel = fit_block(chosen[node] or meta.Selection(SelectionKind.QUANTIZE, o.default), rec.in_features, o.misaligned)
            meta.update(node, selection=sel)
        return PassResult(gm, False)  # metadata only: the graph is unchanged

    def _by_rule(self, name: str) -> Optional[meta.Selection]:
        o = self.options
        for rule in o.skip:
            if rule.matches(name):
                return meta.Selection(SelectionKind.SKIPPED, Scheme.FLOAT, f"matches skip rule {rule.pattern!r}", DecidedBy.RULE)
        for rule in o.protect:
            if rule.matches(name):
                return meta.Selection(SelectionKind.PROTECTED, o.protect_scheme, f"matches protect rule {rule.pattern!r}",
                                      DecidedBy.RULE)
        for rule in o.rules:
            if rule.matches(name):
                return meta.Selection(SelectionKind.QUANTIZE, rule.scheme, f"matches scheme rule {rule.match!r}", DecidedBy.RULE)
        return None


def budget_selection(gm: fx.GraphModule, recs, chosen: dict, o: SelectOptions) -> dict:
    """Selections the float budget adds: greedy by sensitivity**2 per float byte, after what rules
    and top-k already keep off the default scheme (their bytes count against the budget)."""
    # Float bytes from the record and the node's float output dtype, not from the weight as stored now,
    # so a re-run on a lowered graph decides the same.
    size = {n: r.in_features * r.out_features * n.meta["val"].element_size() for n, r in recs}
    caps = [c for c in (round(o.budget_fraction * sum(size.values())) if o.budget_fraction > 0 else 0, o.budget_bytes) if c > 0]
    left = min(caps) - sum(size[n] for n, _ in recs if chosen[n] is not None and chosen[n].kind is SelectionKind.PROTECTED)
    free = {r.key: (n, r) for n, r in recs if chosen[n] is None and r.sensitivity is not None}
    picked = choose_within_budget([(key, r.sensitivity.error ** 2, size[n]) for key, (n, r) in free.items()], left)
    return {free[key][0]: meta.Selection(
        SelectionKind.PROTECTED, o.protect_scheme,
        f"sensitivity {free[key][1].sensitivity.error:.3g} (rank {free[key][1].sensitivity.rank}), within the "
        f"float budget of {min(caps)} bytes", DecidedBy.BUDGET) for key in picked}
