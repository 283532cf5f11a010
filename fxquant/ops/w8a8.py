"""W8A8 custom op. Its arguments carry every quantization parameter,
so ``print(gm.code)`` says what runs and ``torch.export`` keeps it.

    fxquant.linear_w8a8(x, weight_int8, weight_scale, bias, smooth)
        y = ((q(x * smooth) @ weight_int8.T) * x_scale * weight_scale + bias).to(x.dtype)
        with q = per-token dynamic symmetric int8 and the matmul int8 x int8 -> int32.

The quantization math lives in small functions next to the op, granularity spelled out.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

INT8_MAX = 127
# Floor of an activation row's scale: an all-zero token quantizes to zeros, never to NaN.
SCALE_EPS = torch.finfo(torch.float32).eps


def quantize_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8, one scale per output channel (row of ``w``, shape [out, in]).

    Returns (int8 weight [out, in], float32 scale [out]); ``w ≈ q * scale[:, None]``.
    """
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=SCALE_EPS)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_act_per_token(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8, one scale per token (row of ``x2d``, shape [tokens, in]).

    Returns (int8 [tokens, in], float32 scale [tokens, 1]).
    """
    x2d = x2d.float()
    scale = (x2d.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=SCALE_EPS)
    q = torch.round(x2d / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N] on torch's int_mm path.

    CUDA's kernel needs M > 16: pad the rows and drop them after.
    """
    m = a.shape[0]
    if a.is_cuda and m <= 16:
        a = torch.nn.functional.pad(a, (0, 0, 0, 17 - m))
        return torch._int_mm(a, b)[:m]
    return torch._int_mm(a, b)


@torch.library.custom_op("fxquant::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor]
) -> Tensor:
    """W8A8 linear: per-token dynamic int8 activations, per-channel int8 weights [out, in]."""
    out_features, in_features = weight_int8.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if smooth is not None:
        x2d = x2d.float() * smooth
    if x2d.shape[0] == 0:
        return x.new_zeros(*lead, out_features)
    xq, xs = quantize_act_per_token(x2d)
    acc = _int_mm(xq, weight_int8.t())
    y = acc.float() * xs * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, out_features)


@linear_w8a8.register_fake
def _(x, weight_int8, weight_scale, bias, smooth):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])
