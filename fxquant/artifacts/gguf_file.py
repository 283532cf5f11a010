"""Read and verify a GGUF file's structure and fxquant's digests, without trusting a byte of it.

    read_gguf(path)    magic, version, counts, every key/value and tensor record, alignment,
                       tensor data in bounds and not overlapping -> GGUFFile
    verify_gguf(path)  read_gguf + fxquant.metadata_sha256 (one sha256 per key) and
                       fxquant.tensor_sha256 (type, shape and sha256 of each tensor's bytes)

The structural checks follow llama.cpp's ``gguf_init_from_file`` and the corrupt files of its
``tests/test-gguf.cpp`` (bad magic / version / counts, bad key size or type, duplicate keys, a
``general.alignment`` that is not a power-of-two UINT32, bad dims or type, misaligned, overlapping or
out-of-bounds tensor data, truncation). Every failure is a `FormatError` naming the file and the
key or tensor; gguf-py's reader would raise ``IndexError`` / ``KeyError`` / ``ValueError`` or read
on. Differences: names are not limited to llama.cpp's 63 bytes (diffusers names can be longer), and
the padding after the last tensor's data may be missing (gguf-py does not require it either).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import FormatError
from .common import PathLike, fspath

MAGIC, VERSIONS, DEFAULT_ALIGNMENT, MAX_DIMS = b"GGUF", (2, 3), 32, 4
STRING, ARRAY, UINT32 = 8, 9, 4
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
METADATA_DIGESTS, TENSOR_DIGESTS = "fxquant.metadata_sha256", "fxquant.tensor_sha256"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str          # "Q4_K", "F32", ...
    ne: tuple[int, ...]     # GGUF order: ne[0] is the row length (numpy shape reversed)
    offset: int             # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    kv: dict[str, tuple[int, Any]]  # key -> (GGUF value type, value); arrays are (ARRAY, (item type, [values]))
    tensors: dict[str, TensorInfo]
    data_start: int
    size: int


class _Cursor:
    def __init__(self, f: BinaryIO, path: str, size: int) -> None:
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise FormatError(f"{self.path}: {what} at byte {self.pos} needs {n} bytes, the file ends at {self.size} "
                              "(truncated or a bad size field)")
        self.pos += n
        return self.f.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.unpack("<Q", f"the length of {what}"), what)


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    from gguf import GGML_QUANT_SIZES

    return {int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}


def read_gguf(path: PathLike) -> GGUFFile:
    """The structure of a GGUF file, checked as llama.cpp checks it (see the module docstring).

    Raises:
        FormatError: naming the file and the field, key or tensor that is wrong.
    """
    path = fspath(path, "read_gguf")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _read(_Cursor(f, path, size))
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None


def _read(c: _Cursor) -> GGUFFile:
    p = c.path
    if c.take(min(4, c.size), "the magic") != MAGIC:
        raise FormatError(f"{p}: not a GGUF file (the first 4 bytes are not b'GGUF')")
    version = c.unpack("<I", "the version")
    if version not in VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        why = "a big-endian file, which fxquant does not read" if swapped in VERSIONS else f"expected one of {VERSIONS}"
        raise FormatError(f"{p}: GGUF version {version}: {why}")
    n_tensors, n_kv = c.unpack("<Q", "the tensor count"), c.unpack("<Q", "the key count")
    # A key takes >= 12 bytes and a tensor record >= 24: a count the file cannot hold is corrupt.
    for n, least, what in ((n_kv, 12, "key"), (n_tensors, 24, "tensor")):
        if n * least > c.size - c.pos:
            raise FormatError(f"{p}: header declares {n} {what}s, more than the file's {c.size} bytes can hold")
    kv: dict[str, tuple[int, Any]] = {}
    for i in range(n_kv):
        key = _text(p, c.string(f"key #{i}"), f"key #{i}")
        if not key:
            raise FormatError(f"{p}: key #{i} is empty")
        if key in kv:
            raise FormatError(f"{p}: key {key!r} appears twice")
        kv[key] = _value(c, key)
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        vtype, alignment = kv["general.alignment"]
        if vtype != UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"{p}: key 'general.alignment' must be a UINT32 power of two, got type {vtype} "
                              f"value {alignment!r}")
    types = _ggml_types()
    infos = [_tensor_info(c, i, types) for i in range(n_tensors)]
    data_start = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for t in infos:
        if t.name in tensors:
            raise FormatError(f"{p}: tensor {t.name!r} appears twice")
        if t.offset % alignment:
            raise FormatError(f"{p}: tensor {t.name!r}: data offset {t.offset} is not a multiple of the alignment {alignment}")
        if data_start + t.offset + t.nbytes > c.size:
            raise FormatError(f"{p}: tensor {t.name!r}: data [{t.offset}, {t.offset + t.nbytes}) runs past the end of "
                              f"the file ({c.size - data_start} data bytes; truncated?)")
        tensors[t.name] = t
    ordered = sorted(infos, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise FormatError(f"{p}: tensor {b.name!r} overlaps tensor {a.name!r} in the data section")
    return GGUFFile(p, version, kv, tensors, data_start, c.size)


def _text(path: str, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: {what} is not UTF-8 text") from None


def _value(c: _Cursor, key: str, vtype: Any = None) -> tuple[int, Any]:
    what = f"the value of key {key!r}"
    vtype = c.unpack("<i", f"the type of key {key!r}") if vtype is None else vtype
    if vtype in SCALARS:
        return vtype, c.unpack(SCALARS[vtype], what)
    if vtype == STRING:
        return vtype, _text(c.path, c.string(what), what)
    if vtype == ARRAY:
        item, n = c.unpack("<i", f"the item type of key {key!r}"), c.unpack("<Q", f"the length of key {key!r}")
        if item not in SCALARS and item != STRING:
            raise FormatError(f"{c.path}: key {key!r}: array item type {item} is not a GGUF value type")
        least = 8 if item == STRING else struct.calcsize(SCALARS[item])
        if n * least > c.size - c.pos:
            raise FormatError(f"{c.path}: key {key!r}: an array of {n} items does not fit in the file")
        return vtype, (item, [_value(c, key, item)[1] for _ in range(n)])
    raise FormatError(f"{c.path}: key {key!r} has type {vtype}, which is not a GGUF value type")


def _tensor_info(c: _Cursor, i: int, types: dict[int, tuple[str, int, int]]) -> TensorInfo:
    p = c.path
    name = _text(p, c.string(f"the name of tensor #{i}"), f"the name of tensor #{i}")
    n_dims = c.unpack("<I", f"tensor {name!r}: n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise FormatError(f"{p}: tensor {name!r}: {n_dims} dimensions, expected 1 to {MAX_DIMS}")
    ne = tuple(c.unpack("<q", f"tensor {name!r}: shape") for _ in range(n_dims))
    ggml_type, offset = c.unpack("<i", f"tensor {name!r}: type"), c.unpack("<Q", f"tensor {name!r}: offset")
    if any(d < 0 for d in ne):
        raise FormatError(f"{p}: tensor {name!r}: negative dimension in shape {list(ne)}")
    if ggml_type not in types:
        raise FormatError(f"{p}: tensor {name!r}: type {ggml_type} is not a GGML type")
    type_name, block, type_size = types[ggml_type]
    count = 1
    for d in ne:
        count *= d
    if count >= 1 << 63:
        raise FormatError(f"{p}: tensor {name!r}: shape {list(ne)} has more than 2**63 elements")
    if ne[0] % block:
        raise FormatError(f"{p}: tensor {name!r}: row length {ne[0]} is not a multiple of {type_name}'s block of {block}")
    return TensorInfo(name, type_name, ne, offset, count // block * type_size)


def value_digest(vtype: int, value: Any) -> str:
    """sha256 of a metadata value as ``[type, value]`` JSON (what `save_gguf` records per key)."""
    return hashlib.sha256(json.dumps([int(vtype), value], sort_keys=True).encode()).hexdigest()


def verify_gguf(path: "PathLike | GGUFFile") -> GGUFFile:
    """`read_gguf`, then every key and tensor against the digests `save_gguf` recorded.

    A file without ``fxquant.metadata_sha256`` (not written by fxquant, or by an older one) is
    read with a warning that nothing was verified.

    Raises:
        FormatError: naming the key or tensor whose bytes changed, or that was added or removed.
    """
    g = path if isinstance(path, GGUFFile) else read_gguf(path)
    if METADATA_DIGESTS not in g.kv:
        warnings.warn(f"{g.path}: no {METADATA_DIGESTS} key (not written by fxquant.save_gguf); its metadata and "
                      "tensor bytes are not verified", stacklevel=2)
        return g
    expected = _json_key(g, METADATA_DIGESTS)
    for key in sorted((g.kv.keys() - {METADATA_DIGESTS}) | expected.keys()):
        if key not in g.kv:
            raise FormatError(f"{g.path}: metadata key {key!r} is listed in {METADATA_DIGESTS} but missing")
        if key not in expected:
            raise FormatError(f"{g.path}: metadata key {key!r} is not listed in {METADATA_DIGESTS} (added after saving)")
        if value_digest(*g.kv[key]) != expected[key]:
            raise FormatError(f"{g.path}: metadata key {key!r} does not match its sha256 (corrupt or edited)")
    records = _json_key(g, TENSOR_DIGESTS)
    with open(g.path, "rb") as f:
        for name in sorted(g.tensors.keys() | records.keys()):
            t, rec = g.tensors.get(name), records.get(name)
            if t is None or not isinstance(rec, dict):
                where = "missing from the file" if t is None else f"not listed in {TENSOR_DIGESTS}"
                raise FormatError(f"{g.path}: tensor {name!r} is {where}")
            if rec.get("type") != t.type_name or rec.get("ne") != list(t.ne):
                raise FormatError(f"{g.path}: tensor {name!r} is {t.type_name} {list(t.ne)}, its record says "
                                  f"{rec.get('type')} {rec.get('ne')}")
            if _sha256(f, g.data_start + t.offset, t.nbytes) != rec.get("sha256"):
                raise FormatError(f"{g.path}: tensor {name!r}: data does not match its sha256 (corrupt bytes)")
    return g


def _json_key(g: GGUFFile, key: str) -> dict[str, Any]:
    vtype, raw = g.kv.get(key, (None, None))
    try:
        value = json.loads(raw) if vtype == STRING else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise FormatError(f"{g.path}: metadata key {key!r} is missing or not a JSON object")
    return value


def _sha256(f: BinaryIO, start: int, n: int) -> str:
    h = hashlib.sha256()
    f.seek(start)
    while n > 0:
        chunk = f.read(min(n, 1 << 22))
        if not chunk:
            break
        h.update(chunk)
        n -= len(chunk)
    return h.hexdigest()


def decoded(g: GGUFFile, key: str) -> Any:
    """A string value holding JSON, decoded (FormatError naming the key if it is not JSON)."""
    vtype, raw = g.kv[key]
    try:
        return json.loads(raw) if vtype == STRING else raw
    except ValueError as e:
        raise FormatError(f"{g.path}: metadata key {key!r} is not valid JSON ({e})") from None
