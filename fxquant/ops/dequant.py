"""Dequantize ops: a quantized weight read back as a float weight, inside a float graph.

    fxquant.dequantize_int8(q, scale, dtype)                 (q.float() * scale[:, None]).to(dtype)
    fxquant.dequantize_gguf(qweight, qtype, in_features, dtype)  codecs.dequantize(qweight).to(dtype)

``round_gptq`` writes them: a rounded linear reads ``aten.linear(x, fxquant.dequantize_int8(q, s,
bf16))`` until its lowering takes ``q`` and ``s`` as they are (``linear_w8a8`` / ``linear_gguf``),
so the graph between the two passes runs, prints what it computes, and holds the codes (one
byte per weight or less) instead of a second float copy of the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import codecs


@torch.library.custom_op("fxquant::dequantize_int8", mutates_args=())
def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 codes ``q`` [out, in] times their per-row ``scale`` [out], float32, rounded once to ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


@dequantize_int8.register_fake
def _(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.custom_op("fxquant::dequantize_gguf", mutates_args=())
def dequantize_gguf(qweight: Tensor, qtype: str, in_features: int, dtype: torch.dtype) -> Tensor:
    """GGUF bytes ``qweight`` [out, row_bytes] decoded (`fxquant.codecs.dequantize`, float32), rounded once to ``dtype``."""
    return codecs.dequantize(qweight, qtype, cols=in_features).to(dtype)


@dequantize_gguf.register_fake
def _(qweight: Tensor, qtype: str, in_features: int, dtype: torch.dtype) -> Tensor:
    return qweight.new_empty((qweight.shape[0], in_features), dtype=dtype)
