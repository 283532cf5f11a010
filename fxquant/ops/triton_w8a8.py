"""Triton kernels behind ``fxquant::linear_w8a8`` on CUDA (imported only when triton is installed).

    x [M, K] (bf16/fp16/fp32)  --_quantize_kernel-->  x_int8 [M, K], x_scale [M] (float32)
    x_int8 @ weight_int8.T     --_gemm_kernel------>  int32 acc in registers (tl.dot, tensor cores)
                               epilogue:              y = ((acc * x_scale) * w_scale + bias).to(x.dtype)

Two launches: one program per token row quantizes it (amax pass, then quantize pass, the same
float32 arithmetic as ``w8a8._quantize_rows_into``: ``x * smooth`` rounded once, IEEE division by
the scale, round half to even), then the GEMM with the rescale, bias and output cast in its
epilogue. The int32 accumulator is exact, so it equals ``torch._int_mm``'s bit for bit; the epilogue
runs with ``enable_fp_fusion=False`` so its multiplies and add round in the reference op's order.

On a GPU the GEMM is autotuned over tile configs for DiT shapes (M 64..8192, K and N
3072..12288), keyed by N, K and M rounded up to a power of two. Under the Triton interpreter
(``TRITON_INTERPRET=1``, which must be set before triton is first imported) the same kernels run
on CPU tensors with one small fixed config: that is how CI checks them without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import cast_rtne, interpreting

# Kernel constants are tl.constexpr: compiled kernels may read no other globals (the interpreter would).
INT8_MAX = tl.constexpr(127.0)
SCALE_EPS = tl.constexpr(torch.finfo(torch.float32).eps)
# 1.5 * 2**23: adding and subtracting it rounds a float32 with |v| < 2**22 half to even (IEEE add).
_RINT_MAGIC = tl.constexpr(12582912.0)

# Tile configs for DiT shapes: large tiles for M >= 1024, narrower M tiles for short sequences.
_DIT_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4), (64, 256, 128, 3, 8), (32, 128, 128, 4, 4), (64, 64, 128, 5, 4),
    ]
]
# One small config under the interpreter: every tile edge is exercised on odd shapes, quickly.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}
_QUANT_BLOCK = 1024  # columns per step of the row-quantization kernel


@triton.jit
def _quantize_kernel(x_ptr, smooth_ptr, q_ptr, s_ptr, K, stride_xm,
                     HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(smooth_ptr + cols, mask=cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), INT8_MAX), SCALE_EPS)
    tl.store(s_ptr + row, scale)
    q_row = q_ptr + row.to(tl.int64) * K
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v * tl.load(smooth_ptr + cols, mask=cols < K, other=0.0)
        r = (tl.math.div_rn(v, scale) + _RINT_MAGIC) - _RINT_MAGIC  # |v / scale| <= 127: no clamp
        tl.store(q_row + cols, r.to(tl.int8), mask=cols < K)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K, M_BUCKET,
                 stride_cm, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = epilogue(A[M, K] @ B[N, K].T), A and B int8 row-major (K contiguous)."""
    # Grouped ordering (Triton's matmul tutorial): GROUP_M row tiles share each column tile in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]  # [BLOCK_K, BLOCK_N] view of B.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0)
        b = tl.load(b_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < K - k0), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # Epilogue, in the reference op's order: ((acc * x_scale) * w_scale) + bias, float32.
    x_scale = tl.load(as_ptr + rm, mask=rm < M, other=0.0)
    w_scale = tl.load(bs_ptr + rn, mask=rn < N, other=0.0)
    y = (acc.to(tl.float32) * x_scale[:, None]) * w_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, cast_rtne(y, c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_gemm_tuned = None if interpreting() else triton.autotune(configs=_DIT_CONFIGS, key=["M_BUCKET", "N", "K"])(_gemm_kernel)


def quantize_rows(x2d: Tensor, smooth: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token int8 quantization of a contiguous-rows ``x2d`` [M, K]: (int8 [M, K], float32 [M])."""
    m, k = x2d.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x2d.device)
    s = torch.empty(m, dtype=torch.float32, device=x2d.device)
    sm = smooth if smooth is not None else s  # unused pointer when HAS_SMOOTH is False
    block = 64 if interpreting() else _QUANT_BLOCK
    _quantize_kernel[(m,)](x2d, sm, q, s, k, x2d.stride(0), HAS_SMOOTH=smooth is not None, BLOCK=block)
    return q, s


def int8_gemm(xq: Tensor, x_scale: Tensor, weight_int8: Tensor, weight_scale: Tensor,
              bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``((xq @ weight_int8.T) * x_scale[:, None] * weight_scale + bias).to(out_dtype)`` in one kernel."""
    m, k = xq.shape
    n = weight_int8.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    args = (xq, weight_int8, out, x_scale, weight_scale, bias if bias is not None else weight_scale,
            m, n, k, triton.next_power_of_2(m), out.stride(0))
    if _gemm_tuned is None:
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _gemm_kernel[grid](*args, HAS_BIAS=bias is not None, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _gemm_tuned[grid](*args, HAS_BIAS=bias is not None, enable_fp_fusion=False)
    return out


def linear_w8a8(x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                smooth: Optional[Tensor]) -> Tensor:
    """The Triton path of ``fxquant::linear_w8a8`` (CUDA tensors, or CPU ones under the interpreter)."""
    out_features, in_features = weight_int8.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] == 0:
        return x.new_zeros(*lead, out_features)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    xq, xs = quantize_rows(x2d, None if smooth is None else smooth.float().contiguous())
    out = int8_gemm(xq, xs, weight_int8.contiguous(), weight_scale.float().contiguous(),
                    None if bias is None else bias.contiguous(), x.dtype)
    return out.reshape(*lead, out_features)
