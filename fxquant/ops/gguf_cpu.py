"""The CPU path of ``fxquant::linear_gguf``: decode the weight a tile of rows at a time, straight
to the activation dtype, and multiply each tile into its columns of the output.

    for each tile of R output rows (R * in_features ~ 2**22 weights):
        w_tile = decode(qweight[rows])                  # bit-exact with codecs.dequantize(...).to(x.dtype)
        bf16 / fp16:  y_t = addmm(bias[rows, None], w_tile, x.T)     # [R, tokens]
                      out[:, rows] = y_t.T                           # a cache-blocked transpose
        otherwise:    out[:, rows] = addmm(bias[rows], x, w_tile.T)  # BLAS writes the strided slice

The decoder is ``gguf_native``'s C loop (one pass from bytes to the activation dtype) where a C
compiler builds it, else ``_Tiles``' torch passes below (``FXQUANT_GGUF_NATIVE=0`` chooses them).
oneDNN's bf16 GEMM ran 4-50% faster with the weight tile as its first operand (GEMM-only runs;
docs/benchmarks.md), and the transpose back, in C where the library is built, costs less than
that. float32 keeps the weight second: MKL then sums each output as ``F.linear`` does, bit for
bit on the shapes tested; in bf16 / fp16 oneDNN may block a long sum differently (a rounding).

Decoding the whole weight first (``reference_linear_gguf``) makes five passes over a float32
copy of the weight that does not fit in cache and page-faults at every call; here the passes run
over one tile, and so do the per-block scales, computed tile by tile.

The torch passes are chosen for what torch's CPU kernels vectorize: contiguous uint8 ops, dtype copies,
and one multiply and one add whose scale broadcasts over 32 contiguous weights (an ``addcmul``
with two such broadcasts runs 6x slower). The arithmetic is the decoders' own, so the values are
the same bits: Q8_0 ``d * q`` (exact), Q4_K ``(d * sc) * q`` (exact) minus ``dmin * m``, one rounding.

Q4_K stores sub-block 2g in the low nibbles and 2g+1 in the high nibbles of byte group g: the
two nibble passes write contiguous runs, and a ``torch.stack`` (a memcpy-speed copy) interleaves
them back into the natural order, so the GEMM sees the same weight matrix as
``reference_linear_gguf``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..codecs import BLOCKS
from . import gguf_native

# Weights per tile: 2**22 (8 MiB of bf16). Narrower tiles make more, narrower GEMMs, which costs more
# than keeping the tile in cache saves (measured).
TILE_ELEMS = 1 << 22
MIN_TILE_ROWS = 16


def _fp16_rows(blocks: Tensor, count: int) -> Tensor:
    """float32 [count, n]: the first ``count`` little-endian fp16 of every block (exact, inf/NaN too).

    Read as int16 columns of the block bytes: a [n, count] gather of 2-byte items would run
    TensorIterator's per-row loop n times; this runs ``count`` strided rows.
    """
    n, nbytes = blocks.shape
    if blocks.is_contiguous() and blocks.storage_offset() % 2 == 0:
        halves = blocks.view(torch.int16)[:, :count]
    else:
        halves = blocks[:, : 2 * count].contiguous().view(torch.int16)
    return halves.t().view(torch.float16).float()


def _q4_k_scales(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(d * sc, dmin * m) for every sub-block j, float32 [n, 4, 2, 1] (j = 2g + h at [:, g, h]).

    Worked on the transposed [12, n] scale bytes, so every op runs over n contiguous blocks.
    """
    n = blocks.shape[0]
    st = blocks[:, 4:16].t().contiguous()  # [12, n] uint8
    sm = torch.empty(2, 8, n, dtype=torch.uint8)  # [sc | m, sub-block j, block]
    # get_scale_min_k4, as in codecs.q4_k.decode_blocks: j < 4 ...
    torch.bitwise_and(st[0:8].view(2, 4, n), 63, out=sm[:, 0:4])
    # ... and j >= 4: low (sc) / high (m) nibble of byte 8 + j - 4, top two bits of byte j - 4 / j
    low_high = torch.stack([st[8:12] & 15, st[8:12] >> 4])
    torch.bitwise_or(low_high, ((st[0:8] >> 6) * 16).view(2, 4, n), out=sm[:, 4:8])  # uint8 << is slow
    scaled = _fp16_rows(blocks, 2)[:, None, :] * sm.float()  # [2, 8, n]; exact products
    d_sub, m_sub = scaled.view(2, 4, 2, n).permute(0, 3, 1, 2)
    return d_sub.contiguous()[..., None], m_sub.contiguous()[..., None]


class _Tiles:
    """Scratch buffers for one tile, reused by every tile of a call; ``lib``: the C decoder or None."""

    def __init__(self, qtype: str, rows: int, cols: int, dtype: torch.dtype, lib: Optional[Any]):
        elems, nbytes = BLOCKS[qtype]
        nb = rows * cols // elems
        self.qtype, self.dtype, self.lib = qtype, dtype, lib
        if lib is not None:  # the C loop writes dtype, or float32 then cast (float64)
            direct = dtype in gguf_native.DTYPES
            self.scratch = torch.empty(rows * cols, dtype=dtype if direct else torch.float32)
            self.out = None if direct else torch.empty(rows * cols, dtype=dtype)
            return
        if qtype == "q4_k":
            self.lo, self.hi = torch.empty(nb, 128, dtype=torch.uint8), torch.empty(nb, 128, dtype=torch.uint8)
            self.nat = torch.empty(nb, 4, 2, 32, dtype=torch.uint8)
        self.scratch = torch.empty(rows * cols, dtype=torch.float32)
        self.out = None if dtype == torch.float32 else torch.empty(rows * cols, dtype=dtype)

    def decode(self, blocks: Tensor) -> Tensor:
        """Decode ``blocks`` [n, block_bytes] to a flat tile in the activation dtype (row-major weights)."""
        n = blocks.shape[0]
        f = self.scratch[: n * BLOCKS[self.qtype][0]]
        if self.lib is not None:
            gguf_native.decode_into(self.lib, blocks.contiguous(), self.qtype, f)
        elif self.qtype == "q8_0":
            scale, _ = _scales(self.qtype, blocks)
            fv = f.view(n, 32)
            fv.copy_(blocks[:, 2:].view(torch.int8))
            fv.mul_(scale)
        else:
            scale, minus = _scales(self.qtype, blocks)
            raw = blocks[:, 16:]  # rows of 128 contiguous bytes: read in place
            lo, hi, nat = self.lo[:n], self.hi[:n], self.nat[:n]
            torch.bitwise_and(raw, 15, out=lo)
            torch.bitwise_right_shift(raw, 4, out=hi)
            # natural order: sub-block 2g + h = nibble h of byte group g; stack is a memcpy-speed
            # interleave, and the conversion after it reads contiguous bytes
            torch.stack((lo.view(n, 4, 32), hi.view(n, 4, 32)), dim=2, out=nat)
            fv = f.view(n, 4, 2, 32)
            fv.copy_(nat)
            fv.mul_(scale).sub_(minus)
        if self.out is None:
            return f
        w = self.out[: f.numel()]
        w.copy_(f)
        return w


def _scales(qtype: str, blocks: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    if qtype == "q8_0":
        return _fp16_rows(blocks, 1).t(), None
    return _q4_k_scales(blocks)


def _tile_rows(rows: int, cols: int) -> int:
    return min(rows, max(MIN_TILE_ROWS, TILE_ELEMS // cols))


def dequantize(qweight: Tensor, qtype: str, cols: int, dtype: torch.dtype, native: bool = True) -> Tensor:
    """The whole weight [rows, cols] in ``dtype`` through the tile decoder (``native=False``: the
    torch passes, even where the C decoder is built).

    Equal to ``codecs.dequantize(qweight, qtype).to(dtype)`` bit for bit; for tests and benchmarks.
    """
    elems, nbytes = BLOCKS[qtype]
    rows = qweight.shape[0]
    tiles = _Tiles(qtype, rows, cols, dtype, gguf_native.library() if native else None)
    return tiles.decode(qweight.reshape(-1, nbytes)).view(rows, cols).clone()


def linear_gguf(x: Tensor, qweight: Tensor, qtype: str, in_features: int, bias: Optional[Tensor],
                native: bool = True) -> Tensor:
    """``reference_linear_gguf`` computed a tile of output features at a time (CPU tensors);
    ``native=False`` decodes with the torch passes even where the C decoder is built."""
    elems, nbytes = BLOCKS[qtype]
    n_out = qweight.shape[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    out = torch.empty(x2d.shape[0], n_out, dtype=x.dtype)
    if x2d.shape[0] == 0:
        return out.reshape(*lead, n_out)
    blocks = qweight.reshape(-1, nbytes)
    per_row = in_features // elems
    rows = _tile_rows(n_out, in_features)
    lib = gguf_native.library() if native else None
    tiles = _Tiles(qtype, rows, in_features, x.dtype, lib)
    # 2-byte dtypes (oneDNN): the tile first, then a transpose; others (BLAS): straight into out
    y_t = torch.empty(rows, x2d.shape[0], dtype=x.dtype) if x.element_size() == 2 else None
    bias = None if bias is None else bias.to(x.dtype)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        w = tiles.decode(blocks[r0 * per_row:r1 * per_row]).view(r1 - r0, in_features)
        b = None if bias is None else bias[r0:r1]
        if y_t is None:
            _addmm(b, x2d, w.t(), out[:, r0:r1])
        else:
            _addmm(None if b is None else b[:, None], w, x2d.t(), y_t[: r1 - r0])
            gguf_native.transpose_into(lib, y_t[: r1 - r0], out[:, r0:r1])
    return out.reshape(*lead, n_out)


def _addmm(bias: Optional[Tensor], a: Tensor, b: Tensor, out: Tensor) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)
