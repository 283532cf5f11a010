"""Triton dequant-GEMM behind ``fxquant::linear_gguf`` on CUDA (imported only when triton is installed).

    x [M, K] (bf16/fp16/fp32), qweight [N, row_bytes] uint8 (GGUF Q4_K or Q8_0 rows)
    for each K step:  decode the [BLOCK_K, BLOCK_N] weight tile from the stored bytes (float32,
                      bit-exact with ``fxquant.codecs``), round it to x's dtype, tl.dot into float32
    epilogue:         y = (acc + bias).to(x.dtype)

No full-weight decode and no second copy: each program reads the bytes of its own tile. A tile
is ``BLOCK_K / 32`` sub-blocks of 32 weights (Q8_0 blocks are 32 weights; a Q4_K block is 8
sub-blocks sharing ``d`` and ``dmin``), decoded as a [sub-blocks, 32, BLOCK_N] tensor so the
scales are computed once per sub-block, then reshaped to [BLOCK_K, BLOCK_N] for ``tl.dot``.
The float32 decode follows ``codecs.q8_0.decode_blocks`` / ``codecs.q4_k.decode_blocks``:
``d * q`` (exact), and ``(d * sc) * q - dmin * m`` with one rounding (the products are exact),
so fusing into an FMA cannot change it. float32 activations use IEEE ``tl.dot`` (no TF32).

Under the interpreter a bfloat16 ``tl.dot`` multiplies the raw uint16 bit patterns (triton 3.9's
interpreter has no bfloat16 matmul), so there both operands are upcast to float32 first; that
is exact and computes what a GPU's bf16 dot with float32 accumulation computes.

Configs are autotuned on a GPU for DiT shapes; under the Triton interpreter one small config runs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import cast_rtne, interpreting

_DIT_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 128, 64, 4, 4), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8),
        (64, 128, 128, 4, 4), (64, 256, 64, 4, 8), (32, 128, 128, 4, 4), (64, 64, 256, 3, 4),
    ]
]
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}
_QTYPES = {"q8_0": 0, "q4_k": 1}


@triton.jit
def _fp16_at(ptrs, mask):
    """float32 value of the little-endian fp16 whose low byte ``ptrs`` point at."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptrs + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode_tile(w_ptr, rn, sub, l, row_bytes, N, NSUB, QTYPE: tl.constexpr):
    """Decode sub-blocks ``sub`` [SB] of rows ``rn`` [BN]: float32 [SB, 32, BN]."""
    row = w_ptr + rn[None, :].to(tl.int64) * row_bytes  # [1, BN]
    ok = (sub[:, None] < NSUB) & (rn[None, :] < N)  # [SB, BN]
    ok3 = ok[:, None, :]
    if QTYPE == 0:  # Q8_0: 34-byte blocks = fp16 d, 32 x int8
        blk = row + sub[:, None] * 34  # [SB, BN]
        d = _fp16_at(blk, ok)
        q = tl.load(blk[:, None, :] + 2 + l[None, :, None], mask=ok3, other=0).to(tl.int8, bitcast=True)
        return q.to(tl.float32) * d[:, None, :]
    else:  # Q4_K: 144-byte blocks = fp16 d, fp16 dmin, 12 scale bytes, 128 nibble bytes
        blk = row + (sub[:, None] // 8) * 144
        j = sub[:, None] % 8  # sub-block inside its block
        d = _fp16_at(blk, ok)
        dmin = _fp16_at(blk + 2, ok)
        low = j < 4
        # get_scale_min_k4: j < 4 reads bytes j, j+4; j >= 4 reads bytes j+4, j-4, j.
        a = tl.load(blk + 4 + tl.where(low, j, j + 4), mask=ok, other=0).to(tl.int32)
        b = tl.load(blk + 4 + tl.where(low, j + 4, j - 4), mask=ok, other=0).to(tl.int32)
        c = tl.load(blk + 4 + j, mask=ok, other=0).to(tl.int32)
        sc = tl.where(low, a & 63, (a & 15) | ((b >> 6) << 4))
        m = tl.where(low, b & 63, (a >> 4) | ((c >> 6) << 4))
        d_sub = d * sc.to(tl.float32)
        m_sub = dmin * m.to(tl.float32)
        byte = tl.load(blk[:, None, :] + 16 + 32 * (j[:, None, :] // 2) + l[None, :, None], mask=ok3, other=0)
        q = (byte.to(tl.int32) >> (4 * (j[:, None, :] % 2))) & 15
        return d_sub[:, None, :] * q.to(tl.float32) - m_sub[:, None, :]


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, c_ptr, bias_ptr, M, N, K, M_BUCKET, stride_xm, stride_cm, row_bytes,
                 QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    SB: tl.constexpr = BLOCK_K // 32
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    l = tl.arange(0, 32)
    nsub = K // 32
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        w = _decode_tile(w_ptr, rn, k0 // 32 + tl.arange(0, SB), l, row_bytes, N, nsub, QTYPE)
        w = cast_rtne(tl.reshape(w, (BLOCK_K, BLOCK_N)), x_ptr.dtype.element_ty)
        if DOT_IN_FP32:  # exact upcast: bf16 products are exact in float32, as on tensor cores
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K

    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c_ptrs, cast_rtne(acc, c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dequant_kernel(w_ptr, out_ptr, N, K, row_bytes, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out[N, K] float32 = the decoded weight: the GEMM's decode, stored instead of multiplied."""
    SB: tl.constexpr = BLOCK_K // 32
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _decode_tile(w_ptr, rn, tl.program_id(1) * SB + tl.arange(0, SB), tl.arange(0, 32), row_bytes,
                     N, K // 32, QTYPE)
    w = tl.reshape(w, (BLOCK_K, BLOCK_N))
    ptrs = out_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]
    tl.store(ptrs, w, mask=(rn[None, :] < N) & (rk[:, None] < K))


_gemm_tuned = None if interpreting() else triton.autotune(configs=_DIT_CONFIGS, key=["M_BUCKET", "N", "K", "QTYPE"])(_gemm_kernel)


def dequantize(qweight: Tensor, qtype: str, in_features: int) -> Tensor:
    """Decode ``qweight`` [N, row_bytes] to float32 [N, in_features] with the GEMM's tile decoder.

    Not on the op's path (the GEMM never stores the weight); it lets tests compare the decoder
    the GEMM uses with ``fxquant.codecs.dequantize`` bit for bit.
    """
    n = qweight.shape[0]
    out = torch.empty(n, in_features, dtype=torch.float32, device=qweight.device)
    bn, bk = (16, 64) if interpreting() else (64, 256)
    grid = (triton.cdiv(n, bn), triton.cdiv(in_features, bk))
    _dequant_kernel[grid](qweight.contiguous(), out, n, in_features, qweight.shape[1], QTYPE=_QTYPES[qtype],
                          BLOCK_N=bn, BLOCK_K=bk)
    return out


def linear_gguf(x: Tensor, qweight: Tensor, qtype: str, in_features: int, bias: Optional[Tensor]) -> Tensor:
    """The Triton path of ``fxquant::linear_gguf`` (CUDA tensors, or CPU ones under the interpreter).

    ``qtype`` is a ``fxquant.codecs.BLOCKS`` key ("q4_k" / "q8_0"); shapes are checked by the op.
    """
    n = qweight.shape[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    m = x2d.shape[0]
    if m == 0:
        return x.new_zeros(*lead, n)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    qweight = qweight.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias = None if bias is None else bias.contiguous()
    args = (x2d, qweight, out, bias if bias is not None else out, m, n, in_features,
            triton.next_power_of_2(m), x2d.stride(0), out.stride(0), qweight.shape[1])
    meta = {"QTYPE": _QTYPES[qtype], "HAS_BIAS": bias is not None,
            "DOT_PRECISION": "ieee" if x.dtype == torch.float32 or interpreting() else "tf32",
            "DOT_IN_FP32": interpreting() and x.dtype == torch.bfloat16}
    if _gemm_tuned is None:
        cfg = _INTERPRET_CONFIG
        _gemm_kernel[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _gemm_tuned[grid](*args, **meta)
    return out.reshape(*lead, n)
