"""GGUF Q4_K: 256 weights (a super-block of 8 sub-blocks of 32) → 144 bytes (4.5 bits per weight).

Byte layout of one block (little-endian)::

    byte 0      2      4                 16                                         144
         +------+------+-----------------+--------------------------------------------+
         |  d   | dmin | scales[12]      | qs[128]: 4 groups of 32 bytes               |
         | fp16 | fp16 | 8 x (sc, m) 6b  | byte 32g+l = q[64g+l] | q[64g+32+l] << 4    |
         +------+------+-----------------+--------------------------------------------+

    scales[12], 6-bit sc[j] (sub-block scale) and m[j] (sub-block min), j = 0..7:
         byte 0..3 : sc[0..3] | (sc[4..7] >> 4) << 6      (bits 7:6 = high bits of sc[4..7])
         byte 4..7 : m[0..3]  | (m[4..7]  >> 4) << 6
         byte 8..11: (sc[4..7] & 15) | (m[4..7] & 15) << 4

    decode (sub-block j holds values 32j..32j+31):  y = (d*sc[j]) * q - (dmin*m[j])   (float32)

Encoder: a port of llama.cpp's ``quantize_row_q4_K_ref`` (``ggml/src/ggml-quants.c``):

    per sub-block:  w = sqrt(mean(x²)) + |x|;  (scale, min, L) = make_qkx2_quants(32, 15, x, w,
                    rmin=-1, rdelta=0.1, nstep=20)  — a weighted least-squares search over 21
                    candidate scales for the affine grid  x ≈ scale*L - min,  L in 0..15
    per block:      sc = nearest(63/max(scale) * scale), m = nearest(63/max(min) * min), clamp 63;
                    d = fp16(max(scale)/63), dmin = fp16(max(min)/63)
    requantize:     L = clamp(nearest((x + dmin*m) / (d*sc)), 0, 15) where d*sc != 0, else keep L

Bit-exactness rests on replaying the C float32 arithmetic in its order: every running sum is
accumulated element by element (i = 0..31), products are rounded before they are added (no FMA),
and ``nearest_int`` is emulated on the float bits (see ``_cfloat``). The work is vectorized over
all sub-blocks of all rows at once; the only Python loops run over the 32 positions of a
sub-block, the 21 candidate scales and the 8 sub-blocks of a block.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._cfloat import F32, fp16_bytes, fp16_to_f32, nearest_int, torch_fp16_at

BLOCK_ELEMS = 256
BLOCK_BYTES = 144
HEADER_BYTES = 16  # d, dmin, scales[12]: the block's grid (``grid_values``, ``encode_on_grid``)
CODES = (0, 15)
_SUB = 32  # elements per sub-block
_NSUB = BLOCK_ELEMS // _SUB
# Super-blocks encoded per pass: keeps the [32, sub-blocks] work arrays (1 MiB each) in cache.
_CHUNK = 1024

# make_qkx2_quants(32, 15, x, w, L, &min, Laux, -1.f, 0.1f, 20, false): the candidate numerators
# (rmin + rdelta*is + nmax), each rounded in float32 as C evaluates it, left to right.
_NMAX = 15
_STEPS = [(F32(-1.0) + F32(0.1) * F32(i)) + F32(_NMAX) for i in range(21)]


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """``float s = 0; for (i = 0; i < 32; ++i) s += a[i];`` over axis 0, in that order.

    Reducing over the slow axis of a C-contiguous array, NumPy adds whole rows one after the
    other, starting from ``initial``; only a reduction over the fast axis is pairwise (numpy.sum,
    Notes), which rounds differently, and the reference vectors' FMA-sensitive blocks catch that.
    """
    return np.add.reduce(a, axis=0, initial=F32(0))


def _codes(v: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``MAX(0, MIN(15, nearest_int(v)))`` as float32 into ``out``; ``v`` is overwritten."""
    v += F32(12582912.0)  # nearest_int's magic constant, see _cfloat.nearest_int
    bits = v.view(np.int32)
    bits &= np.int32(0x007FFFFF)
    bits -= np.int32(0x00400000)
    np.clip(bits, 0, _NMAX, out=bits)
    np.copyto(out, bits, casting="unsafe")
    return out


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` for n=32, nmax=15, rmin=-1, rdelta=0.1, nstep=20, use_mad=false.

    ``x``, ``w``: float32 ``[32, S]`` (position-major, one column per sub-block).
    Returns (scale [S], the_min [S] = -min, codes L [32, S] as float32).
    """
    mx = x.max(axis=0)
    mn0 = mn = np.minimum(x.min(axis=0), F32(0))  # if (min > 0) min = 0;
    flat = mx == mn  # C returns early: L = 0, scale = 0, the_min = -min
    # sum_w = w[0]; sum_x = sum_w*x[0]; then i = 1..31 (not started from 0: keeps C's rounding).
    sum_w, sum_x = w[0].copy(), w[0] * x[0]
    for i in range(1, _SUB):
        sum_w += w[i]
        sum_x += w[i] * x[i]

    # [32, S] scratch arrays reused by every candidate (the search is allocation-bound otherwise).
    t, u, laux = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    iscale = F32(_NMAX) / (mx - mn)
    scale = F32(1) / iscale
    np.subtract(x, mn, out=t)
    t *= iscale
    L = _codes(t, np.empty_like(x))
    np.multiply(scale, L, out=t)  # diff = scale * L[i] + min - x[i]; best_error += w * diff*diff
    t += mn
    t -= x
    t *= t
    t *= w
    best_error = _seq_sum(t)

    for step in _STEPS:
        # `min` is updated when a candidate wins, so later candidates use the new min, as in C.
        iscale = step / (mx - mn)
        np.subtract(x, mn, out=t)
        t *= iscale
        _codes(t, laux)
        wl = np.multiply(w, laux, out=t)
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(np.multiply(wl, laux, out=u))  # w*l*l == (w*l)*l
        sum_xl = _seq_sum(np.multiply(wl, x, out=wl))  # w*l*x[i] == (w*l)*x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        np.multiply(this_scale, laux, out=t)  # diff = this_scale * Laux[i] + this_min - x[i]
        t += this_min
        t -= x
        t *= t
        t *= w
        cur_error = _seq_sum(t)
        win = (D > 0) & (cur_error < best_error)
        np.copyto(L, laux, where=win)
        best_error = np.where(win, cur_error, best_error)
        scale = np.where(win, this_scale, scale)
        mn = np.where(win, this_min, mn)

    L[:, flat] = 0
    return np.where(flat, F32(0), scale), -np.where(flat, mn0, mn), L


def _running_max(v: np.ndarray) -> np.ndarray:
    """``m = 0; for j: if (v[j] > m) m = v[j];`` over axis 1 (NaN never wins, unlike np.max)."""
    m = np.zeros(v.shape[0], dtype=F32)
    for j in range(v.shape[1]):
        m = np.where(v[:, j] > m, v[:, j], m)
    return m


def _six_bit(inv: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``uint8_t l = nearest_int(inv*v); l = MIN(63, l);`` (the int → uint8 store wraps mod 256)."""
    return np.minimum(nearest_int(inv[:, None] * v) & 0xFF, 63).astype(np.uint8)


def _encode_chunk(xb: np.ndarray) -> np.ndarray:
    n = xb.shape[0]
    x = np.ascontiguousarray(xb.reshape(n * _NSUB, _SUB).T)  # [32, S]
    sum_x2 = _seq_sum(x * x)
    av_x = np.sqrt(sum_x2 / F32(_SUB))
    w = av_x + np.abs(x)
    scale, the_min, L = _make_qkx2_quants(x, w)
    scales, mins = scale.reshape(n, _NSUB), the_min.reshape(n, _NSUB)

    max_scale, max_min = _running_max(scales), _running_max(mins)
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
    ls, lm = _six_bit(inv_scale, scales), _six_bit(inv_min, mins)  # [n, 8] each, values 0..63

    out = np.empty((n, BLOCK_BYTES), dtype=np.uint8)
    d, dmin = max_scale / F32(63), max_min / F32(63)
    out[:, 0:2], out[:, 2:4] = fp16_bytes(d), fp16_bytes(dmin)
    out[:, 4:8] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 8:12] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 12:16] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)

    # The C code re-reads (sc, m) with get_scale_min_k4 from the packed bytes; the 6-bit packing is
    # lossless, so they are ls and lm. d*sc == 0 (sc == 0, or fp16(d) underflowed) keeps the codes
    # of the search.
    dsub = (fp16_to_f32(d)[:, None] * ls.astype(F32)).reshape(-1)
    dmsub = (fp16_to_f32(dmin)[:, None] * lm.astype(F32)).reshape(-1)
    requant = _codes((x + dmsub) / dsub, np.empty_like(x))
    L = np.where(dsub != 0, requant, L).astype(np.uint8)

    out[:, 16:] = _pack_codes(L.T.reshape(n, BLOCK_ELEMS))
    return out


def _pack_codes(L: np.ndarray) -> np.ndarray:
    """uint8 codes ``[n, 256]`` (0..15) -> ``qs`` ``[n, 128]``: sub-blocks 2g (low nibble) and
    2g+1 (high nibble) share byte group g."""
    L = L.reshape(L.shape[0], _NSUB // 2, 2, _SUB)
    return (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(L.shape[0], 128)


def grid_values(header: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset) float32 ``[n, 256]`` of blocks with headers ``[n, 16]``: a code q decodes to
    ``step * q - offset``, i.e. ``(d*sc[j]) * q - dmin*m[j]`` in sub-block j, rounded once, as the
    decoder computes it (both products are exact in float32)."""
    h = np.ascontiguousarray(header)
    d, dmin = h[:, 0:2].copy().view("<f2").astype(F32), h[:, 2:4].copy().view("<f2").astype(F32)  # [n, 1]
    s = h[:, 4:16].astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)  # get_scale_min_k4
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    step, offset = d * sc.astype(F32), dmin * m.astype(F32)  # [n, 8]
    return np.repeat(step, _SUB, axis=1), np.repeat(offset, _SUB, axis=1)


def encode_on_grid(x: np.ndarray, header: np.ndarray) -> np.ndarray:
    """Blocks ``[n, 144]`` with the given headers ``[n, 16]`` and the codes nearest to ``x`` on that
    grid: the reference encoder's last step, ``clamp(nearest_int((x + dmin*m) / (d*sc)), 0, 15)``
    (0 where d*sc is 0). With the encoder's own headers it gives back the encoder's bytes
    (except in sub-blocks whose d*sc is 0, where every code decodes to the same value)."""
    step, offset = grid_values(header)
    with np.errstate(all="ignore"):
        v = (x + offset) / np.where(step != 0, step, F32(1))
        L = np.where(step != 0, _codes(v, np.empty_like(v)), F32(0)).astype(np.uint8)
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, :HEADER_BYTES] = header
    out[:, HEADER_BYTES:] = _pack_codes(L)
    return out


def encode_blocks(x: np.ndarray) -> np.ndarray:
    """Quantize float32 blocks ``[n, 256]`` to GGUF Q4_K blocks ``[n, 144]`` uint8."""
    out = np.empty((x.shape[0], BLOCK_BYTES), dtype=np.uint8)
    # Degenerate blocks (subnormal ranges, flat sub-blocks, fp16 overflow) divide by 0 or inf on
    # purpose, exactly as the C code does; their results are masked or clamped like in C.
    with np.errstate(all="ignore"):
        for start in range(0, x.shape[0], _CHUNK):
            out[start:start + _CHUNK] = _encode_chunk(x[start:start + _CHUNK])
    return out


def decode_blocks(blocks: Tensor) -> Tensor:
    """Dequantize GGUF Q4_K blocks ``[n, 144]`` uint8 to float32 ``[n, 256]`` (pure torch ops)."""
    n = blocks.shape[0]
    d = torch_fp16_at(blocks, 0)
    dmin = torch_fp16_at(blocks, 2)
    s = blocks[:, 4:16].to(torch.int32)
    # get_scale_min_k4, for all 8 sub-blocks at once.
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, _NSUB, _SUB).to(torch.float32)
    d_sub = (d[:, None] * sc.to(torch.float32))[:, :, None]
    m_sub = (dmin[:, None] * m.to(torch.float32))[:, :, None]
    # d_sub*q is exact in float32 (11 + 6 + 4 significant bits), so -m_sub + d_sub*q rounds once,
    # like C's d1*q - m1, fused or not; addcmul saves eager mode one pass over the output.
    return torch.addcmul(-m_sub, d_sub, q).reshape(n, BLOCK_ELEMS)
