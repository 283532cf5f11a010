"""C float32 semantics that a bit-exact port of ggml's reference quantizers needs.

NumPy side (encoders): ggml's ``nearest_int`` and ``roundf`` → ``int8_t`` as gcc compiles them on
x86-64, and ``GGML_FP32_TO_FP16`` as little-endian bytes. Torch side (decoders): fp16 bytes →
float32 with integer ops and a same-width bitcast only, so it traces under ``torch.compile``.

Every helper works on whole arrays; the codecs vectorize over blocks and never loop over them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

F32 = np.float32
# 1.5 * 2**23: adding it to |v| < 2**22 leaves round-half-even(v) in the low mantissa bits.
_MAGIC = F32(12582912.0)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int(float)``, bit for bit, on a float32 array; returns int32.

    C: ``val = fval + 12582912.f; memcpy(&i, &val, 4); return (i & 0x7fffff) - 0x400000;``
    This is round-half-to-even for |v| <= 4194303 and, with the assert compiled out (NDEBUG),
    well-defined garbage elsewhere: ±inf → -4194304 and NaN → 0, which the callers' clamps turn
    into 0. Emulating the bit trick (not ``np.rint``) keeps those cases exact.
    """
    bits = (v.astype(F32, copy=False) + _MAGIC).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def roundf_to_int8_bytes(v: np.ndarray) -> np.ndarray:
    """``int8_t q = roundf(v)`` as gcc -O3 compiles it on x86-64, returned as the stored uint8 bytes.

    ``roundf`` rounds half away from zero (``np.rint`` would round half to even). ``v - trunc(v)``
    is exact in float32, so the tie test has no rounding of its own (``trunc(v + 0.5)`` would:
    0.49999997f + 0.5f == 1.0f). The float → int8 store is ``cvttss2si`` then the low byte; for
    ±inf, NaN or |v| >= 2**31 that instruction yields 0x80000000, whose low byte is 0.
    """
    t = np.trunc(v)
    r = t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0)).astype(F32)
    ok = np.abs(r) < F32(2.0**31)  # False for NaN and +-inf too
    # int32 -> uint8 keeps the low byte (a C conversion to an unsigned type is modulo 2**8).
    return np.where(ok, r, F32(0)).astype(np.int32).astype(np.uint8)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` of a float32 array (round to nearest even, overflow → inf), as
    little-endian bytes with a trailing axis of 2. NumPy's cast rounds the same way as ggml's
    software conversion (and as F16C's ``_cvtss_sh(x, 0)``), subnormals included."""
    with np.errstate(over="ignore"):  # |v| >= 65520 stores +-inf, as in C
        h = np.ascontiguousarray(v.astype("<f2"))
    return h.view(np.uint8).reshape(*v.shape, 2)


def fp16_to_f32(v: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: the float32 value of the stored fp16 (exact)."""
    return v.astype(np.float16).astype(F32)


def torch_fp16_at(blocks: Tensor, offset: int) -> Tensor:
    """float32 value of the little-endian fp16 at byte ``offset`` of every row of a uint8 tensor.

    Built from int32 ops and an int16 → float16 bitcast (same width), which Inductor lowers
    without a graph break; the fp16 → fp32 cast is exact, inf and NaN included.
    """
    lo = blocks[..., offset].to(torch.int32)
    hi = blocks[..., offset + 1].to(torch.int32)
    bits = lo | (hi << 8)
    # Two's-complement wrap to int16 done explicitly: an out-of-range int32 → int16 cast is not
    # something to rely on across backends.
    bits = bits - ((bits & 0x8000) << 1)
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)
