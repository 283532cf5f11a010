"""Helpers shared by the Triton kernels (``triton_w8a8``, ``triton_gguf``); imports triton."""

from __future__ import annotations

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def cast_rtne(y, dtype: tl.constexpr):
    """float32 ``y`` to ``dtype``, rounding to nearest even, the same on a GPU and in the interpreter.

    bfloat16 is rounded by hand on the float32 bits: the interpreter's own float32 -> bfloat16
    conversion truncates (and its "rtne" rounds half up), while a GPU rounds to nearest even.
    NaN payloads that only live in the low 16 bits would become inf; no caller produces them.
    """
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
