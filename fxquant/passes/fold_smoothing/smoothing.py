"""SmoothQuant vector math for `fxquant.passes.fold_smoothing`: the vector, the folds, the alpha search.

    s_j = max|X_j|^alpha / max|W_j|^(1-alpha)          `smoothing_vector` (clamped, guarded)
    linear(x, W)  ->  linear(x / s, W * s)             1/s goes where `fold_targets` finds room:
    p  ->  (p + shift) / s - shift                     `apply_param_fold` over a `ParamFold` region
    alpha = argmin_a  |W8A8(x / s_a, W * s_a) - x W^T|  `search_alpha`, on calibration rows

Where ``1/s`` can be folded (norm weights, adaLN rows, a preceding linear) is graph walking and
lives in `fold_targets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...errors import CalibrationError
from ...ops.fold import scale_region
from ...ops.w8a8 import quantize_act_per_token, quantize_weight_per_channel

# s is clamped to [1/MAX_SCALE, MAX_SCALE]: a channel that is (near) zero in the calibration data
# must not blow a weight column up or down by many orders of magnitude.
MAX_SCALE = 1e4
_TINY = 1e-8


def smoothing_vector(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float, where: str = "") -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1-alpha), float32, per input channel.

    Channels whose activation or weight max is zero get s_j = 1 (nothing to balance); s is then
    clamped to [1/MAX_SCALE, MAX_SCALE].

    Raises:
        CalibrationError: if the statistics are not finite.

    Example:
        >>> smoothing_vector(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 2.0]), 0.5)
        tensor([2., 1.])
    """
    a, w = act_max.detach().float(), w_max.detach().float()
    if not bool(torch.isfinite(a).all()):
        raise CalibrationError(f"{where}: activation channel max-abs has non-finite values")
    valid = (a > 0) & (w > 0)
    s = a.clamp(min=_TINY).pow(alpha) / w.clamp(min=_TINY).pow(1.0 - alpha)
    return torch.where(valid, s, torch.ones_like(s)).clamp(1.0 / MAX_SCALE, MAX_SCALE)


@dataclass(frozen=True)
class ParamFold:
    """``p -> (p + shift) / s - shift`` over the channel region of parameter ``target``.

    ``dims`` are the parameter's dims that hold the channels (flattened in order); with one dim,
    the region is ``[start, start + C)`` along it.
    """

    target: str
    dims: tuple[int, ...]
    start: int = 0
    shift: float = 0.0
    width: int = 0  # channels in the region (0: the width of the group being checked)


@dataclass(frozen=True)
class Fold:
    kind: str  # "norm" | "adaln" | "linear"
    target_name: str  # module(s) receiving 1/s
    params: tuple[ParamFold, ...]


def apply_param_fold(p: torch.Tensor, f: ParamFold, s: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``p`` with ``1/s`` folded in as `ParamFold` ``f`` describes (``p`` is untouched).

    The same computation as the ``fxquant::scale_param`` node ``fold_smoothing`` leaves in the graph."""
    return scale_region(p, s, list(f.dims), f.start, f.shift, True)


def overlapping(params: Sequence[ParamFold], channels: int, others: Sequence[ParamFold] = ()) -> bool:
    """Whether two folds touch the same entries of one parameter (rows of one dim may be disjoint).

    Each region is as wide as its own ``width`` (a fold claimed by an earlier group may be wider
    or narrower than ``channels``, the width of the group being checked)."""
    seen = list(others)
    for p in params:
        for q in seen:
            wp, wq = p.width or channels, q.width or channels
            if p.target == q.target and (p.dims != q.dims or len(p.dims) != 1
                                         or not (p.start + wp <= q.start or q.start + wq <= p.start)):
                return True
        seen.append(p)
    return False


def search_alpha(act: torch.Tensor, weights: Sequence[torch.Tensor], x: torch.Tensor, candidates: Sequence[float],
                 where: str = "") -> float:
    """The candidate alpha minimising the group's simulated W8A8 output error on rows ``x``.

    For each candidate, ``x / s`` is quantized per token and each ``W * s`` per output channel with
    the W8A8 op's own quantizers; the squared error summed over the group, relative to the float
    outputs ``x @ W.T``, decides (the first candidate wins ties).

    Raises:
        CalibrationError: if the statistics are not finite.

    Example:
        >>> search_alpha(act_max, [w], rows, (0.3, 0.5, 0.7))  # doctest: +SKIP
        0.5
    """
    x = x.float().to(act.device)
    refs = [x @ w.float().T for w in weights]
    denom = sum(float(r.pow(2).sum()) for r in refs) or 1.0
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    best, best_err = candidates[0], float("inf")
    for a in candidates:
        s = smoothing_vector(act, w_max, a, where)
        xq, xs = quantize_act_per_token(x / s)
        err = 0.0
        for w, ref in zip(weights, refs):
            wq, wsc = quantize_weight_per_channel(w.float() * s)
            err += float(((xq.float() @ wq.float().T) * xs * wsc - ref).pow(2).sum())
        if err / denom < best_err:
            best, best_err = a, err / denom
    return best
