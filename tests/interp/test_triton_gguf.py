"""``fxquant.ops.triton_gguf`` under the Triton interpreter: decode bit-exact with ``fxquant.codecs``
(llama.cpp's reference vectors and random bytes), GEMM within the activation dtype's rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxquant import codecs
from fxquant.ops import gguf, triton_gguf

DATA = Path(__file__).parent.parent / "data" / "gguf"
QTYPES = ("q4_k", "q8_0")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


def _random_blocks(qtype: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random bytes (every scale-byte bit pattern occurs), with finite random fp16 scales."""
    g = np.random.default_rng(seed)
    elems, nbytes = codecs.BLOCKS[qtype]
    b = g.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    n_scales = 2 if qtype == "q4_k" else 1
    scales = (g.standard_normal((b.shape[0], n_scales)) * 0.01).astype(np.float16)
    b[:, : 2 * n_scales] = scales.view(np.uint8).reshape(b.shape[0], 2 * n_scales)
    return torch.from_numpy(b.reshape(rows, -1))


@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_bit_exact_on_llama_cpp_vectors(qtype):
    z = np.load(DATA / f"{qtype}_reference.npz")
    for name in z["case_names"]:
        qbytes = torch.from_numpy(z[f"{name}__qbytes"])
        cols = z[f"{name}__dequant"].shape[1]
        if cols > 512:
            continue  # the 4608-wide cases add nothing but interpreter time
        got = triton_gguf.dequantize(qbytes, qtype, cols)
        assert same_bits(got, torch.from_numpy(z[f"{name}__dequant"])), name
        assert same_bits(got, codecs.dequantize(qbytes, qtype)), name


@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_bit_exact_on_random_bytes(qtype):
    qbytes = _random_blocks(qtype, 19, 512, seed=3)
    assert same_bits(triton_gguf.dequantize(qbytes, qtype, 512), codecs.dequantize(qbytes, qtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_gemm_sees_the_exact_decoded_weight(qtype, dtype):
    """x = identity: the GEMM returns the decoded weight rounded to x's dtype, bit for bit."""
    k = 256
    qbytes = _random_blocks(qtype, 17, k, seed=4)
    got = triton_gguf.linear_gguf(torch.eye(k, dtype=dtype), qbytes, qtype, k, None)
    assert torch.equal(got.t(), codecs.dequantize(qbytes, qtype).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype,k", [("q4_k", 512), ("q8_0", 288)])
def test_gemm_within_rounding_of_decode_then_matmul(qtype, k, dtype):
    g = torch.Generator().manual_seed(5)
    m, n = 13, 21
    w = torch.randn(n, k, generator=g) * 0.05
    qbytes = torch.from_numpy(codecs.quantize(w.numpy(), qtype))
    x = torch.randn(2, m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = triton_gguf.linear_gguf(x, qbytes, qtype, k, bias)
    ref = gguf.reference_linear_gguf(x, qbytes, qtype, k, bias)
    assert got.dtype == dtype and got.shape == ref.shape == (2, m, n)
    wd = codecs.dequantize(qbytes, qtype).to(dtype).double()
    exact = F.linear(x.double(), wd, bias.double())
    # Both sides are one float32-accumulated dot product rounded to ``dtype``: each is within
    # a rounding of the output plus float32 summation error of the exact result.
    eps = torch.finfo(dtype).eps
    bound = eps * exact.abs() + 1e-5 * F.linear(x.double().abs(), wd.abs(), bias.double().abs())
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((got.double() - ref.double()).abs() <= 2 * bound).all()


def test_empty_input():
    qbytes = _random_blocks("q8_0", 5, 64, seed=6)
    assert triton_gguf.linear_gguf(torch.zeros(0, 64), qbytes, "q8_0", 64, None).shape == (0, 5)
