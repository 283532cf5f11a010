"""Running activation statistics: exact central moments merged input by input, per timestep.

`Moments` are the count, mean and central sums of one set of numbers, merged exactly (Chan et
al. / Pébay); `RunningStats` keeps, per linear and per timestep, the merged moments of every
input it is shown plus the per-input-channel max |x|, and turns them into `meta.ActStats`.
Both ``collect_stats`` (an interpreter over the traced graph) and `fxquant.observe` (forward
pre-hooks on the real model) feed one `RunningStats` the same way, so the same inputs give the
same statistics. Memory does not grow with the number of inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import torch

from . import meta
from .errors import CalibrationError

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


class RunningStats:
    """Per key (a linear) and per timestep: merged `Moments` and the per-channel max |x|.

    ``begin(index, t)`` starts one calibration input (call); ``add(key, x)`` folds in one
    activation; ``result(key)`` is the `meta.ActStats` over everything seen, with ``per_step``
    in the order the timesteps first appeared.

    Args:
        who: names the caller in errors (``collect_stats``, ``observe``).
        label: key -> layer name for errors.
    """

    def __init__(self, who: str, label: Callable[[Hashable], str] = str) -> None:
        self.who, self.label = who, label
        self.steps: dict[float, dict[Hashable, Moments]] = {}  # insertion order = denoising order
        self.channel: dict[Hashable, torch.Tensor] = {}
        self.index, self.t, self.items = -1, 0.0, 0
        self._step: dict[Hashable, Moments] = {}

    def begin(self, index: int, t: Optional[float]) -> None:
        self.index, self.t = index, float(index) if t is None else t
        self._step = self.steps.setdefault(self.t, {})
        self.items += 1

    def add(self, key: Hashable, x: torch.Tensor, where: str = "calibration input") -> None:
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "Inf"
            raise CalibrationError(f"{self.who}: {bad} in the input of linear {self.label(key)!r} on {where} "
                                   f"{self.index} (timestep {self.t:g})")
        self._step[key] = self._step.get(key, Moments()).merge(Moments.of(x))
        cmax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        self.channel[key] = torch.maximum(self.channel[key], cmax) if key in self.channel else cmax

    def result(self, key: Hashable) -> Optional[meta.ActStats]:
        """The statistics of ``key`` over every input seen, or None if it never ran."""
        if key not in self.channel:
            return None
        per_step, total = [], Moments()
        for t, acc in self.steps.items():
            m = acc.get(key)
            if m is None:  # not reached on this step's inputs (no data, no entry)
                continue
            per_step.append(meta.StepStats(t, m.max_abs, m.std, m.kurtosis))
            total = total.merge(m)
        return meta.ActStats(total.max_abs, total.std, total.kurtosis, total.n, tuple(per_step), self.channel[key])

    @property
    def timesteps(self) -> tuple[float, ...]:
        return tuple(self.steps)

    def nbytes(self) -> int:
        """Bytes held: the per-channel maxima (the moments are a few floats per key and step)."""
        return sum(c.numel() * c.element_size() for c in self.channel.values()) + 64 * sum(len(a) for a in self.steps.values())
