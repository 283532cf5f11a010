"""The CPU path of ``fxquant::linear_gguf`` (``fxquant.ops.gguf_cpu``): the tile decoder is
bit-exact with ``fxquant.codecs`` (llama.cpp's vectors, random bytes, every activation dtype) and
the op stays within a rounding of decode-then-matmul (``reference_linear_gguf``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fxquant import codecs
from fxquant.errors import FormatError
from fxquant.ops import gguf, gguf_cpu

DATA = Path(__file__).parent / "data" / "gguf"
QTYPES = ("q4_k", "q8_0")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        ((a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())).all())


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    elems, nbytes = codecs.BLOCKS[qtype]
    b = g.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    n_scales = 2 if qtype == "q4_k" else 1
    scales = (g.standard_normal((b.shape[0], n_scales)) * 0.01).astype(np.float16)
    b[:, : 2 * n_scales] = scales.view(np.uint8).reshape(b.shape[0], 2 * n_scales)
    return torch.from_numpy(b.reshape(rows, -1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_bit_exact_on_llama_cpp_vectors(qtype, dtype):
    z = np.load(DATA / f"{qtype}_reference.npz")
    for name in z["case_names"]:
        qbytes = torch.from_numpy(z[f"{name}__qbytes"])
        deq = torch.from_numpy(z[f"{name}__dequant"])
        with np.errstate(all="ignore"):
            got = gguf_cpu.dequantize(qbytes, qtype, deq.shape[1], dtype)
        assert same_bits(got, deq.to(dtype)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_decode_bit_exact_on_random_bytes(qtype, dtype):
    qbytes = random_blocks(qtype, 37, 768, seed=1)  # every scale-byte bit pattern occurs
    assert same_bits(gguf_cpu.dequantize(qbytes, qtype, 768, dtype), codecs.dequantize(qbytes, qtype).to(dtype))


def test_decode_reads_unaligned_and_sliced_bytes():
    qbytes = random_blocks("q8_0", 12, 64, seed=2)
    storage = torch.zeros(qbytes.numel() + 1, dtype=torch.uint8)
    odd = storage[1:].view(qbytes.shape)  # odd storage offset: the fp16 scales cannot be read as int16 in place
    odd.copy_(qbytes)
    assert same_bits(gguf_cpu.dequantize(odd, "q8_0", 64, torch.float32), codecs.dequantize(qbytes, "q8_0"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype,k", [("q4_k", 512), ("q8_0", 160)])
def test_op_within_rounding_of_decode_then_matmul(qtype, k, dtype, monkeypatch):
    monkeypatch.setattr(gguf_cpu, "TILE_ELEMS", 16 * k)  # several tiles, and a short last one
    monkeypatch.setattr(gguf_cpu, "MIN_TILE_ROWS", 16)
    n = 53
    g = torch.Generator().manual_seed(3)
    qbytes = torch.from_numpy(codecs.quantize((torch.randn(n, k, generator=g) * 0.05).numpy(), qtype))
    x = torch.randn(3, 7, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    got = torch.ops.fxquant.linear_gguf(x, qbytes, qtype, k, bias)
    ref = gguf.reference_linear_gguf(x, qbytes, qtype, k, bias)
    assert got.dtype == dtype and got.shape == ref.shape == (3, 7, n)
    w = codecs.dequantize(qbytes, qtype).to(dtype).double()
    exact = F.linear(x.double(), w, bias.double())
    scale = F.linear(x.double().abs(), w.abs(), bias.double().abs())
    eps = torch.finfo(dtype).eps
    assert ((got.double() - exact).abs() <= eps * exact.abs() + 1e-5 * scale).all()
    assert ((got.double() - ref.double()).abs() <= 2 * eps * exact.abs() + 2e-5 * scale).all()


def test_op_on_empty_input_and_without_bias():
    qbytes = random_blocks("q4_k", 5, 256, seed=4)
    assert torch.ops.fxquant.linear_gguf(torch.zeros(0, 256), qbytes, "q4_k", 256, None).shape == (0, 5)
    x = torch.randn(4, 256)
    torch.testing.assert_close(torch.ops.fxquant.linear_gguf(x, qbytes, "Q4_K", 256, None),
                               gguf.reference_linear_gguf(x, qbytes, "q4_k", 256, None))


def test_op_rejects_bytes_that_do_not_fit():
    qbytes = random_blocks("q8_0", 5, 64, seed=5)
    with pytest.raises(FormatError, match="qweight has 68"):
        gguf.linear_gguf(torch.randn(2, 96), qbytes, "q8_0", 96, None)
    with pytest.raises(FormatError, match="unknown qtype"):
        gguf.linear_gguf(torch.randn(2, 64), qbytes, "q5_k", 64, None)
    with pytest.raises(FormatError, match="uint8"):
        gguf.linear_gguf(torch.randn(2, 64), qbytes.view(torch.int8), "q8_0", 64, None)
