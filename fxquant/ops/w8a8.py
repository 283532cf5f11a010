"""W8A8 custom op. Its arguments carry every quantization parameter,
so ``print(gm.code)`` says what runs and ``torch.export`` keeps it.

    fxquant.linear_w8a8(x, weight_int8, weight_scale, bias, smooth)
        y = ((q(x * smooth) @ weight_int8.T) * x_scale * weight_scale + bias).to(x.dtype)
        with q = per-token dynamic symmetric int8 and the matmul int8 x int8 -> int32.

The quantization math lives in small functions next to the op, granularity spelled out:

    x_scale[t] = max(amax_k |x[t, k]| / 127, eps)                      per token, float32
    x_int8[t]  = clamp(round_half_even(x[t] / x_scale[t]), -127, 127)  division, not x * (1/s);
                                                                       the clamp never binds
    w_scale[o] = max(amax_k |W[o, k]| / 127, eps)                      per output channel
    acc        = torch._int_mm(x_int8, W_int8.T)                       int32
    y          = (acc * x_scale) * w_scale (+ bias), float32, then cast to x.dtype

How it runs on CPU (measured, see docs/benchmarks.md): `torch._int_mm` reaches about twice the
throughput of a bf16 matmul, but the quantize and rescale steps are passes over memory. Done whole,
at DiT widths (1024 tokens x 12288 features) their float32 temporaries are 50 MB: they miss the
32 MB L3 and, above glibc's 32 MB mmap threshold, page-fault on every call; that added up to
half the matmul's own time again. So the CPU path works in slices whose temporaries stay in cache: activations
are quantized a block of rows at a time, and the matmul plus its epilogue run a block of output
columns at a time, written straight into the output in its final dtype. The arithmetic is the
same element for element, so the result is bit-identical to the unsliced form.

On CUDA the op runs the Triton kernels of ``triton_w8a8`` (row quantization, then an int8 GEMM
with the rescale, bias and cast in its epilogue) when triton is installed; without triton it
falls back to the reference below, where the whole tensor is one slice and `_int_mm`'s shape
rules are met by zero padding. ``reference_linear_w8a8`` is that reference, callable on any device.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

INT8_MAX = 127
# Floor of an activation row's scale: an all-zero token quantizes to zeros, never to NaN.
SCALE_EPS = torch.finfo(torch.float32).eps
# Elements per slice on CPU: 2**21 float32 = 8 MiB of temporaries, inside a 32 MiB L3 and below
# glibc's mmap threshold. 2**20 to 2**22 measure alike on one thread; on two threads of a loaded
# machine fewer, larger slices wait less at OpenMP barriers.
CPU_SLICE_ELEMS = 1 << 21
# Narrowest column block, for very long sequences: keeps each GEMM wide enough to run at speed
# (blocks of 512-4096 columns measured within 3% of the unsliced GEMM).
MIN_COLUMN_BLOCK = 256
# Elements per float32 slice when quantizing a weight (16 MiB per temporary).
WEIGHT_SLICE_ELEMS = 1 << 22


def quantize_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8, one scale per output channel (row of ``w``, shape [out, in]).

    Returns (int8 weight [out, in], float32 scale [out]); ``w ≈ q * scale[:, None]``.
    """
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    # Rows are independent: a slice at a time keeps the float32 temporaries to one slice, not a
    # copy of a (possibly 245M-parameter) weight.
    step = max(1, WEIGHT_SLICE_ELEMS // max(1, w[0].numel()))
    for i in range(0, w.shape[0], step):
        wf = w[i:i + step].float()
        sc = (wf.abs().amax(dim=1) / INT8_MAX).clamp(min=SCALE_EPS)
        q[i:i + step] = torch.round(wf / sc[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[i:i + step] = sc
    return q, scale


def _quantize_rows_into(x2d: Tensor, smooth: Optional[Tensor], q_out: Tensor, s_out: Tensor, buf: Tensor) -> None:
    """Per-token quantization of ``x2d`` [rows, in] into ``q_out`` (int8) and ``s_out`` ([rows, 1] float32).

    ``buf`` is a float32 [rows, in] scratch tensor; every step after the first works in it in place.
    """
    if smooth is not None:
        src = torch.mul(x2d, smooth, out=buf)  # smooth is float32: the product is computed in float32
    else:
        src = x2d  # amax is exact in any float dtype; the division below promotes to float32
    s_out.copy_(src.abs().amax(dim=1, keepdim=True))
    s_out.div_(INT8_MAX).clamp_(min=SCALE_EPS)
    torch.div(src, s_out, out=buf)
    # No clamp: |x| <= amax = 127 * scale (to within one float32 rounding), so |x / scale| rounds
    # to at most 127. A clamp would be one more pass that changes nothing.
    buf.round_()
    q_out.copy_(buf)  # exact: buf holds integers in [-127, 127]


def quantize_act_per_token(x2d: Tensor, smooth: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int8, one scale per token (row of ``x2d``, shape [tokens, in]).

    ``smooth`` (float, [in]) multiplies each input channel first (SmoothQuant's ``x / s``).
    Returns (int8 [tokens, in], float32 scale [tokens, 1]).
    """
    q = torch.empty(x2d.shape, dtype=torch.int8, device=x2d.device)
    s = torch.empty(x2d.shape[0], 1, dtype=torch.float32, device=x2d.device)
    buf = torch.empty(x2d.shape, dtype=torch.float32, device=x2d.device)
    _quantize_rows_into(x2d, None if smooth is None else smooth.float(), q, s, buf)
    return q, s


def _int_mm(a: Tensor, w: Tensor) -> Tensor:
    """int8 activations [M, K] x int8 weight rows [N, K] -> int32 [M, N], as ``torch._int_mm(a, w.t())``.

    The weight goes in transposed (column-major), the layout cuBLAS' int8 GEMM supports everywhere.
    CUDA also wants M > 16 and K, N multiples of 8: zero rows and columns are padded in (they add
    nothing to the dot products) and cut off after. CPU takes any shape.
    """
    if not a.is_cuda:
        return torch._int_mm(a, w.t())
    m, k = a.shape
    n = w.shape[0]
    pk, pn, pm = -k % 8, -n % 8, max(0, 17 - m)
    if pk or pm:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        w = F.pad(w, (0, pk, 0, pn))
    return torch._int_mm(a, w.t())[:m, :n]


def _slices(total: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


@functools.cache
def triton_kernels() -> Optional[ModuleType]:
    """``fxquant.ops.triton_w8a8``, imported on first use, or None when triton is not installed."""
    try:
        from . import triton_w8a8
    except ImportError:
        return None
    return triton_w8a8


@torch.library.custom_op("fxquant::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor]
) -> Tensor:
    """W8A8 linear: per-token dynamic int8 activations, per-channel int8 weights [out, in].

    CUDA inputs run the Triton kernels when triton is installed; everything else runs
    ``reference_linear_w8a8`` (``torch._int_mm``).
    """
    kernels = triton_kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels.linear_w8a8(x, weight_int8, weight_scale, bias, smooth)
    return reference_linear_w8a8(x, weight_int8, weight_scale, bias, smooth)


def reference_linear_w8a8(
    x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor]
) -> Tensor:
    """The ``torch._int_mm`` form of ``linear_w8a8``: the reference, and the path off CUDA."""
    out_features, in_features = weight_int8.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    tokens = x2d.shape[0]
    if tokens == 0:
        return x.new_zeros(*lead, out_features)
    if smooth is not None:
        smooth = smooth.float()
    on_cpu = x.device.type == "cpu"
    dev = x.device

    # 1. per-token quantization, a block of rows at a time
    rows = max(1, CPU_SLICE_ELEMS // in_features) if on_cpu else tokens
    xq = torch.empty(tokens, in_features, dtype=torch.int8, device=dev)
    xs = torch.empty(tokens, 1, dtype=torch.float32, device=dev)
    buf = torch.empty(min(rows, tokens), in_features, dtype=torch.float32, device=dev)
    for r in _slices(tokens, rows):
        _quantize_rows_into(x2d[r], smooth, xq[r], xs[r], buf[: r.stop - r.start])

    # 2. int8 GEMM and epilogue, a block of output columns at a time, into the final dtype
    cols = out_features
    if on_cpu:
        cols = max(MIN_COLUMN_BLOCK, CPU_SLICE_ELEMS // tokens // MIN_COLUMN_BLOCK * MIN_COLUMN_BLOCK)
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=dev)
    scratch = torch.empty(tokens * min(cols, out_features), dtype=torch.float32, device=dev)
    for c in _slices(out_features, cols):
        acc = _int_mm(xq, weight_int8[c])
        y = torch.mul(acc, xs, out=scratch[: acc.numel()].view(acc.shape))  # int32 * float32 -> float32
        if bias is not None:
            torch.add(y.mul_(weight_scale[c]), bias[c], out=out[:, c])  # float32 sum, one rounding
        else:
            torch.mul(y, weight_scale[c], out=out[:, c])
    return out.reshape(*lead, out_features)


@linear_w8a8.register_fake
def _(x, weight_int8, weight_scale, bias, smooth):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])
