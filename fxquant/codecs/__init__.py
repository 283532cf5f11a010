"""GGUF block codecs: bit-exact NumPy encoders and torch decoders for Q4_K and Q8_0.

    float32 [rows, cols]  --quantize(w, "q4_k")-->  uint8 [rows, row_bytes]   (exact .gguf tensor bytes)
    uint8 [rows, row_bytes]  --dequantize(b, "q4_k")-->  float32 [rows, cols]  (torch, CPU or CUDA)

The encoders reproduce llama.cpp's reference quantizers (``quantize_row_q4_K_ref``,
``quantize_row_q8_0_ref``: what ``llama-quantize`` runs without an importance matrix) byte for
byte; the decoders reproduce ``dequantize_row_*`` and gguf-py's ``gguf.quants.dequantize`` bit for
bit. Rows are independent; a row is ``cols / block_elems`` blocks stored back to back.

One module per block type (``q4_k.py``, ``q8_0.py``), registered here from the size table
``BLOCKS``; there is no other registry.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import FormatError
from . import q4_k, q8_0

# qtype -> (elements per block, bytes per block). The single source of block sizes.
BLOCKS: dict[str, tuple[int, int]] = {"q4_k": (256, 144), "q8_0": (32, 34)}

_MODULES: dict[str, ModuleType] = {"q4_k": q4_k, "q8_0": q8_0}
for _name, (_elems, _bytes) in BLOCKS.items():  # the table and the modules must agree
    if (_MODULES[_name].BLOCK_ELEMS, _MODULES[_name].BLOCK_BYTES) != (_elems, _bytes):
        raise ImportError(f"fxquant.codecs: {_name} module disagrees with BLOCKS[{_name!r}] = {(_elems, _bytes)}")

__all__ = ["BLOCKS", "quantize", "dequantize", "row_bytes", "bits_per_weight"]


def _qtype(qtype: Any) -> str:
    """Normalize ``"q4_k"`` / ``"Q4_K"`` (or a gguf ``GGMLQuantizationType``) to a ``BLOCKS`` key."""
    name = getattr(qtype, "name", qtype)
    key = name.lower() if isinstance(name, str) else None
    if key not in BLOCKS:
        raise FormatError(f"fxquant.codecs: unknown qtype {qtype!r}; expected one of {sorted(BLOCKS)} "
                          f"(or the GGUF names {[k.upper() for k in sorted(BLOCKS)]})")
    return key


def row_bytes(qtype: Any, cols: int) -> int:
    """Bytes of one quantized row of ``cols`` weights.

    Example: ``row_bytes("q4_k", 4608) == 18 * 144 == 2592``.
    Raises FormatError if ``cols`` is not a positive multiple of the block size.
    """
    key = _qtype(qtype)
    elems, nbytes = BLOCKS[key]
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols <= 0 or cols % elems:
        raise FormatError(f"fxquant.codecs: {key.upper()} needs cols to be a positive multiple of its block "
                          f"size {elems}, got cols={cols!r}")
    return int(cols) // elems * nbytes


def bits_per_weight(qtype: Any) -> float:
    """Storage cost including scales: 4.5 for Q4_K, 8.5 for Q8_0."""
    elems, nbytes = BLOCKS[_qtype(qtype)]
    return 8.0 * nbytes / elems


def quantize(array: Any, qtype: Any) -> np.ndarray:
    """Encode float weights to GGUF bytes, exactly as llama.cpp's reference quantizer does.

    Args:
        array: float array-like (NumPy, torch CPU tensor, nested lists) of shape ``[rows, cols]``;
            cast to float32 first, as llama.cpp does with f16/bf16 sources. ``cols`` must be a
            multiple of the block size (256 for Q4_K, 32 for Q8_0); all values must be finite.
        qtype: ``"q4_k"`` or ``"q8_0"`` (the GGUF names ``"Q4_K"`` / ``"Q8_0"`` are accepted too).
    Returns:
        uint8 array ``[rows, row_bytes(qtype, cols)]``: row-major blocks, as stored in a .gguf tensor.
    Raises:
        FormatError: unknown qtype, not 2-D, not a real numeric dtype, cols not a multiple of the
            block size, or a NaN / ±inf value (llama.cpp's output for those is not defined).

    Example::

        q = quantize(np.random.randn(8, 512).astype(np.float32), "Q4_K")   # -> uint8 [8, 288]

    Inputs whose scale overflows fp16 (max |w| above ~8e6 for Q8_0, ~1e6 for Q4_K) are encoded
    like llama.cpp does: the stored ``d`` is +inf and such blocks decode to ±inf / NaN.
    """
    key = _qtype(qtype)
    if isinstance(array, Tensor):
        array = array.detach().cpu()
        array = array.float().numpy() if array.dtype == torch.bfloat16 else array.numpy()
    x = np.asarray(array)
    if x.dtype.kind not in "fiu":
        raise FormatError(f"fxquant.codecs.quantize: expected a real float array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise FormatError(f"fxquant.codecs.quantize: expected a 2-D [rows, cols] array, got shape {x.shape}")
    rows, cols = x.shape
    rb = row_bytes(key, cols)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))
        raise FormatError(f"fxquant.codecs.quantize: {bad.shape[0]} non-finite value(s) in the [{rows}, {cols}] "
                          f"input, first at [row, col] = {bad[0].tolist()}: {x[tuple(bad[0])]}; "
                          f"{key.upper()} needs finite weights")
    elems, nbytes = BLOCKS[key]
    blocks = _MODULES[key].encode_blocks(x.reshape(-1, elems))
    return blocks.reshape(rows, rb)


def dequantize(data: Union[Tensor, np.ndarray], qtype: Any, cols: Union[int, None] = None) -> Tensor:
    """Decode GGUF bytes to float32, bit-exact with llama.cpp and gguf-py.

    Pure torch ops without data-dependent control flow: runs on CPU or CUDA (the device of
    ``data``) and under ``torch.compile(fullgraph=True)``.

    Args:
        data: uint8 tensor (or NumPy array) ``[rows, row_bytes]``.
        qtype: ``"q4_k"`` / ``"q8_0"`` (or ``"Q4_K"`` / ``"Q8_0"``).
        cols: expected number of columns; checked against ``row_bytes`` when given.
    Returns:
        float32 tensor ``[rows, cols]`` on ``data``'s device.
    Raises:
        FormatError: wrong dtype or ndim, a row length that is not whole blocks, or ``cols``
            that does not match it.

    Example::

        w = dequantize(torch.from_numpy(quantize(w_np, "q8_0")), "q8_0")
    """
    key = _qtype(qtype)
    elems, nbytes = BLOCKS[key]
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, Tensor) or data.dtype != torch.uint8:
        raise FormatError(f"fxquant.codecs.dequantize: expected a uint8 tensor, got "
                          f"{getattr(data, 'dtype', type(data).__name__)}")
    if data.dim() != 2:
        raise FormatError(f"fxquant.codecs.dequantize: expected a 2-D [rows, row_bytes] tensor, "
                          f"got shape {tuple(data.shape)}")
    rows, nb_row = data.shape
    if nb_row % nbytes:
        raise FormatError(f"fxquant.codecs.dequantize: {key.upper()} rows must be whole {nbytes}-byte blocks, "
                          f"got row_bytes={nb_row} (shape {tuple(data.shape)})")
    n_cols = nb_row // nbytes * elems
    if cols is not None and cols != n_cols:
        raise FormatError(f"fxquant.codecs.dequantize: {key.upper()} rows of {nb_row} bytes hold {n_cols} "
                          f"values, but cols={cols} was given (shape {tuple(data.shape)})")
    y = _MODULES[key].decode_blocks(data.reshape(-1, nbytes))
    return y.reshape(rows, n_cols)
