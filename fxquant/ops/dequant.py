"""Dequantize ops: a quantized weight read back as a float weight, inside a float graph.

    fxquant.dequantize_int8(q, scale, dtype)                 (q.float() * scale[:, None]).to(dtype)
    fxquant.dequantize_gguf(qweight, qtype, in_features, dtype)  codecs.dequantize(qweight).to(dtype)

``round_gptq`` writes them: a rounded linear reads ``aten.linear(x, fxquant.dequantize_int8(q, s,
bf16))`` until its lowering takes ``q`` and ``s`` as they are (``linear_w8a8`` / ``linear_gguf``),
so the graph between the two passes runs, prints what it computes, and holds the codes (one
byte per weight or less) instead of a second float copy of the weight. Both decode a slice of rows
at a time into the output (the float32 temporary is one 16 MiB slice); ``int8_rows`` and
``gguf_rows`` are the per-slice computations, which ``round_gptq``'s forwards use to multiply by a
rounded weight without materializing it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import codecs

SLICE_ELEMS = 1 << 22  # float32 temporaries: one 16 MiB slice of rows, never the whole weight


def int8_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``(q.float() * scale[:, None]).to(dtype)`` for a slice of rows (the reference computation)."""
    w = q.float()
    w.mul_(scale.float()[:, None])  # in place: one float32 slice, not two
    return w.to(dtype)


def gguf_rows(qweight: Tensor, qtype: str, in_features: int, dtype: torch.dtype) -> Tensor:
    """``codecs.dequantize(qweight).to(dtype)`` for a slice of rows (the reference computation)."""
    return codecs.dequantize(qweight, qtype, cols=in_features).to(dtype)


def _by_rows(rows: int, cols: int, dtype: torch.dtype, device: torch.device, fn) -> Tensor:
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    step = max(1, SLICE_ELEMS // max(1, cols))
    for i in range(0, rows, step):
        out[i:i + step] = fn(slice(i, i + step))
    return out


@torch.library.custom_op("fxquant::dequantize_int8", mutates_args=())
def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """int8 codes ``q`` [out, in] times their per-row ``scale`` [out], float32, rounded once to ``dtype``."""
    return _by_rows(q.shape[0], q.shape[1], dtype, q.device, lambda r: int8_rows(q[r], scale[r], dtype))


@dequantize_int8.register_fake
def _(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.custom_op("fxquant::dequantize_gguf", mutates_args=())
def dequantize_gguf(qweight: Tensor, qtype: str, in_features: int, dtype: torch.dtype) -> Tensor:
    """GGUF bytes ``qweight`` [out, row_bytes] decoded (`fxquant.codecs.dequantize`, float32), rounded once to ``dtype``."""
    return _by_rows(qweight.shape[0], in_features, dtype, qweight.device,
                    lambda r: gguf_rows(qweight[r], qtype, in_features, dtype))


@dequantize_gguf.register_fake
def _(qweight: Tensor, qtype: str, in_features: int, dtype: torch.dtype) -> Tensor:
    return qweight.new_empty((qweight.shape[0], in_features), dtype=dtype)
