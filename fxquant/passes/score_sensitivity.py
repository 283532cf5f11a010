"""score_sensitivity: measure what each linear's quantization does to the model's output (no rewrite).

    for each linear l:   y_l = graph(x) with l alone running as fxquant::linear_w8a8
                         (the lowered op itself: per-channel int8 weights, per-token int8
                         activations, l's own SmoothQuant vector when ``alpha`` is given)
        -> meta["fxquant"].sensitivity = Sensitivity(error=||y_l - y|| / ||y||, rank, local)

``error`` is pooled over every floating-point output tensor of the sampled calibration inputs
(as the protection ladder measures). ``local`` is a one-forward proxy, the relative error of the
linear's own output ``||W8A8(x, W) - x W^T|| / ||x W^T||``, computed during the reference run.

Cost, stated: ``samples * (1 + L)`` forward passes for ``L`` linears, one calibration input each
(``samples`` of them, spread evenly over the trajectory, so the timesteps are stratified). The
inputs are not concatenated into one batch: that would not save work, and it would double the
activations held at once (at Ideogram 4's real size the float32 RMSNorm of the 53248-wide LLM
features is 1.3 GB per temporary per input). Nothing is stored but the reference outputs. For
Ideogram 4 (279 linears) with ``samples=2``: 560 forwards, about 280 float forwards' worth of work
at batch 2.

Selection by budget (`choose_within_budget`): errors of independently quantized linears add
roughly in energy (``error**2``), so keeping linear l in float removes about ``error_l**2`` for
``bytes_l`` of float weights; the greedy choice takes the best ratio first while it fits.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .. import graph, memory, meta
from ..errors import CalibrationError, PassError, is_int
from ..ops.w8a8 import quantize_weight_per_channel
from .base import FxquantPass, PassResult, require_records
from .fold_smoothing.smoothing import smoothing_vector
from .score_fragility import ranking

log = logging.getLogger("fxquant")
W8A8 = torch.ops.fxquant.linear_w8a8.default
SLICE_ELEMS = 1 << 23  # weight elements quantized and multiplied at once (32 MiB in float32)


def choose_within_budget(items: Sequence[tuple[str, float, int]], budget: int) -> list[str]:
    """Greedy knapsack: ``(name, gain, cost)`` items by gain per cost, taken while they fit.

    Items with no gain are never taken; ties go to the name (deterministic).

    Example:
        >>> choose_within_budget([("a", 4.0, 4), ("b", 3.0, 1), ("c", 0.0, 1)], 4)
        ['b']
    """
    order = sorted((it for it in items if it[1] > 0), key=lambda it: (-it[1] / max(it[2], 1), it[0]))
    chosen, used = [], 0
    for name, _, cost in order:
        if used + cost <= budget:
            chosen.append(name)
            used += cost
    return chosen


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (first and last included)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


class _OneQuantized(fx.Interpreter):
    """Runs the graph with one linear node computed by ``linear(x, bias)`` (its W8A8 simulation)."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, linear: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        super().__init__(gm)
        self.node, self.linear = node, linear

    def run_node(self, n: fx.Node) -> Any:
        if n is not self.node:
            out = super().run_node(n)
        else:
            args, _ = self.fetch_args_kwargs_from_env(n)
            out = self.linear(args[0], args[2] if len(args) > 2 else None)
        if n.op.startswith("call"):
            memory.made(out)
        return out


def _col_absmax(w: torch.Tensor, slice_elems: int = 1 << 22) -> torch.Tensor:
    """``w.float().abs().amax(0)`` a slice of rows at a time, as ``max(max, -min)`` (exact): no
    float32 copy of the weight (1 GB for Ideogram 4's ``llm_cond_proj``), and no ``|w|`` temporary
    per slice either (freed slice temporaries interleaved with small results fragment glibc's heap:
    0.5 GB of RSS for ``llm_cond_proj``, docs/memory.md)."""
    step = max(1, slice_elems // max(1, w[0].numel()))
    out = None
    for b in w.split(step):
        lo, hi = torch.aminmax(b, dim=0)
        m = torch.maximum(hi, lo.neg_())
        out = m if out is None else torch.maximum(out, m, out=out)
    return out.float()


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class ScoreSensitivity(FxquantPass):
    """Attach `meta.Sensitivity` to every linear (see the module docstring).

    Args:
        calibration: the example inputs (as given to ``compile``).
        samples: how many of them to use (spread evenly over the sequence), >= 1.
        alpha: simulate each linear with its own SmoothQuant vector at this alpha (the recipe's,
            when it smooths); None for plain W8A8.

    Raises:
        PassError: no records, or ``alpha`` set and a linear without ``stats.channel_max_abs``.
        CalibrationError: no calibration inputs, or inputs the graph cannot take.
    """

    name = "score_sensitivity"

    def __init__(self, calibration: Optional[Sequence[Any]], samples: int = 2, alpha: Optional[float] = None) -> None:
        if not calibration:
            raise CalibrationError(f"{self.name}: needs at least one calibration input, got {calibration!r}")
        if not is_int(samples, 1):
            raise PassError(f"{self.name}: samples must be an integer >= 1, got {samples!r}")
        self.calibration, self.samples, self.alpha = calibration, samples, alpha
        self.forwards = 0  # forward passes the last call ran
        self.seconds = 0.0

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name)
        if self.alpha is not None:
            require_records(gm, self.name, "stats", before="collect_stats (smoothing is simulated)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        t0 = time.perf_counter()
        recs = meta.records(gm)
        if all(r.sensitivity is not None for _, r in recs):  # scored before (a second run): nothing to do
            return PassResult(gm, False)
        idx = spread(len(self.calibration), self.samples)
        inputs = [graph.graph_inputs(gm, self.calibration[i], f"calibration[{i}]", self.name) for i in idx]
        sims = {node: self._w8a8(gm, node, rec) for node, rec in recs}  # smoothing vectors once, not per forward
        refs, local = self._reference(gm, sims, inputs)
        ref_sq = sum(float(r.double().pow(2).sum()) for out in refs for r in out)
        errors = []
        for node, _ in recs:
            interp = _OneQuantized(gm, node, sims[node])
            err_sq = 0.0
            for flat, ref in zip(inputs, refs):
                with torch.no_grad():
                    out = _leaves(interp.run(*flat))
                err_sq += sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
            errors.append(math.sqrt(err_sq / max(ref_sq, 1e-300)))
            del interp, out
            memory.trim()
        self.forwards = len(inputs) * (1 + len(recs))
        ranks = ranking([r.key for _, r in recs], errors)
        for (node, _), err, rank in zip(recs, errors, ranks):
            meta.update(node, sensitivity=meta.Sensitivity(err, rank, local[node]))
        self.seconds = time.perf_counter() - t0
        log.info("%s: %d linears, %d forward passes (%d input(s)) in %.1f s", self.name, len(recs), self.forwards,
                 len(idx), self.seconds)
        return PassResult(gm, False)

    def _w8a8(self, gm: fx.GraphModule, node: fx.Node, rec: meta.LinearRecord) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """``(x, bias) -> fxquant::linear_w8a8`` of the linear as the lowering would make it (per-channel
        int8 weights, with the linear's own SmoothQuant vector when ``alpha`` is set), computed a
        slice of weight rows (output features) at a time: the int8 weight is never whole (245 MB for
        Ideogram 4's ``llm_cond_proj``), and the outputs are the same bits (integer accumulation,
        per-column epilogue)."""
        smooth = s = None
        if self.alpha is not None:
            w = graph.weight(gm, node).detach()  # the parameter (no fold chain before fold_smoothing): no copy
            act = rec.stats.channel_max_abs if rec.stats is not None else None
            if act is None or tuple(act.shape) != (rec.in_features,):
                raise PassError(f"{self.name}: linear {rec.name!r} has no per-channel activation max "
                                "(stats.channel_max_abs); run collect_stats first")
            s = smoothing_vector(act.float().to(w.device), _col_absmax(w), self.alpha, rec.name)
            smooth = 1.0 / s

        def w8a8(x: torch.Tensor, rows: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
            q, scale = quantize_weight_per_channel(rows.float() if s is None else rows.float() * s[None, :])
            return W8A8(x, q, scale, bias, smooth)

        def linear(x: torch.Tensor, bias: Any) -> torch.Tensor:
            return graph.linear_by_rows(gm, node, x, bias, w8a8, SLICE_ELEMS)
        return linear

    def _reference(self, gm, sims, inputs):
        """Float outputs per input, and each linear's local relative error against its W8A8
        simulation ``sims[node]`` (one forward per input)."""
        err = {n: 0.0 for n in sims}
        size = {n: 0.0 for n in sims}
        readers: dict[fx.Node, list[fx.Node]] = {}
        for node in sims:
            readers.setdefault(node.args[0], []).append(node)

        def observe(x_node: fx.Node, x: torch.Tensor) -> None:
            for n in readers[x_node]:
                bn = n.args[2] if len(n.args) > 2 else None
                b = graph.get_attr(gm, str(bn.target)) if isinstance(bn, fx.Node) and bn.op == "get_attr" else None
                y = F.linear(x, graph.weight(gm, n), b).double()
                err[n] += float((sims[n](x, b).double() - y).pow(2).sum())
                size[n] += float(y.pow(2).sum())

        watch = graph.Watch(gm, set(readers), observe)
        refs = []
        for flat in inputs:
            with torch.no_grad():
                refs.append(_leaves(watch.run(*flat)))
        return refs, {n: math.sqrt(err[n] / max(size[n], 1e-300)) for n in sims}
