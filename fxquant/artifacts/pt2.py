"""``.pt2`` files: a ``torch.export`` archive, written reproducibly and atomically, with digests.

    save_pt2(gm, "m.pt2")
        export_program(gm) -> torch.export.save into memory (torch's zip writer aborts the process
        on a full disk, so it never writes the file itself)
        -> archive/.data/serialization_id: its random half set to zeros (two saves, same bytes),
           patched in the one in-memory copy
        -> + archive/extra/fxquant_digests.json   sha256 of every other member of the archive
        -> atomic write (temp file, fsync, rename)
    load_pt2("m.pt2") -> every member checked against its sha256 -> torch.export.load -> ExportedProgram

``torch.export.load`` reads the same file, but it checks no digest: a flipped byte in a weight
record loads and changes the outputs. zip's CRC-32 catches most such flips when Python's zipfile
reads a member, but torch's reader does not check it, and a CRC is no defence against edits.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import warnings
import zipfile
from typing import Any

import torch
import torch.fx as fx

from ..errors import FormatError, FxquantError, describe
from .common import PathLike, atomic_write, fspath, version, writable
from .export import export_program

DIGESTS = "fxquant_digests.json"  # under the archive's extra/ folder, where torch keeps extra_files
DIGESTS_FORMAT = "fxquant-pt2-digests"


def save_pt2(gm: fx.GraphModule, path: PathLike, example: Any = None) -> None:
    """Write ``export_program(gm, example)`` as a ``.pt2`` that `load_pt2` verifies.

    ``torch.export.load`` reads it too (after ``import fxquant`` and the module defining the output
    type, e.g. ``import diffusers.models.modeling_outputs``), without checking the digests.

    Raises:
        FxquantError: as `export_program`.
        FormatError: the file cannot be written (a missing folder, which is not created; a
            directory; no permission; a full disk), naming the path; an existing file is kept.
    """
    path = writable(path, "save_pt2")
    ep = export_program(gm, example)
    buf = io.BytesIO()
    try:
        torch.export.save(ep, buf)
    except Exception as e:  # noqa: BLE001 - in memory, so no OSError: torch could not serialize it
        raise FxquantError(f"save_pt2: torch.export.save failed: {describe(e)}") from e
    seal(buf)
    with buf.getbuffer() as view:  # no copy of the archive
        atomic_write(path, view, "save_pt2")


def seal(buf: io.BytesIO) -> None:
    """Fix the archive's serialization id and append the digests member, in place in ``buf``."""
    _fix_serialization_id(buf)
    with zipfile.ZipFile(buf) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        members = {i.filename: _read("save_pt2", zf, i.filename, hashlib.sha256).hexdigest() for i in zf.infolist()}
    record = {"format": DIGESTS_FORMAT, "version": 1, "fxquant_version": version(), "torch_version": torch.__version__,
              "sha256": members}
    with zipfile.ZipFile(buf, "a") as zf:
        info = zipfile.ZipInfo(f"{root}/extra/{DIGESTS}", date_time=(1980, 1, 1, 0, 0, 0))
        zf.writestr(info, json.dumps(record, sort_keys=True, indent=1))


def _fix_serialization_id(buf: io.BytesIO) -> None:
    """torch's zip writer ends every archive with 20 random digits; make them zeros (and fix the CRCs)."""
    with zipfile.ZipFile(buf) as zf:
        info = next((i for i in zf.infolist() if i.filename.endswith("/.data/serialization_id")), None)
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            return
        old, start_dir = zf.read(info), zf.start_dir
    new = old[:20] + b"0" * (len(old) - 20)
    crc = struct.pack("<I", zipfile.crc32(new))
    with buf.getbuffer() as out:
        name_len, extra_len = struct.unpack_from("<HH", out, info.header_offset + 26)
        at = info.header_offset + 30 + name_len + extra_len
        out[at:at + len(old)] = new
        if struct.unpack_from("<H", out, info.header_offset + 6)[0] & 0x08 == 0:
            out[info.header_offset + 14:info.header_offset + 18] = crc
        else:  # the CRC is in the data descriptor after the data (with or without its signature)
            d = at + len(old) + (4 if bytes(out[at + len(old):at + len(old) + 4]) == b"PK\x07\x08" else 0)
            out[d:d + 4] = crc
        pos, name = start_dir, info.filename.encode()
        while bytes(out[pos:pos + 4]) == b"PK\x01\x02":  # the central directory
            n, x, c = struct.unpack_from("<HHH", out, pos + 28)
            if bytes(out[pos + 46:pos + 46 + n]) == name:
                out[pos + 16:pos + 20] = crc
                break
            pos += 46 + n + x + c


def load_pt2(path: PathLike, verify: bool = True) -> torch.export.ExportedProgram:
    """Read a ``.pt2`` written by `save_pt2`, after checking every member against its sha256.

    Args:
        path: the file.
        verify: False skips the digests (as ``torch.export.load`` does).

    Returns:
        The ``ExportedProgram``; ``.module()`` runs it.

    Raises:
        FormatError: naming the file and the member: not a zip archive, a member that is missing,
            unexpected or whose bytes do not match its sha256, a malformed digests record, or a
            program torch cannot load. A ``.pt2`` without fxquant digests (written by plain
            ``torch.export.save``) loads with a warning.

    Example:
        >>> ep = fxquant.load_pt2("model.pt2"); out = ep.module()(**inputs)  # doctest: +SKIP
    """
    path = fspath(path, "load_pt2")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if verify:
        _verify(path, data)
    _import_output_types(data)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - whatever torch cannot read is a format problem here
        raise FormatError(f"{path}: torch.export.load cannot read it: {describe(e)}") from e


def _verify(path: str, data: bytes) -> None:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise FormatError(f"{path}: not a .pt2 (zip) archive: {describe(e)}") from None
    with zf:
        record_name = next((n for n in names if n.endswith(f"/extra/{DIGESTS}")), None)
        if record_name is None:
            warnings.warn(f"{path}: no fxquant digests in this .pt2 (not written by fxquant.save_pt2); "
                          "its bytes are not verified", stacklevel=3)
            return
        record = _read_json(path, zf, record_name)
        expected = record.get("sha256") if isinstance(record, dict) else None
        if not isinstance(expected, dict) or record.get("format") != DIGESTS_FORMAT:
            raise FormatError(f"{path}: member {record_name!r} is malformed: expected the {DIGESTS_FORMAT} record")
        for name in sorted(set(names) - {record_name} | set(expected)):
            if name not in expected:
                raise FormatError(f"{path}: member {name!r} is not listed in {record_name!r} (added after saving)")
            if name not in names:
                raise FormatError(f"{path}: member {name!r} listed in {record_name!r} is missing")
            if _read(path, zf, name, hashlib.sha256).hexdigest() != expected[name]:
                raise FormatError(f"{path}: member {name!r}: bytes do not match its sha256 in {record_name!r} (corrupt)")


def _read(path: str, zf: zipfile.ZipFile, name: str, hasher: Any) -> Any:
    h = hasher()
    try:
        with zf.open(name) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as e:  # a bad CRC or header
        raise FormatError(f"{path}: member {name!r} cannot be read (corrupt): {describe(e)}") from None
    return h


def _read_json(path: str, zf: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(zf.read(name))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise FormatError(f"{path}: member {name!r} is not a readable JSON record: {describe(e)}") from None


def _import_output_types(data: bytes) -> None:
    """torch.export.load needs the module defining the output type imported (diffusers registers
    its output dataclasses as pytree nodes on import); import it as `fxquant.load` does."""
    from torch._export.serde import serialize as serde

    from .io import import_output_types

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            name = next(n for n in zf.namelist() if n.endswith("/models/model.json"))
            sp = serde._bytes_to_dataclass(serde.ExportedProgram, zf.read(name))
    except Exception:  # noqa: BLE001 - torch.export.load reports an unreadable program itself
        return
    import_output_types(sp)
