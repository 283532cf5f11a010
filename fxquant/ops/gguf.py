"""GGUF weight-only linear custom op. Its arguments carry the packed GGUF bytes and the block
type, so ``print(gm.code)`` says what runs and ``torch.export`` keeps it.

    fxquant.linear_gguf(x, qweight, qtype, in_features, bias)
        w = fxquant.codecs.dequantize(qweight, qtype, cols=in_features)   # float32 [out, in]
        y = F.linear(x, w.to(x.dtype), bias)

``qweight`` is uint8 ``[out_features, row_bytes]`` in exact GGUF layout (the bytes a ``.gguf``
file stores for ``Q4_K`` / ``Q8_0``); activations stay in the model's float dtype (weight-only).
The weight is decoded on every call: this op trades compute for memory, as llama.cpp's
dequantize-then-matmul path does. Where it runs:

    CUDA + triton:  triton_gguf.linear_gguf   decode inside the GEMM's K loop, no weight copy
    CPU:            gguf_cpu.linear_gguf       decode a tile of rows in cache, addmm into the output
    otherwise:      reference_linear_gguf     decode the whole weight, then F.linear

All three decode the same bits (``codecs.dequantize(...).to(x.dtype)``); ``reference_linear_gguf``
is the reference the others and the export are checked against.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import codecs
from ..errors import FormatError
from . import gguf_cpu


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
    if kernels is None and x.device.type != "cpu":
        return reference_linear_gguf(x, qweight, qtype, in_features, bias)
    key = _check(x, qweight, qtype, in_features)
    for name, t in (("qweight", qweight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise FormatError(f"fxquant::linear_gguf: {name} is on {t.device} but x is on {x.device}; move the "
                              "module and its inputs to one device (module.to(device))")
    if kernels is not None:
        return kernels.linear_gguf(x, qweight, key, in_features, bias)
    return gguf_cpu.linear_gguf(x, qweight, key, in_features, bias)


def _check(x: Tensor, qweight: Tensor, qtype: str, in_features: int) -> str:
    """The ``codecs.BLOCKS`` key of ``qtype``; FormatError when the bytes or ``x`` do not fit it."""
    key = codecs._qtype(qtype)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise FormatError(f"fxquant::linear_gguf: qweight must be a 2-D uint8 tensor, got {qweight.dtype} "
                          f"of shape {tuple(qweight.shape)}")
    if qweight.shape[1] != codecs.row_bytes(key, in_features):
        raise FormatError(f"fxquant::linear_gguf: {key.upper()} rows of {in_features} columns take "
                          f"{codecs.row_bytes(key, in_features)} bytes, qweight has {qweight.shape[1]}")
    if x.shape[-1] != in_features or not x.is_floating_point():
        raise FormatError(f"fxquant::linear_gguf: x must be floating point with {in_features} features, got "
                          f"{x.dtype} of shape {tuple(x.shape)}")
    return key


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
