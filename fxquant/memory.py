"""Hand freed heap memory back to the operating system between the steps of ``compile``.

glibc keeps freed blocks for reuse: after the first 16 MiB quantization slice is freed its mmap
threshold rises to 16 MiB, so later slices come from the heap and their pages stay in the
process's RSS after ``free``. On a real-size model that retention is gigabytes of peak RSS that no
tensor holds (docs/memory.md). ``trim()`` calls ``malloc_trim(0)``, which returns every whole free
page to the OS; it costs a walk over the free lists (well under a millisecond per call here), and
is a no-op where the C library has no ``malloc_trim`` (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Optional

_trim: Optional[Any] = None
_looked = False


def _malloc_trim() -> Optional[Any]:
    global _trim, _looked
    if not _looked:
        _looked = True
        try:
            fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim")
        except (OSError, AttributeError):
            fn = None
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        _trim = fn
    return _trim


def trim() -> bool:
    """Return freed heap pages to the OS; True if the C library could (glibc's ``malloc_trim``)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
