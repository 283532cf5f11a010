"""fold_smoothing: SmoothQuant, with each smoothing vector folded into weights the graph already has.

Linears reading the same tensor form a group (q/k/v, w1/w3) and share one vector
s = max|X|^alpha / max|W|^(1-alpha) (per input channel, from ``stats.channel_max_abs``).
Their weight columns are multiplied by s; 1/s goes to the first place that can take it
(`fold_targets.FoldFinder` walks back through channel-preserving ops):

    norm:    linear(rms_norm(h) * w_norm * (1+scale), W)   ->  linear(rms_norm(h) * (w_norm/s) * (1+scale), W*s)
    adaln:   linear(layer_norm(h) * (1 + mod(c)), W)       ->  mod rows W_m/s, bias (b_m + 1)/s - 1;  W*s
    linear:  to_out(sdpa(q, k, to_v(x)))                   ->  to_v rows / s;  to_out columns * s   (w3 -> w2 alike)
    fused:   linear(x, W)                                  ->  linear(mul(x, get_attr[l.smooth] = 1/s), W*s)

None of the first three adds an activation op; the float graph computes the same function. A fused
vector is private to its linear (computed from its own weights) and ``lower_w8a8`` moves the
multiply into the W8A8 op's activation quantization.

No smoothed weight is materialized here (that would be a second float copy of the model): each
changed parameter is read through ``fxquant::scale_param`` nodes over the original and one
float32 buffer ``<first member>.smooth_vector`` = s per group,

    linear(x, get_attr[W])  ->  linear(x, scale_param(get_attr[W], get_attr[g.smooth_vector], [1], 0, 0.0, False))
    mul(n, get_attr[norm.w]) -> mul(n, scale_param(get_attr[norm.w], get_attr[g.smooth_vector], [0], 0, 0.0, True))

and the lowering computes one layer's effective weight at a time (`fxquant.graph.weight`);
``materialize_folds`` bakes what stays float. Within the pass, decided folds wait in a table
(read through `deferred.Deferred.value`) and join the graph at the end, so the fold finder always walks
the graph as traced.

Order: groups are smoothed downstream first, so each vector is computed on its group's final
weights (a fold only writes upstream of the group it serves).

Group policy: only linears whose selected scheme quantizes activations (w8a8) decide s (their
weights and statistics). Any other member of a folded group (float, or weight-only q8_0 / q4_k)
gets the compensating columns too (exact in float); a group with a skipped member is never
folded (skipped means untouched), its w8a8 members fall back to fused. A linear that already has a ``smoothing`` record is declined, so a second run
changes nothing. ``alpha_search`` picks, per group, the alpha minimising the simulated W8A8
output error on calibration activations (`fxquant.ops` quantizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from ... import graph, meta
from ...errors import PassError, RecipeError, is_fraction
from ...observe import Observed
from ...schemes import SelectionKind, info
from .deferred import Deferred
from .fold_targets import FoldFinder
from .smoothing import Fold, ParamFold, overlapping, search_alpha, smoothing_vector
from ..base import FxquantPass, PassResult, require_records


@dataclass(frozen=True)
class SmoothOptions:
    """alpha: fixed migration strength; alpha_search: candidates tried per group (empty: fixed);
    search_tokens: calibration rows per group the search simulates (kept small: it is cheap)."""

    alpha: float = 0.5
    alpha_search: tuple[float, ...] = ()
    search_tokens: int = 512

    def __post_init__(self) -> None:
        for a in (self.alpha, *self.alpha_search):
            if not is_fraction(a):
                raise RecipeError(f"fold_smoothing: alpha must be a number in [0, 1], got {a!r}")
        if self.search_tokens < 1:
            raise RecipeError(f"fold_smoothing: search_tokens must be >= 1, got {self.search_tokens!r}")


class FoldSmoothing(FxquantPass):
    """Fold SmoothQuant vectors into the graph (see the module docstring).

    Args:
        alpha, alpha_search: see `SmoothOptions`.
        calibration: the example inputs (as given to ``compile``); needed only for the alpha search.
        search_tokens: input rows per group the alpha search simulates.

    Returns (from ``__call__``): ``PassResult(gm, modified)``; every linear gets ``smoothing``.

    Raises:
        PassError: no ``selection`` (run select_schemes), a w8a8 linear without
            ``stats.channel_max_abs`` of shape [in_features] (run collect_stats), or an alpha
            search without calibration inputs.
        CalibrationError: non-finite statistics, or calibration inputs the graph cannot take.
        RecipeError: alpha outside [0, 1].

    Example:
        >>> FoldSmoothing(alpha=0.5)(gm)  # after find_linears, collect_stats, select_schemes  # doctest: +SKIP
    """

    name = "fold_smoothing"

    def __init__(self, alpha: float = 0.5, alpha_search: Sequence[float] = (), calibration: Optional[Sequence[Any]] = None,
                 search_tokens: int = 512) -> None:
        self.options = SmoothOptions(alpha, tuple(alpha_search), search_tokens)
        self.calibration = calibration

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "selection", before="select_schemes")
        for _, r in meta.records(gm):
            if not _smoothed(r):
                continue
            cm = r.stats.channel_max_abs if r.stats is not None else None
            if cm is None:
                raise PassError(f"{self.name}: linear {r.name!r} has no per-channel activation max "
                                f"(stats.channel_max_abs); run collect_stats first")
            if tuple(cm.shape) != (r.in_features,):
                raise PassError(f"{self.name}: linear {r.name!r}: stats.channel_max_abs has shape {tuple(cm.shape)}, "
                                f"expected ({r.in_features},)")
        if self.options.alpha_search and not self.calibration:
            raise PassError(f"{self.name}: alpha_search needs the calibration inputs")
        if self.options.alpha_search and isinstance(self.calibration, Observed) and not self.calibration.samples:
            raise PassError(f"{self.name}: alpha_search needs raw activation rows, and fxquant.observe kept none; "
                            "observe with search_tokens > 0 (e.g. observe(module, search_tokens=512))")

    def call(self, gm: fx.GraphModule) -> PassResult:
        # Linears that already have a smoothing record (a second run) or were lowered are declined.
        recs = {n: r for n, r in meta.records(gm) if r.smoothing is None and graph.is_linear(n)}
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in recs:
            groups.setdefault(node.args[0], []).append(node)
        # A weight read by another call of the same module cannot take this call's column scaling.
        shared = {n for n in recs if len(n.args[1].users) > 1}
        skipped = {n for n, r in recs.items() if r.selection.kind is SelectionKind.SKIPPED}
        frozen = {str(a.target) for n in skipped | shared for a in n.args[1:3] if isinstance(a, fx.Node)}
        finder = FoldFinder(gm, frozen)
        wanted = [x for x, ms in groups.items() if any(_smoothed(recs[m]) for m in ms)]
        samples = self._samples(gm, wanted, groups, recs) if self.options.alpha_search else {}
        claimed: list[ParamFold] = []  # what earlier groups folded into: a later group must not refold it
        self._deferred = Deferred(gm)
        modified = False
        # Downstream groups first: a fold writes only into parameters upstream of its group's input
        # (w2's vector into w3's rows, to_out's into to_v's), so every group's max|W_j| and alpha
        # search see the weights as they will finally be, not before a later fold rescales them.
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        for x, members in sorted(groups.items(), key=lambda g: position[g[0]], reverse=True):
            quant = [m for m in members if _smoothed(recs[m]) and m not in shared]
            fold = None
            if quant and not any(m in skipped or m in shared for m in members):
                fold = finder.find(x, members, recs[quant[0]].in_features)
                if fold is not None and overlapping(fold.params, recs[quant[0]].in_features, claimed):
                    fold = None
            if fold is not None:
                modified |= self._fold(gm, fold, members, quant, recs, samples.get(x), claimed)
                continue
            for m in members:
                if m in quant:
                    modified |= self._fuse(gm, m, recs[m], samples.get(x))
                else:
                    meta.update(m, smoothing=meta.Smoothing("none", group=(recs[m].name,)))
        self._deferred.emit()
        self._deferred = None
        if modified:
            graph.finalize(gm)
        return PassResult(gm, modified)

    # ---------------------------------------------------------------- rewrites

    def _fold(self, gm, fold: Fold, members, quant, recs, sample, claimed) -> bool:
        w_max = torch.stack([self._deferred.col_absmax(m) for m in quant]).amax(0)
        act = torch.stack([recs[m].stats.channel_max_abs.float().to(w_max.device) for m in quant]).amax(0)
        names = tuple(recs[m].name for m in members)
        alpha = self._alpha(act, quant, sample, names[0])
        s = smoothing_vector(act, w_max, alpha, names[0])
        if bool((s == 1).all()):  # nothing to migrate: leave the graph as it is
            for m in members:
                meta.update(m, smoothing=meta.Smoothing("none", group=names))
            return False
        s_target = self._deferred.vector(names[0], s)
        for m in members:
            self._deferred.add(str(m.args[1].target), s_target, (1,), 0, 0.0, False)
        for pf in fold.params:
            self._deferred.add(pf.target, s_target, pf.dims, pf.start, pf.shift, True)
            claimed.append(pf)
        weights = {str(n.args[1].target): r.name for n, r in recs.items()}  # linear weight -> module
        rows = tuple((weights[pf.target], pf.start) for pf in fold.params if pf.target in weights)
        for m in members:
            meta.update(m, smoothing=meta.Smoothing(fold.kind, fold.target_name, alpha, names,
                                                    vector=s.detach().float().cpu(), scaled_rows=rows))
        return True

    def _fuse(self, gm, node: fx.Node, rec: meta.LinearRecord, sample) -> bool:
        w_max = self._deferred.col_absmax(node)
        act = rec.stats.channel_max_abs.float().to(w_max.device)
        alpha = self._alpha(act, [node], sample, rec.name)
        s = smoothing_vector(act, w_max, alpha, rec.name)
        dtype_w = graph.root_weight(gm, node).dtype
        if bool((s == 1).all()):
            meta.update(node, smoothing=meta.Smoothing("none", group=(rec.name,)))
            return False
        x = node.args[0]
        xval = x.meta.get("val")
        dtype = xval.dtype if isinstance(xval, torch.Tensor) else dtype_w
        target = f"{rec.name}.smooth"
        graph.set_buffer(gm, target, (1.0 / s).to(dtype))
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(target)
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, attr))
        if xval is not None:
            mul.meta["val"] = xval
        if "nn_module_stack" in node.meta:
            mul.meta["nn_module_stack"] = dict(node.meta["nn_module_stack"])
        node.update_arg(0, mul)
        self._deferred.add(str(node.args[1].target), self._deferred.vector(rec.name, s), (1,), 0, 0.0, False)
        meta.update(node, smoothing=meta.Smoothing("fused", rec.name, alpha, (rec.name,)))
        return True

    # ---------------------------------------------------------------- alpha search

    def _alpha(self, act: torch.Tensor, linears: list[fx.Node], sample: Optional[torch.Tensor], where: str) -> float:
        """The fixed alpha, or the candidate minimising the simulated W8A8 error of the group."""
        if not self.options.alpha_search or sample is None:
            return self.options.alpha
        weights = [self._deferred.weight(m) for m in linears]  # the search needs whole weights
        return search_alpha(act, weights, sample, self.options.alpha_search, where)

    def _samples(self, gm, wanted, groups, recs) -> dict[fx.Node, torch.Tensor]:
        """Input rows per group: kept by `fxquant.observe` while the model ran, else captured here."""
        if not isinstance(self.calibration, Observed):
            return self._capture(gm, wanted)
        rows = {x: self.calibration.sample(recs[groups[x][0]].key) for x in wanted}
        return {x: r[: self.options.search_tokens] for x, r in rows.items() if r is not None}

    def _capture(self, gm: fx.GraphModule, wanted: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        """Up to ``search_tokens`` evenly spaced input rows of each group, over the calibration set."""
        examples = list(self.calibration or ())
        per = max(1, -(-self.options.search_tokens // max(1, len(examples))))
        rows: dict[fx.Node, list[torch.Tensor]] = {n: [] for n in wanted}

        def keep(n: fx.Node, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.numel():
                x2d = out.detach().reshape(-1, out.shape[-1]).float()
                idx = torch.linspace(0, x2d.shape[0] - 1, min(per, x2d.shape[0])).round().long()
                rows[n].append(x2d[idx])

        watch = graph.Watch(gm, set(wanted), keep)
        for i, ex in enumerate(examples):
            with torch.no_grad():
                watch.run(*graph.graph_inputs(gm, ex, f"calibration[{i}]", self.name))
        return {n: torch.cat(r)[: self.options.search_tokens] for n, r in rows.items() if r}


def _smoothed(rec: meta.LinearRecord) -> bool:
    """Does the linear's own scheme quantize its input (so that its statistics decide s)?"""
    return info(rec.selection.scheme).quantized_activations
