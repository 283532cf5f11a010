"""GGUF block codecs: bit-exact NumPy encoders and torch decoders for Q4_K and Q8_0.

    float32 [rows, cols]  --quantize(w, "q4_k")-->  uint8 [rows, row_bytes]   (exact .gguf tensor bytes)
    uint8 [rows, row_bytes]  --dequantize(b, "q4_k")-->  float32 [rows, cols]  (torch, CPU or CUDA)

The encoders reproduce llama.cpp's reference quantizers (``quantize_row_q4_K_ref``,
``quantize_row_q8_0_ref``: what ``llama-quantize`` runs without an importance matrix) byte for
byte; the decoders reproduce ``dequantize_row_*`` and gguf-py's ``gguf.quants.dequantize`` bit for
bit. Rows are independent; a row is ``cols / block_elems`` blocks stored back to back.

One module per block type (``q4_k.py``, ``q8_0.py``), registered here from the size table
``BLOCKS``; there is no other registry.

Fixed grids (GPTQ rounding, `fxquant.passes.round_gptq`): a block's header (Q8_0's ``d``; Q4_K's
``d``, ``dmin`` and 6-bit scales and mins) fixes the values its codes can take, ``step * q -
offset``. `grid` cuts the headers out of encoded bytes, `grid_values` gives (step, offset) per
weight, and `quantize_on_grid` encodes weights with given headers, each code the nearest on that
grid::

    g = grid(quantize(w, "q4_k"), "q4_k")           # the reference encoder's scales and mins
    b = quantize_on_grid(w2, g, "q4_k")             # w2's codes on them; decodes to step*q - offset
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

__all__ = ["BLOCKS", "quantize", "dequantize", "row_bytes", "bits_per_weight", "grid", "grid_values",
           "quantize_on_grid", "code_range"]


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


def _float_rows(array: Any, who: str) -> np.ndarray:
    """``array`` as a finite float32 [rows, cols] NumPy array (FormatError otherwise)."""
    if isinstance(array, Tensor):
        array = array.detach().cpu()
        array = array.float().numpy() if array.dtype == torch.bfloat16 else array.numpy()
    x = np.asarray(array)
    if x.dtype.kind not in "fiu":
        raise FormatError(f"fxquant.codecs.{who}: expected a real float array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise FormatError(f"fxquant.codecs.{who}: expected a 2-D [rows, cols] array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))
        raise FormatError(f"fxquant.codecs.{who}: {bad.shape[0]} non-finite value(s) in the {list(x.shape)} "
                          f"input, first at [row, col] = {bad[0].tolist()}: {x[tuple(bad[0])]}; "
                          f"GGUF blocks need finite weights")
    return x


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
    x = _float_rows(array, "quantize")
    rows, cols = x.shape
    rb = row_bytes(key, cols)
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


def code_range(qtype: Any) -> tuple[int, int]:
    """The codes the reference encoder writes: (-127, 127) for Q8_0, (0, 15) for Q4_K."""
    return _MODULES[_qtype(qtype)].CODES


def grid(data: Union[Tensor, np.ndarray], qtype: Any) -> np.ndarray:
    """The block headers of encoded rows ``[rows, row_bytes]``: uint8 ``[rows, blocks * header]``
    (2 bytes per Q8_0 block, 16 per Q4_K block). Raises FormatError for rows that are not whole blocks."""
    key = _qtype(qtype)
    b = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    _, nbytes = BLOCKS[key]
    if b.dtype != np.uint8 or b.ndim != 2 or b.shape[1] % nbytes:
        raise FormatError(f"fxquant.codecs.grid: expected uint8 [rows, whole {key.upper()} blocks of {nbytes} bytes], "
                          f"got {b.dtype} {list(b.shape)}")
    head = _MODULES[key].HEADER_BYTES
    return np.ascontiguousarray(b.reshape(b.shape[0], -1, nbytes)[:, :, :head]).reshape(b.shape[0], -1)


def _headers(g: np.ndarray, key: str, rows: int, cols: int) -> np.ndarray:
    elems, _ = BLOCKS[key]
    head = _MODULES[key].HEADER_BYTES
    g = np.asarray(g)
    if g.dtype != np.uint8 or g.shape != (rows, row_bytes(key, cols) // BLOCKS[key][1] * head):
        raise FormatError(f"fxquant.codecs: a {key.upper()} grid for [{rows}, {cols}] weights is uint8 "
                          f"[{rows}, {cols // elems * head}], got {g.dtype} {list(g.shape)}")
    return np.ascontiguousarray(g).reshape(-1, head)


def grid_values(g: np.ndarray, qtype: Any, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset) float32 ``[rows, cols]`` of a grid: code q of weight (r, c) decodes to
    ``step[r, c] * q - offset[r, c]``, bit for bit as `dequantize` computes it."""
    key = _qtype(qtype)
    h = _headers(g, key, g.shape[0], cols)
    step, offset = _MODULES[key].grid_values(h)
    return step.reshape(g.shape[0], cols), offset.reshape(g.shape[0], cols)


def quantize_on_grid(array: Any, g: np.ndarray, qtype: Any) -> np.ndarray:
    """Encode float weights ``[rows, cols]`` with the given block headers (`grid`): each code is the
    nearest on that grid (Q8_0: ``roundf(x / d)`` clamped to +-127; Q4_K: the reference encoder's
    final re-quantization step). Returns uint8 ``[rows, row_bytes]``.

    Raises:
        FormatError: as `quantize`, or a grid whose shape does not fit the weights.
    """
    key = _qtype(qtype)
    x = _float_rows(array, "quantize_on_grid")
    rows, cols = x.shape
    rb = row_bytes(key, cols)
    elems, _ = BLOCKS[key]
    with np.errstate(all="ignore"):
        blocks = _MODULES[key].encode_on_grid(x.reshape(-1, elems), _headers(g, key, rows, cols))
    return blocks.reshape(rows, rb)
