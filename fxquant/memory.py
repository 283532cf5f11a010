"""Hand freed heap memory back to the operating system between the steps of ``compile``.

glibc keeps freed blocks for reuse: after the first 16 MiB quantization slice is freed its mmap
threshold rises to 16 MiB, so later slices come from the heap and their pages stay in the
process's RSS after ``free``. On a real-size model that retention is gigabytes of peak RSS that no
tensor holds (docs/memory.md). ``trim()`` calls ``malloc_trim(0)``, which returns every whole free
page to the OS; it costs a walk over the free lists (well under a millisecond per call here), and
is a no-op where the C library has no ``malloc_trim`` (macOS, musl, Windows).

Trimming at the end of a step is not enough inside long loops: a freed slice leaves a hole that
the next slice of the same size cannot reuse (PyTorch allocates with ``posix_memalign``, which
asks for more than the hole holds) once a small allocation sits right after it, so a loop over the
59 slices of a 0.5 GB weight, or a forward's activations, grows RSS by their sum. ``made(n)``
counts the bytes of temporaries a loop makes and trims each time they add up to ``TRIM_EVERY``:
RSS then stays within about that much of what is live, for one trim per 16 MiB made (a few
milliseconds each on a fragmented heap: a few percent of a forward at 256 tokens, far less at
real sizes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree

TRIM_EVERY = 16 << 20  # bytes of temporaries made between two trims (`made`)

_made = 0


@functools.lru_cache(maxsize=None)
def _libc(name: str, argtypes: tuple, restype: Any = ctypes.c_int) -> Optional[Any]:
    """The C library's function ``name`` (looked up once), or None where it has none."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def trim() -> bool:
    """Return freed heap pages to the OS; True if the C library could (glibc's ``malloc_trim``)."""
    fn = _libc("malloc_trim", (ctypes.c_size_t,))
    return bool(fn(0)) if fn is not None else False


def made(value: Any) -> None:
    """Count ``value`` (a byte count, or the tensors in a value) as temporaries just made; `trim`
    once those counted since the last trim reach ``TRIM_EVERY``."""
    global _made
    if isinstance(value, int):
        _made += value
    else:
        _made += sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))
    if _made >= TRIM_EVERY:
        _made = 0
        trim()


MADV_DONTNEED = 4  # Linux: the pages read back as zeros; their memory goes back to the OS at once


def release(t: torch.Tensor) -> int:
    """Give the whole pages inside ``t``'s bytes back to the OS (``madvise(MADV_DONTNEED)``): for a
    tail of a buffer whose contents are no longer needed, while the buffer itself must stay. The
    pages read as zeros afterwards. Returns the bytes released (0 off Linux, or for a non-CPU tensor)."""
    if t.device.type != "cpu" or not t.is_contiguous() or not sys.platform.startswith("linux"):
        return 0
    fn = _libc("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    page = mmap.PAGESIZE
    lo = -(-t.data_ptr() // page) * page
    hi = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if fn is None or hi <= lo:
        return 0
    return hi - lo if fn(lo, hi - lo, MADV_DONTNEED) == 0 else 0
