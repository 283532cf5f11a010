"""The native GGUF block decoder of the CPU path: ``gguf_decode.c``, built at first use.

    gguf_decode.c --cc -O3 -march=native -ffp-contract=off--> <cache>/gguf_decode-<key>.so --ctypes-->
    decode_into(blocks, qtype, out)      # one pass: bytes -> float32 / bf16 / fp16, bit-exact (NaN payloads aside)

The library is compiled once per machine with the system C compiler (``$CC``, else ``cc``) into
``$FXQUANT_CACHE`` (default ``$XDG_CACHE_HOME/fxquant`` or ``~/.cache/fxquant``), under a name
keyed by the source, the flags, the compiler's version and the macros ``-march=native`` defines
(so a cache shared between different CPUs never loads a library built for another). It is written
to a temporary file and renamed into place, so processes that build it at the same time each
load a complete library. ctypes releases the GIL during a call.

``library()`` is None, and ``gguf_cpu`` decodes with torch ops instead, when the environment sets
``FXQUANT_GGUF_NATIVE=0`` or when no compiler builds the source; the latter logs one warning on
the ``fxquant`` logger saying why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..codecs import BLOCKS
from ..errors import FormatError

log = logging.getLogger("fxquant")

SOURCE = Path(__file__).with_name("gguf_decode.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c99", "-fPIC", "-shared")
ENV_SWITCH = "FXQUANT_GGUF_NATIVE"  # "0": use the torch decoder
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
DTYPES = tuple(_SUFFIX)  # the output dtypes the C decoder writes
QTYPES = ("q4_k", "q8_0")  # the block types gguf_decode.c decodes (sizes: codecs.BLOCKS)


def cache_dir() -> Path:
    if os.environ.get("FXQUANT_CACHE"):
        return Path(os.environ["FXQUANT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            home = Path.home()  # RuntimeError (3.12+) or a literal "~" (3.11) without a usable $HOME
        except RuntimeError:
            home = Path("~")
        if str(home) == "~":
            return Path(tempfile.gettempdir()) / f"fxquant-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        base = home / ".cache"
    return Path(base) / "fxquant"


def _run(cmd: list[str], stdin: str = "") -> str:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise OSError(f"`{' '.join(cmd)}` exited with {done.returncode}: {done.stderr.strip()[-800:]}")
    return done.stdout


def build(cc: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The library's path, compiling it into the cache first when it is not there yet.

    Raises OSError (or subprocess.SubprocessError) when the compiler fails or is missing.
    """
    source = SOURCE.read_bytes()
    version = _run([cc, "--version"])
    target = _run([cc, "-march=native", "-dM", "-E", "-x", "c", "-"])  # what "native" means here
    key = hashlib.sha256(b"\0".join(
        [source, " ".join(flags).encode(), version.encode(), target.encode(), platform.machine().encode()])).hexdigest()
    lib = cache_dir() / f"gguf_decode-{key[:24]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.stem, suffix=".so.tmp", dir=lib.parent)
    os.close(fd)
    try:
        _run([cc, *flags, "-o", tmp, str(SOURCE)])
        os.replace(tmp, lib)  # atomic: a racing process replaces it with the same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def load(portable: bool = False) -> Optional[ctypes.CDLL]:
    """Build (once per machine) and load the decoder; None, with one warning, where that fails.

    ``portable=True`` builds the plain C loops even where the AVX-512 path would be compiled
    (for tests: both must decode the same bits).
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        if cc is None:
            raise OSError("no C compiler found ($CC, cc, gcc, clang)")
        lib = ctypes.CDLL(str(build(cc, FLAGS + (("-DFXQ_PORTABLE",) if portable else ()))))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fxquant: the native GGUF decoder could not be built (%s); linear_gguf on CPU decodes "
                    "with torch ops, 1.3-3.5x slower (set %s=0 to choose that and silence this)", e, ENV_SWITCH)
        return None
    for qtype in QTYPES:
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"fxq_{qtype}_{suffix}")
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None
    fn = lib.fxq_transpose_2
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64], None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded decoder, or None where ``FXQUANT_GGUF_NATIVE=0`` or it cannot be built."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return load()


def decode_into(lib: ctypes.CDLL, blocks: Tensor, qtype: str, out: Tensor) -> Tensor:
    """Decode ``blocks`` (uint8, contiguous ``[n, block_bytes]``) into ``out`` (contiguous, at least
    ``n * block_elems`` elements of float32, bfloat16 or float16); returns the filled part of ``out``."""
    if qtype not in QTYPES or out.dtype not in _SUFFIX or blocks.dim() != 2:
        raise FormatError(f"gguf_native.decode_into: need 2-D {sorted(QTYPES)} blocks and a "
                          f"{'/'.join(map(str, _SUFFIX))} output, got {qtype!r} blocks of shape "
                          f"{tuple(blocks.shape)} and a {out.dtype} output")
    if blocks.device.type != "cpu" or out.device.type != "cpu":
        raise FormatError(f"gguf_native.decode_into: CPU tensors only, got blocks on {blocks.device} and the output "
                          f"on {out.device}")
    n, (elems, nbytes) = blocks.shape[0], BLOCKS[qtype]
    filled = out.view(-1)[: n * elems]
    if not (blocks.is_contiguous() and out.is_contiguous() and blocks.dtype == torch.uint8
            and blocks.shape[1] == nbytes and filled.numel() == n * elems):
        raise FormatError(f"gguf_native.decode_into: need contiguous uint8 [n, {nbytes}] {qtype} blocks "
                          f"and a contiguous output of {n * elems} elements, got {blocks.dtype} "
                          f"{tuple(blocks.shape)} and {out.dtype} {tuple(out.shape)}")
    getattr(lib, f"fxq_{qtype}_{_SUFFIX[out.dtype]}")(blocks.data_ptr(), n, filled.data_ptr())
    return filled


def transpose_into(lib: Optional[ctypes.CDLL], src: Tensor, dst: Tensor) -> None:
    """``dst.copy_(src.t())`` for a contiguous ``src`` [r, c] and a ``dst`` [c, r] whose rows are
    strided (a column slice of a row-major matrix): the C loop for 2-byte dtypes, else torch."""
    if (lib is None or src.element_size() != 2 or src.dtype != dst.dtype or not src.is_contiguous()
            or dst.stride(1) != 1 or dst.shape != src.shape[::-1]
            or src.device.type != "cpu" or dst.device.type != "cpu"):
        dst.copy_(src.t())
        return
    lib.fxq_transpose_2(src.data_ptr(), src.shape[0], src.shape[1], dst.data_ptr(), dst.stride(0))
