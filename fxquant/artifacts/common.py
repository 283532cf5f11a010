"""What every artifact module shares: path checks, atomic writes and the dtypes a file can store."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator, Union

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


@contextlib.contextmanager
def atomic_path(path: str, who: str) -> Iterator[str]:
    """A fresh temp file name beside ``path``; on a clean exit the file there is fsynced and renamed
    onto ``path`` (then the folder is fsynced), otherwise removed. ``path`` itself is never opened:
    an existing file survives every failure, and no other file is touched.

        with atomic_path("m.gguf", "save_gguf") as tmp:   # tmp = "./.m.gguf.k3j2_x.tmp", empty
            write_everything_to(tmp)                      # may raise: tmp is removed, m.gguf kept
        # m.gguf is the new file

    Raises:
        FormatError: any OSError (no permission, a full disk, a vanished folder), naming ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as e:
        raise FormatError(f"{who}: cannot write {path}: {e.strerror or e}") from None
    try:
        # mkstemp makes the file 0600: give it the mode a plain open() would (or the old file's).
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_umask())
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reaches the disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as e:  # a full disk, a folder made read-only or removed meanwhile
        # numpy's tofile reports a short write without an errno ("N requested and M written")
        why = e.strerror or (f"{e} (a short write: is the disk full?)" if e.errno is None else str(e))
        raise FormatError(f"{who}: cannot write {path}: {why}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # gone already after a successful rename


def atomic_write(path: PathLike, data: Union[bytes, bytearray, memoryview], who: str) -> str:
    """Write ``data`` to ``path`` atomically (`atomic_path`); returns the path as a str."""
    path = writable(path, who)
    with atomic_path(path, who) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform whose folders cannot be opened (Windows): the rename is done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself has happened
    finally:
        os.close(fd)
