"""What every artifact module shares: path checks and the dtypes a file can store."""

from __future__ import annotations

import os
from typing import Any, Union

import torch

from ..errors import FormatError, FxquantError

PathLike = Union[str, "os.PathLike[str]"]
# The dtypes an artifact stores (and an example input may be rebuilt with).
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)
DTYPE_BY_NAME = {str(d).removeprefix("torch."): d for d in DTYPES}


def version() -> str:
    """The installed fxquant version (recorded in every artifact)."""
    from .. import __version__

    return __version__


def fspath(path: Any, who: str) -> str:
    """``os.fspath`` that names the caller and what it was given instead of a bare TypeError."""
    try:
        return os.fspath(path)
    except TypeError:
        raise FxquantError(f"{who}: path must be a str or os.PathLike, got {type(path).__name__}") from None


def writable(path: Any, who: str) -> str:
    """`path` as a str, once it is known to name a file in an existing folder (checked before any
    export, so that a wrong path fails at once)."""
    path = fspath(path, who)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise FormatError(f"{who}: cannot write {path}: it is a directory; give a file name")
    if not os.path.isdir(folder):
        # Not created: a mistyped path should fail, not leave a new tree of folders behind.
        raise FormatError(f"{who}: cannot write {path}: the folder {folder} does not exist ({who} does not create folders)")
    return path
