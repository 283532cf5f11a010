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
A progress line goes to stderr when it is a terminal, nothing otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from .. import graph, meta
from ..calibrate import timestep_of
from ..errors import CalibrationError, FxquantError, PassError, describe
from ..trace import as_args_kwargs
from .base import FxquantPass, PassResult, require_records

# Elements per float64 chunk: bounds the transient copies of one large activation (8 MiB each).
CHUNK = 1 << 20


@dataclass(frozen=True)
class Moments:
    """Central moments of a set of numbers: count, mean, and sums of (x - mean)**2, **3, **4."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    max_abs: float = 0.0

    @staticmethod
    def of(x: torch.Tensor) -> "Moments":
        """Exact moments of every element of ``x`` (two-pass per chunk, float64)."""
        flat = x.detach().reshape(-1)
        out = Moments()
        for start in range(0, flat.numel(), CHUNK):
            c = flat[start:start + CHUNK].double()
            mean = c.mean()
            d = c - mean
            d2 = d * d
            out = out.merge(Moments(c.numel(), float(mean), float(d2.sum()), float((d2 * d).sum()),
                                    float((d2 * d2).sum()), float(c.abs().max())))
        return out

    def merge(self, o: "Moments") -> "Moments":
        """The moments of the union of two sets (Pébay 2008, eq. 3.1; Chan et al. 1979)."""
        if o.n == 0:
            return self
        if self.n == 0:
            return o
        na, nb = self.n, o.n
        n = na + nb
        d = o.mean - self.mean
        m2 = self.m2 + o.m2 + d * d * na * nb / n
        m3 = (self.m3 + o.m3 + d ** 3 * na * nb * (na - nb) / n ** 2
              + 3 * d * (na * o.m2 - nb * self.m2) / n)
        m4 = (self.m4 + o.m4 + d ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
              + 6 * d * d * (na * na * o.m2 + nb * nb * self.m2) / n ** 2
              + 4 * d * (na * o.m3 - nb * self.m3) / n)
        return Moments(n, self.mean + d * nb / n, m2, m3, m4, max(self.max_abs, o.max_abs))

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.n) if self.n else 0.0

    @property
    def kurtosis(self) -> float:
        # A constant input has no tails: nothing for quantization to clip, so it scores 0.
        return self.n * self.m4 / (self.m2 * self.m2) if self.m2 > 0 else 0.0


class _Progress:
    """``\\rcollect_stats: 3/8 calibration inputs`` on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.on = bool(getattr(sys.stderr, "isatty", lambda: False)())

    def step(self, done: int) -> None:
        if self.on:
            sys.stderr.write(f"\r{self.label}: {done}/{self.total} calibration inputs")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


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

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name)
        if not hasattr(gm, "_in_spec"):
            raise PassError(f"{self.name}: expected a GraphModule from fxquant.trace (torch.export), it has no _in_spec")

    def call(self, gm: fx.GraphModule) -> PassResult:
        linears = {node: rec.name for node, rec in meta.records(gm)}
        steps: dict[float, dict[fx.Node, Moments]] = {}  # insertion order = denoising order
        channel: dict[fx.Node, torch.Tensor] = {}
        current: dict[str, Any] = {}

        def observe(node: fx.Node, x: torch.Tensor) -> None:
            if not torch.isfinite(x).all():
                bad = "NaN" if torch.isnan(x).any() else "Inf"
                raise CalibrationError(f"{self.name}: {bad} in the input of linear {linears[node]!r} on calibration "
                                       f"input {current['index']} (timestep {current['t']:g})")
            acc = current["step"]
            acc[node] = acc.get(node, Moments()).merge(Moments.of(x))
            cmax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            channel[node] = torch.maximum(channel[node], cmax) if node in channel else cmax

        readers: dict[fx.Node, list[fx.Node]] = {}  # a linear's input node -> the linears reading it
        for node in linears:
            readers.setdefault(node.args[0], []).append(node)
        interp = graph.Watch(gm, set(readers), lambda x_node, x: [observe(n, x) for n in readers[x_node]])
        progress = _Progress(len(self.calibration), self.label)
        for i, item in enumerate(self.calibration):
            flat, t = flat_inputs(gm, item, f"calibration[{i}]")
            t = float(i) if t is None else t
            current.update(index=i, t=t, step=steps.setdefault(t, {}))
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

        for node, name in linears.items():
            per_step, total = [], Moments()
            for t, acc in steps.items():
                m = acc.get(node)
                if m is None:  # not reached on this step's inputs (no data, no entry)
                    continue
                per_step.append((t, m.max_abs, m.std, m.kurtosis))
                total = total.merge(m)
            meta.update(node, stats=meta.ActStats(total.max_abs, total.std, total.kurtosis, total.n,
                                                  tuple(per_step), channel[node]))
        rec = meta.graph_record(gm) or meta.GraphRecord(recipe={})
        meta.set_graph_record(gm, dataclasses.replace(rec, num_calibration=len(self.calibration),
                                                      timesteps=tuple(steps)))
        return PassResult(gm, False)
