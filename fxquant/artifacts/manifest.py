"""The fxquant artifact's manifest: how `save` describes a file and how `load` verifies one.

    save:  tensors -> entry(kind, fqn, t) = {kind, fqn, shape, dtype, sha256}   per tensor
           manifest -> digests(manifest) = {"header": sha256, "branches/<b>/layers/<layer>": sha256, ...}
    load:  file -> read_header      8-byte length, JSON header, every data_offsets pair, file size
                -> check_manifest   fxquant key, format version, digests, structure,
                                    tensors present / listed / shaped as listed
                -> the manifest, trusted (tensor bytes are checked against `sha256` by `load`)

Every failure is a `FormatError` naming the file and the key; the layout is in docs/formats.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import torch

from ..errors import FormatError
from .common import DTYPE_BY_NAME, DTYPES, PathLike, fspath, version

FORMAT = "fxquant"
# 2: per-layer scheme in the selection record, typed graph record (fxquant 0.2). 1 still reads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_KEY, DIGESTS_KEY = "fxquant", "fxquant.digests"
SINGLE = "module"  # tensor-key prefix of a file holding one module rather than a dict of branches
KINDS = ("program", "params", "buffers", "constants")
# torch dtype -> the safetensors header's dtype code
SAFETENSORS_DTYPE = dict(zip(DTYPES, ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")))



def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with a deterministic layout: header keys sorted, tensors in name order.

    safetensors' own writer orders the metadata keys by a randomly seeded hash map, so the same
    tensors would give different bytes from one process to the next. The layout (8-byte header
    length, JSON header padded with spaces to 8 bytes, contiguous data) is the format's spec.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    start = 0
    for key in sorted(tensors):
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [start, start + n]}
        start += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in sorted(tensors):
            t = tensors[key].detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def entry(kind: str, fqn: str, t: torch.Tensor) -> dict[str, Any]:
    return {"kind": kind, "fqn": fqn, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": sha256(t)}


def sha256(t: torch.Tensor) -> str:
    # The bytes safetensors stores: little-endian, C order (every platform torch supports is LE).
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest() if t.numel() else hashlib.sha256(b"").hexdigest()


def digests(manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of every section, so that an edited field is reported by its path."""
    def h(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

    out = {"header": h({k: v for k, v in manifest.items() if k != "branches"})}
    for b, br in manifest.get("branches", {}).items() if isinstance(manifest.get("branches"), dict) else ():
        if not isinstance(br, dict):
            out[f"branches/{b}"] = h(br)
            continue
        for section, body in br.items():
            if section in ("layers", "tensors") and isinstance(body, dict):
                out.update({f"branches/{b}/{section}/{k}": h(v) for k, v in body.items()})
            else:
                out[f"branches/{b}/{section}"] = h(body)
    return out


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The verified JSON manifest of a saved artifact, without reading tensor data or building a module.

    Raises:
        FormatError: as `load`, for everything but the tensor checksums and the program.
    """
    path = fspath(path, "read_manifest")
    return check_manifest(path, read_header(path))


def read_header(path: str) -> dict[str, Any]:
    """The safetensors JSON header, after checking that the file holds every byte it declares."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= size - 8 else None
    except OSError as e:  # missing file, a directory, no permission
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    for magic, what in ((b"PK\x03\x04", "a zip archive (a .pt2? load it with fxquant.load_pt2)"),
                        (b"GGUF", "a GGUF file (see fxquant.integrations.diffusers.load_gguf)")):
        if head.startswith(magic):
            raise FormatError(f"{path}: not an fxquant artifact: it is {what}")
    if raw is None:
        raise FormatError(f"{path}: truncated or not a safetensors file: {size} bytes cannot hold the header it declares")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FormatError(f"{path}: not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a safetensors file (the header is not a JSON object)")
    md = header.get("__metadata__", {})
    if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
        raise FormatError(f"{path}: header key '__metadata__' is malformed: expected an object of strings")
    end = 0
    for key, t in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(t, dict):
            raise FormatError(f"{path}: tensor {key!r}: header entry is {t!r}, expected an object with dtype, shape "
                              f"and data_offsets")
        offsets = t.get("data_offsets")
        # bool is an int to Python but not to safetensors; a float offset would be cut silently by int()
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise FormatError(f"{path}: tensor {key!r}: header field 'data_offsets' is {offsets!r}, "
                              f"expected [start, end] with integers 0 <= start <= end")
        end = max(end, offsets[1])
    if size < 8 + n + end:
        raise FormatError(f"{path}: truncated: the header declares {8 + n + end} bytes, the file holds {size}")
    return header


def check_manifest(path: str, header: dict[str, Any]) -> dict[str, Any]:
    """The manifest in `header`'s metadata, verified against its digests and against the header."""
    md = header.get("__metadata__") or {}
    if MANIFEST_KEY not in md:
        raise FormatError(f"{path}: not an fxquant artifact (no {MANIFEST_KEY!r} key in the safetensors metadata)")
    try:
        manifest, digested = json.loads(md[MANIFEST_KEY]), json.loads(md.get(DIGESTS_KEY, "null"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: metadata {MANIFEST_KEY!r} or {DIGESTS_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{path}: metadata key 'format' is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise FormatError(f"{path}: metadata key 'format_version' is {manifest.get('format_version')!r}; "
                          f"fxquant {version()} reads format versions {list(READABLE_VERSIONS)}")
    if not isinstance(digested, dict):
        raise FormatError(f"{path}: metadata key {DIGESTS_KEY!r} is missing or not an object")
    actual = digests(manifest)
    for key in sorted(actual.keys() | digested.keys()):
        if actual.get(key) != digested.get(key):
            what = "is missing" if key not in actual else "is unexpected" if key not in digested else "was modified after saving"
            raise FormatError(f"{path}: metadata section {key!r} {what} (sha256 check of the {MANIFEST_KEY!r} metadata)")
    _check_structure(path, manifest)
    present = header.keys() - {"__metadata__"}
    listed = {k for br in manifest["branches"].values() for k in br["tensors"]}
    for key in sorted(listed - present):
        raise FormatError(f"{path}: tensor {key!r} listed in the metadata is missing from the file")
    for key in sorted(present - listed):
        raise FormatError(f"{path}: tensor {key!r} in the file is not listed in the metadata")
    for key in sorted(listed):
        e, h = find_entry(manifest, key), header[key]
        if list(h.get("shape", ())) != e["shape"] or h.get("dtype") != SAFETENSORS_DTYPE.get(DTYPE_BY_NAME.get(e["dtype"])):
            raise FormatError(f"{path}: tensor {key!r} has shape {h.get('shape')} and dtype {h.get('dtype')}, "
                              f"the metadata expects shape {e['shape']} and dtype {e['dtype']}")
    return manifest


def _check_structure(path: str, m: dict[str, Any]) -> None:
    """Types and cross-references of the manifest (the digests only prove it is unchanged)."""
    def fail(key: str, expected: str) -> None:
        raise FormatError(f"{path}: metadata key {key!r} is malformed: expected {expected}")

    if m.get("kind") not in ("module", "branches"):
        fail("kind", "'module' or 'branches'")
    for key in ("fxquant_version", "torch_version"):
        if not isinstance(m.get(key), str):
            fail(key, "a version string")
    branches, order = m.get("branches"), m.get("order")
    if not isinstance(branches, dict) or not isinstance(order, list) or sorted(order) != sorted(branches) or not order:
        fail("order", f"the names of the branches {sorted(branches) if isinstance(branches, dict) else '{}'}")
    if m["kind"] == "module" and order != [SINGLE]:
        fail("order", f"[{SINGLE!r}] for a single module")
    for b, br in branches.items():
        for section in ("graph", "layers", "tensors"):
            if not isinstance(br, dict) or not isinstance(br.get(section), dict):
                fail(f"branches/{b}/{section}", "an object")
        if not isinstance(br["graph"].get("recipe"), dict):
            fail(f"branches/{b}/graph/recipe", "an object")
        if br["tensors"].get(f"{b}/program", {}).get("kind") != "program":
            fail(f"branches/{b}/tensors/{b}/program", "the serialized program")
        for key, e in br["tensors"].items():
            ok = (isinstance(e, dict) and key.startswith(f"{b}/") and e.get("kind") in KINDS
                  and isinstance(e.get("fqn"), str) and e.get("dtype") in DTYPE_BY_NAME and isinstance(e.get("sha256"), str)
                  and isinstance(e.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in e["shape"]))
            if not ok:
                fail(f"branches/{b}/tensors/{key}", "kind, fqn, shape, dtype and sha256")


def find_entry(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    return manifest["branches"][key.split("/", 1)[0]]["tensors"][key]
