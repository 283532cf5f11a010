"""GGUF Q8_0: 32 weights → 34 bytes (8.5 bits per weight).

Byte layout of one block (little-endian)::

    byte  0      2                                      34
          +------+--------------------------------------+
          |  d   |  qs[0] qs[1] ...              qs[31] |
          | fp16 |  int8 each                           |
          +------+--------------------------------------+

    decode:  y[i] = d * qs[i]                (float32; the product is exact)

Encoder: a port of llama.cpp's ``quantize_row_q8_0_ref`` (``ggml/src/ggml-quants.c``)::

    amax = max |x|;  d = amax / 127;  id = d ? 1/d : 0
    d_stored = fp16(d);  qs[i] = (int8_t) roundf(x[i] * id)

Note that ``qs`` is computed from the float32 ``d``, not from the rounded fp16 one: that is
llama.cpp's choice and therefore ours. Decoder: ``dequantize_row_q8_0`` in torch ops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._cfloat import F32, fp16_bytes, roundf_to_int8_bytes, torch_fp16_at

BLOCK_ELEMS = 32
BLOCK_BYTES = 34
HEADER_BYTES = 2  # d: the block's grid (``grid_values``, ``encode_on_grid``)
CODES = (-127, 127)  # what the reference encoder writes (|roundf(x / d)| <= 127)


# Blocks encoded per pass: keeps the temporaries (2 MiB each) in cache; ~2x faster than one pass.
_CHUNK = 16384


def _encode_chunk(x: np.ndarray) -> np.ndarray:
    # C: amax = MAX(amax, fabsf(v)) from 0; the inputs are finite, so this is a plain max.
    amax = np.abs(x).max(axis=1, initial=F32(0))
    d = amax / F32(127)
    # id = d ? 1.0f/d : 0.0f. For subnormal d, 1/d is +inf and the int8 store writes 0 (see _cfloat).
    inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = fp16_bytes(d)
    out[:, 2:] = roundf_to_int8_bytes(x * inv[:, None])
    return out


def encode_blocks(x: np.ndarray) -> np.ndarray:
    """Quantize float32 blocks ``[n, 32]`` to GGUF Q8_0 blocks ``[n, 34]`` uint8."""
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for start in range(0, x.shape[0], _CHUNK):
            out[start:start + _CHUNK] = _encode_chunk(x[start:start + _CHUNK])
    return out


def grid_values(header: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset) float32 ``[n, 32]`` of blocks with headers ``[n, 2]``: a code q decodes to
    ``step * q - offset`` (offset 0 for Q8_0)."""
    d = np.ascontiguousarray(header).view("<f2").astype(F32)  # [n, 1]
    step = np.repeat(d, BLOCK_ELEMS, axis=1)
    return step, np.zeros_like(step)


def encode_on_grid(x: np.ndarray, header: np.ndarray) -> np.ndarray:
    """Blocks ``[n, 34]`` with the given headers ``[n, 2]`` (d) and the codes nearest to ``x``
    on that grid: ``clamp(roundf(x / d), -127, 127)`` (0 where d is 0)."""
    step, _ = grid_values(header)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step != 0, x / np.where(step != 0, step, F32(1)), F32(0)).astype(F32)
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = header
    out[:, 2:] = roundf_to_int8_bytes(np.clip(q, F32(CODES[0]), F32(CODES[1])))
    return out


def decode_blocks(blocks: Tensor) -> Tensor:
    """Dequantize GGUF Q8_0 blocks ``[n, 34]`` uint8 to float32 ``[n, 32]`` (pure torch ops)."""
    d = torch_fp16_at(blocks, 0)
    qs = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return qs * d[:, None]
