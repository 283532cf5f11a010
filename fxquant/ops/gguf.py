"""GGUF weight-only linear custom op. Its arguments carry the packed GGUF bytes and the block
type, so ``print(gm.code)`` says what runs and ``torch.export`` keeps it.

    fxquant.linear_gguf(x, qweight, qtype, in_features, bias)
        w = fxquant.codecs.dequantize(qweight, qtype, cols=in_features)   # float32 [out, in]
        y = F.linear(x, w.to(x.dtype), bias)

``qweight`` is uint8 ``[out_features, row_bytes]`` in exact GGUF layout (the bytes a ``.gguf``
file stores for ``Q4_K`` / ``Q8_0``); activations stay in the model's float dtype (weight-only).
The weight is decoded on every call: this op trades compute for memory, as llama.cpp's
dequantize-then-matmul path does, and it is the reference the export is checked against.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import codecs


@functools.cache
def triton_kernels() -> Optional[ModuleType]:
    """``fxquant.ops.triton_gguf``, imported on first use, or None when triton is not installed."""
    try:
        from . import triton_gguf
    except ImportError:
        return None
    return triton_gguf


@torch.library.custom_op("fxquant::linear_gguf", mutates_args=())
def linear_gguf(x: Tensor, qweight: Tensor, qtype: str, in_features: int, bias: Optional[Tensor]) -> Tensor:
    """Weight-only GGUF linear on ``qweight`` [out, row_bytes] (uint8).

    CUDA inputs run the fused Triton dequant-GEMM when triton is installed; everything else
    decodes and multiplies (``reference_linear_gguf``).
    """
    kernels = triton_kernels() if x.is_cuda else None
    if kernels is not None:
        return kernels.linear_gguf(x, qweight, codecs._qtype(qtype), in_features, bias)
    return reference_linear_gguf(x, qweight, qtype, in_features, bias)


def reference_linear_gguf(x: Tensor, qweight: Tensor, qtype: str, in_features: int, bias: Optional[Tensor]) -> Tensor:
    """Decode ``qweight`` to float32, round to ``x``'s dtype, ``F.linear``: the reference on any device."""
    w = codecs.dequantize(qweight, qtype, cols=in_features)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@linear_gguf.register_fake
def _(x, qweight, qtype, in_features, bias):
    torch._check(x.shape[-1] == in_features, lambda: f"linear_gguf: x has {x.shape[-1]} features, expected {in_features}")
    torch._check(qweight.dtype == torch.uint8, lambda: f"linear_gguf: qweight must be uint8, got {qweight.dtype}")
    torch._check(qweight.shape[1] == codecs.row_bytes(qtype, in_features),
                 lambda: f"linear_gguf: qweight rows have {qweight.shape[1]} bytes, expected "
                         f"{codecs.row_bytes(qtype, in_features)} for {qtype} with {in_features} columns")
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
