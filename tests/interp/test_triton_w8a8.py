"""``fxquant.ops.triton_w8a8`` under the Triton interpreter, against the ``torch._int_mm`` reference."""

from __future__ import annotations

import pytest
import torch

from fxquant.ops import triton_w8a8, w8a8

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 64, 16), (17, 77, 29), (37, 130, 45)]  # (M, K, N): odd, K tails past the 32-wide tiles


def _problem(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x[0, : k // 3] = 0  # a row with zeros, and one that is all zero when m > 1
    if m > 1:
        x[-1] = 0
    wq, ws = w8a8.quantize_weight_per_channel(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(dtype)
    smooth = torch.rand(k, generator=g) + 0.5
    return x, wq, ws, bias, smooth


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth_on", [False, True])
def test_row_quantization_is_bit_exact(dtype, smooth_on):
    x, _, _, _, smooth = _problem(9, 133, 8, dtype)
    s = smooth if smooth_on else None
    q, scale = triton_w8a8.quantize_rows(x, s)
    ref_q, ref_scale = w8a8.quantize_act_per_token(x, s)
    assert torch.equal(q, ref_q)
    assert torch.equal(scale, ref_scale[:, 0])


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int32_accumulation_matches_int_mm(m, k, n):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    # Unit scales and a float32 output: the epilogue passes the int32 sum through unchanged
    # (|sum| <= 127 * 127 * 130 < 2**24, so the float32 conversion is exact).
    got = triton_w8a8.int8_gemm(a, ones_m, b, ones_n, None, torch.float32)
    assert torch.equal(got, torch._int_mm(a, b.t()).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_linear_matches_reference_op(m, k, n, dtype):
    x, wq, ws, bias, smooth = _problem(m, k, n, dtype)
    for b, s in [(None, None), (bias, smooth)]:
        got = triton_w8a8.linear_w8a8(x, wq, ws, b, s)
        ref = w8a8.reference_linear_w8a8(x, wq, ws, b, s)
        assert got.dtype == dtype and got.shape == ref.shape
        # The epilogue rounds in the reference's order and casts to nearest even: bit-exact here
        # (on a GPU the bound is 1 ulp, see tests/test_triton_kernels.py).
        assert torch.equal(got, ref), (got.float() - ref.float()).abs().max()


def test_leading_dims_and_empty_input():
    x, wq, ws, bias, smooth = _problem(6, 64, 24, torch.bfloat16)
    x3 = x.reshape(2, 3, 64)
    got = triton_w8a8.linear_w8a8(x3, wq, ws, bias, smooth)
    assert got.shape == (2, 3, 24)
    assert torch.equal(got, w8a8.reference_linear_w8a8(x3, wq, ws, bias, smooth))
    assert triton_w8a8.linear_w8a8(x3[:0], wq, ws, bias, smooth).shape == (0, 3, 24)


def test_non_contiguous_rows():
    x, wq, ws, bias, smooth = _problem(8, 96, 16, torch.float16)
    wide = torch.zeros(8, 160, dtype=torch.float16)
    wide[:, 10:106] = x
    view = wide[:, 10:106]  # row stride 160
    assert torch.equal(triton_w8a8.linear_w8a8(view, wq, ws, bias, smooth),
                       w8a8.reference_linear_w8a8(x, wq, ws, bias, smooth))
