"""collect_stats: observe every linear's input on the calibration inputs (graph unchanged).

    linear(x, get_attr[layers.0.feed_forward.w2.weight])      (graph unchanged)
        meta["fxquant"].stats = ActStats(max_abs, std, kurtosis, count,
                                         per_step=((t, max_abs, std, kurtosis), ...),
                                         channel_max_abs=float32[in_features])
    gm.meta["fxquant"].num_calibration, .timesteps

An `fx.Interpreter` runs the graph once per calibration input and, before each ``aten.linear``,
folds its input into running moments: per linear and per timestep, (count, mean, M2, M3, M4)
in float64 merged with the pairwise update of Chan et al. / Pébay (exact, and stable where raw
power sums cancel), plus max |x| and the per-input-channel max |x|. Memory does not grow with
the number of inputs; no activation is kept. Each input's timestep is read as in
`fxquant.calibrate.timestep_of` (no timestep argument: its index). Statistics are over every
element of the input (all tokens of all samples, all channels).

    std      = sqrt(M2 / n)                 (population)
    kurtosis = n * M4 / M2**2               (Pearson, 3 for a Gaussian; 0 if M2 == 0)

A NaN or Inf reaching a linear is a `CalibrationError` naming the layer and the input index.
Progress goes to the ``fxquant`` logger (INFO), one message per calibration input.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from .. import graph, meta
from ..calibrate import timestep_of
from ..observe import Observed
from ..stats import CHUNK, Moments, RunningStats  # noqa: F401 - Moments is part of this pass's API
from ..errors import CalibrationError, FxquantError, PassError, describe
from ..trace import as_args_kwargs
from .base import FxquantPass, PassResult, require_records

log = logging.getLogger("fxquant")


class _Progress:
    """``collect_stats cond: 3/8 calibration inputs`` on the ``fxquant`` logger (INFO)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label

    def step(self, done: int) -> None:
        log.info("%s: %d/%d calibration inputs", self.label, done, self.total)


def flat_inputs(gm: fx.GraphModule, item: Any, where: str) -> tuple[list[Any], Optional[float]]:
    """One calibration item -> (the graph's flat placeholder values, its timestep or None)."""
    args, kwargs = as_args_kwargs(item, where)
    return graph.graph_inputs(gm, item, where, "collect_stats"), timestep_of(gm.forward, args, kwargs, where)


def _describe_placeholders(gm: fx.GraphModule) -> str:
    parts = []
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor):
            parts.append(f"{n.target} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}")
    return ", ".join(parts)


class CollectStats(FxquantPass):
    """Attach `meta.ActStats` to every linear from a pass over ``calibration`` (see module doc).

    Args:
        calibration: a sequence of example inputs (dicts of keyword arguments or tuples of
            positional ones), e.g. a `fxquant.record_inputs` recorder.
        label: prefix of the progress line (e.g. the CFG branch).

    Raises:
        CalibrationError: empty calibration, an input of another form than the first, or a
            NaN/Inf activation (naming the layer and the input index).
        PassError: the graph has no records (run ``find_linears`` first).
    """

    name = "collect_stats"

    def __init__(self, calibration: Optional[Sequence[Any]], label: str = "collect_stats") -> None:
        if calibration is None or len(calibration) == 0:
            raise CalibrationError(f"{self.name}: needs at least one calibration input, got {calibration!r}")
        self.calibration = calibration
        self.label = label

    def __repr__(self) -> str:
        return f"CollectStats({len(self.calibration)} calibration inputs)"

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name)
        if not hasattr(gm, "_in_spec"):
            raise PassError(f"{self.name}: expected a GraphModule from fxquant.trace (torch.export), it has no _in_spec")

    def call(self, gm: fx.GraphModule) -> PassResult:
        # Linears observed before (a second run, or a graph already rewritten) keep their statistics.
        linears = {node: rec.key for node, rec in meta.records(gm) if rec.stats is None}
        if not linears:
            return PassResult(gm, False)
        if isinstance(self.calibration, Observed):  # gathered while the model ran: nothing to re-run
            return self._write(gm, linears, self.calibration.stats, self.calibration.calls)
        running = RunningStats(self.name, lambda node: linears[node])
        readers: dict[fx.Node, list[fx.Node]] = {}  # a linear's input node -> the linears reading it
        for node in linears:
            readers.setdefault(node.args[0], []).append(node)
        interp = graph.Watch(gm, set(readers), lambda x_node, x: [running.add(n, x) for n in readers[x_node]])
        progress = _Progress(len(self.calibration), self.label)
        for i, item in enumerate(self.calibration):
            flat, t = flat_inputs(gm, item, f"calibration[{i}]")
            running.begin(i, t)
            with torch.no_grad():
                try:
                    interp.run(*flat)
                except FxquantError:
                    raise
                except Exception as e:  # noqa: BLE001 - a shape/dtype the traced graph cannot take
                    raise CalibrationError(
                        f"{self.name}: calibration[{i}] does not fit the module traced on calibration[0] "
                        f"({describe(e)}); traced inputs: {_describe_placeholders(gm)}") from e
            progress.step(i + 1)
        return self._write(gm, {n: n for n in linears}, running, len(self.calibration))

    def _write(self, gm: fx.GraphModule, keys: dict[fx.Node, Any], running: RunningStats, count: int) -> PassResult:
        for node, key in keys.items():
            stats = running.result(key)
            if stats is None:
                raise CalibrationError(f"{self.name}: linear {meta.get(node).key!r} never ran on the calibration "
                                       "inputs; no statistics to quantize it with")
            meta.update(node, stats=stats)
        rec = meta.graph_record(gm) or meta.GraphRecord(recipe={})
        meta.set_graph_record(gm, dataclasses.replace(rec, num_calibration=count, timesteps=running.timesteps))
        return PassResult(gm, False)
