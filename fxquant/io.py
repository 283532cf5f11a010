"""Save and reload lowered modules: one safetensors file, verified before a model is built.

    compiled GraphModule (or {"cond": gm, "uncond": gm})
        -> torch.export.export(gm, example, dynamic batch/seq)       (the graph, re-exported)
        -> model.safetensors:
             tensors   "<branch>/{params,buffers,constants}/<fqn>"   weights: int8 / uint8 / float
                       "<branch>/program"   uint8: torch's own JSON serialization of the program
             metadata  "fxquant"          the manifest (format version, versions, recipe, per-layer
                                          records, per-tensor shape/dtype/sha256)
                       "fxquant.digests"  sha256 of every section of the manifest
    fxquant.load(path) -> the same GraphModule (or dict), bit-identical outputs

Loading needs neither the model class nor its weights nor calibration data. Nothing is
unpickled; the one import a file can cause is of the installed module that defines the output
type (e.g. ``diffusers.models.modeling_outputs``). The layout is documented in docs/formats.md.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import struct
from typing import Any, Mapping, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._export.serde import serialize as serde

from . import meta, trace
from .errors import FormatError, FxquantError

FORMAT = "fxquant"
FORMAT_VERSION = 1
MANIFEST_KEY, DIGESTS_KEY = "fxquant", "fxquant.digests"
SINGLE = "module"  # tensor-key prefix of a file holding one module rather than a dict of branches
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_BY_NAME = {str(d).removeprefix("torch."): d for d in _DTYPES}
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------- example inputs (shapes only)

def describe_inputs(example: Any) -> Any:
    """A JSON description of a calibration item: tensors become shape + dtype, other leaves stay.

    Re-export needs an example with the trace's shapes and dtypes, never its values (non-strict
    export traces on fake tensors), so `compile` stores this in the `GraphRecord`.
    """
    if isinstance(example, torch.Tensor):
        return {"tensor": {"shape": list(example.shape), "dtype": str(example.dtype).removeprefix("torch.")}}
    if isinstance(example, Mapping):
        return {"dict": {str(k): describe_inputs(v) for k, v in example.items()}}
    if isinstance(example, (list, tuple)):
        return {"tuple" if isinstance(example, tuple) else "list": [describe_inputs(v) for v in example]}
    if example is None or isinstance(example, (bool, int, float, str)):
        return {"value": example}
    return {"unsupported": type(example).__name__}


def example_from(desc: Any, where: str) -> Any:
    """Zeros with the described shapes and dtypes (the inverse of `describe_inputs`)."""
    kind, v = next(iter(desc.items())) if isinstance(desc, dict) and len(desc) == 1 else (None, None)
    if kind == "tensor" and v.get("dtype") in _BY_NAME:
        return torch.zeros(v["shape"], dtype=_BY_NAME[v["dtype"]])
    if kind == "dict":
        return {k: example_from(x, f"{where}.{k}") for k, x in v.items()}
    if kind in ("list", "tuple"):
        items = [example_from(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return items if kind == "list" else tuple(items)
    if kind == "value":
        return v
    raise FxquantError(f"{where}: cannot rebuild an example input from {desc!r}; pass example= explicitly")


# ---------------------------------------------------------------- torch.export

def export_program(gm: fx.GraphModule, example: Any = None) -> torch.export.ExportedProgram:
    """Re-export a lowered GraphModule with dynamic batch and sequence (the frontend's rules).

    Args:
        gm: a module returned by `fxquant.compile` or `fxquant.load`.
        example: inputs with the right shapes; by default zeros shaped like the tracing example
            recorded at compile time.

    Returns:
        An ``ExportedProgram`` whose ``fxquant::`` nodes keep their records in ``meta["custom"]``;
        ``torch.export.save`` writes it as a ``.pt2``.

    Raises:
        FxquantError: no example recorded and none given, or torch.export failed.

    Example:
        >>> torch.export.save(fxquant.export_program(gm), "model.pt2")  # doctest: +SKIP
    """
    if example is None:
        rec = meta.graph_record(gm)
        if rec is None or rec.example_inputs is None:
            raise FxquantError("export: this module records no example inputs (was it produced by fxquant.compile?); "
                               "pass example= with inputs of the right shapes")
        example = example_from(rec.example_inputs, "example_inputs")
    args, kwargs = trace.as_args_kwargs(example, "example")
    # Keyword order must follow the signature: a reloaded module re-exports wrongly otherwise.
    order = list(inspect.signature(gm.forward).parameters)
    kwargs = dict(sorted(kwargs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    if trace.batch_of(args, kwargs) == 1:  # a batch of 1 would be specialised, as in `trace`
        args, kwargs = trace.repeat_batch((args, kwargs))
    try:
        with torch.no_grad():
            return torch.export.export(gm, args, kwargs, dynamic_shapes=trace._dynamic_shapes(gm, args, kwargs),
                                       strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with what was being exported
        raise FxquantError(f"export: torch.export failed on the lowered module: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e


def save_pt2(gm: fx.GraphModule, path: PathLike, example: Any = None) -> None:
    """``torch.export.save(export_program(gm, example), path)``; reload with ``torch.export.load``
    after ``import fxquant`` (and the module defining the output type, e.g. ``import diffusers.models.modeling_outputs``)."""
    torch.export.save(export_program(gm, example), os.fspath(path))


# ---------------------------------------------------------------- save

def save(model: Union[fx.GraphModule, Mapping[str, fx.GraphModule]], path: PathLike, example: Any = None) -> None:
    """Write a compiled module, or a dict of CFG branches, to one safetensors file.

    Args:
        model: what `fxquant.compile` (or `fxquant.load`) returned.
        path: the file to write (``.safetensors`` by convention).
        example: inputs with the trace's shapes (a dict of them per branch for a dict), only for a
            module that records none.

    Raises:
        FxquantError: a module without fxquant records or example inputs, or export failed.

    Example:
        >>> fxquant.save(fxquant.compile(model, "int8-w8a8", calibration=xs), "model.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    is_dict = isinstance(model, Mapping)
    branches = dict(model) if is_dict else {SINGLE: model}
    if not branches:
        raise FxquantError("save: the dict of branches is empty")
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "branches" if is_dict else "module",
                                "fxquant_version": _version(), "torch_version": torch.__version__, "order": list(branches),
                                "branches": {}}
    for name, gm in branches.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise FxquantError(f"save: branch name {name!r} must be a non-empty string of letters, digits, '_', '.', '-'")
        where = f"branch {name!r}" if is_dict else "module"
        grec, recs = meta.graph_record(gm), meta.records(gm) if isinstance(gm, fx.GraphModule) else []
        if grec is None or not recs:
            raise FxquantError(f"save: {where} has no fxquant records; was it produced by fxquant.compile?")
        ex = example.get(name) if is_dict and isinstance(example, Mapping) else example
        ep = export_program(gm, ex)
        program = serde.serialize(ep, serialize_state_dict=False, serialize_constants=False,
                                  serialize_example_inputs=False).exported_program
        tensors[f"{name}/program"] = torch.frombuffer(bytearray(program), dtype=torch.uint8)
        entries: dict[str, Any] = {f"{name}/program": _entry("program", "", tensors[f"{name}/program"])}
        seen: set[int] = set()
        params = set(ep.graph_signature.parameters)
        stored = [("params" if k in params else "buffers", k, v) for k, v in ep.state_dict.items()]
        for kind, fqn, t in stored + [("constants", k, v) for k, v in ep.constants.items()]:
            if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
                raise FxquantError(f"save: {where}: {kind} entry {fqn!r} is a {getattr(t, 'dtype', type(t).__name__)}, "
                                   f"which the format does not store")
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            t = t.clone() if ptr in seen and t.numel() else t  # safetensors refuses shared storage
            seen.add(ptr)
            tensors[f"{name}/{kind}/{fqn}"] = t
            entries[f"{name}/{kind}/{fqn}"] = _entry(kind, fqn, t)
        manifest["branches"][name] = {"graph": grec.to_json(), "layers": {r.name: r.to_json() for _, r in recs},
                                      "schema_version": list(serde.SCHEMA_VERSION), "tensors": entries}
    text = json.dumps(manifest, sort_keys=True)
    digests = json.dumps(_digests(json.loads(text)), sort_keys=True)
    tmp = f"{os.fspath(path)}.partial"  # never leave a half-written artifact under the real name
    try:
        save_file(tensors, tmp, metadata={MANIFEST_KEY: text, DIGESTS_KEY: digests})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _entry(kind: str, fqn: str, t: torch.Tensor) -> dict[str, Any]:
    return {"kind": kind, "fqn": fqn, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": _sha256(t)}


def _sha256(t: torch.Tensor) -> str:
    # The bytes safetensors stores: little-endian, C order (every platform torch supports is LE).
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest() if t.numel() else hashlib.sha256(b"").hexdigest()


def _version() -> str:
    from . import __version__

    return __version__


def _digests(manifest: dict[str, Any]) -> dict[str, str]:
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


# ---------------------------------------------------------------- load

def load(path: PathLike) -> Union[fx.GraphModule, dict[str, fx.GraphModule]]:
    """Read a file written by `save`: every check passes before a module is built.

    Returns:
        A GraphModule with the original call signature and output type (a dict of them for a
        file saved from a dict of branches); `fxquant.summary` works on it.

    Raises:
        FormatError: naming the file and the key: truncated file, not an fxquant file, another
        format version, edited metadata, a missing / extra / mis-shaped tensor, corrupt tensor
        bytes (sha256), or a program torch cannot deserialize.

    Example:
        >>> gm = fxquant.load("model.safetensors"); out = gm(**inputs)  # doctest: +SKIP
    """
    from safetensors import safe_open

    path = os.fspath(path)
    header = _read_header(path)
    manifest = _check_manifest(path, header)
    checked: dict[str, torch.Tensor] = {}
    try:
        f = safe_open(path, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors' own header checks (overlapping offsets, ...)
        raise FormatError(f"{path}: safetensors cannot read the file: {e}") from None
    with f:
        for key in sorted(header.keys() - {"__metadata__"}):
            # A fresh allocation: safetensors hands out 8-byte-aligned memory, on which CPU GEMMs
            # take another path and round differently (1 ulp), so outputs would not be bit-identical.
            t = f.get_tensor(key).clone()
            expected, found = _find_entry(manifest, key)["sha256"], _sha256(t)
            if found != expected:
                raise FormatError(f"{path}: tensor {key!r}: data does not match its sha256 in the metadata "
                                  f"(corrupt bytes); expected {expected[:16]}…, found {found[:16]}…")
            checked[key] = t
    out = {name: _build(path, name, manifest["branches"][name], checked, manifest["torch_version"])
           for name in manifest["order"]}
    return out if manifest["kind"] == "branches" else out[SINGLE]


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The verified JSON manifest of a saved artifact, without reading tensor data or building a module.

    Raises:
        FormatError: as `load`, for everything but the tensor checksums and the program.
    """
    return _check_manifest(os.fspath(path), _read_header(os.fspath(path)))


def _read_header(path: str) -> dict[str, Any]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= size - 8 else None
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    for magic, what in ((b"PK\x03\x04", "a zip archive (a torch.export .pt2? load it with torch.export.load)"),
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
    end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"
               and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2] or [0])
    if size < 8 + n + end:
        raise FormatError(f"{path}: truncated: the header declares {8 + n + end} bytes, the file holds {size}")
    return header


def _check_manifest(path: str, header: dict[str, Any]) -> dict[str, Any]:
    md = header.get("__metadata__") or {}
    if MANIFEST_KEY not in md:
        raise FormatError(f"{path}: not an fxquant artifact (no {MANIFEST_KEY!r} key in the safetensors metadata)")
    try:
        manifest, digests = json.loads(md[MANIFEST_KEY]), json.loads(md.get(DIGESTS_KEY, "null"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: metadata {MANIFEST_KEY!r} or {DIGESTS_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{path}: metadata key 'format' is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{path}: metadata key 'format_version' is {manifest.get('format_version')!r}; "
                          f"fxquant {_version()} reads format version {FORMAT_VERSION}")
    if not isinstance(digests, dict):
        raise FormatError(f"{path}: metadata key {DIGESTS_KEY!r} is missing or not an object")
    actual = _digests(manifest)
    for key in sorted(actual.keys() | digests.keys()):
        if actual.get(key) != digests.get(key):
            what = "is missing" if key not in actual else "is unexpected" if key not in digests else "was modified after saving"
            raise FormatError(f"{path}: metadata section {key!r} {what} (sha256 check of the {MANIFEST_KEY!r} metadata)")
    _check_structure(path, manifest)
    present = header.keys() - {"__metadata__"}
    listed = {k for br in manifest["branches"].values() for k in br["tensors"]}
    for key in sorted(listed - present):
        raise FormatError(f"{path}: tensor {key!r} listed in the metadata is missing from the file")
    for key in sorted(present - listed):
        raise FormatError(f"{path}: tensor {key!r} in the file is not listed in the metadata")
    for key in sorted(listed):
        e, h = _find_entry(manifest, key), header[key] if isinstance(header[key], dict) else {}
        if list(h.get("shape", ())) != e["shape"] or h.get("dtype") != _DTYPES.get(_BY_NAME.get(e["dtype"])):
            raise FormatError(f"{path}: tensor {key!r} has shape {h.get('shape')} and dtype {h.get('dtype')}, "
                              f"the metadata expects shape {e['shape']} and dtype {e['dtype']}")
    return manifest


def _check_structure(path: str, m: dict[str, Any]) -> None:
    """Types and cross-references of the manifest (the digests only prove it is unchanged)."""
    def fail(key: str, expected: str) -> None:
        raise FormatError(f"{path}: metadata key {key!r} is malformed: expected {expected}")

    if m.get("kind") not in ("module", "branches"):
        fail("kind", "'module' or 'branches'")
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
            ok = (isinstance(e, dict) and key.startswith(f"{b}/") and e.get("kind") in ("program", "params", "buffers", "constants")
                  and isinstance(e.get("fqn"), str) and e.get("dtype") in _BY_NAME and isinstance(e.get("sha256"), str)
                  and isinstance(e.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in e["shape"]))
            if not ok:
                fail(f"branches/{b}/tensors/{key}", "kind, fqn, shape, dtype and sha256")


def _find_entry(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    return manifest["branches"][key.split("/", 1)[0]]["tensors"][key]


def _build(path: str, name: str, br: dict[str, Any], tensors: dict[str, torch.Tensor], saved_with: str) -> fx.GraphModule:
    entries = br["tensors"]
    state: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for key, e in entries.items():
        if e["kind"] == "params":  # torch's verifier wants parameters as nn.Parameter
            state[e["fqn"]] = torch.nn.Parameter(tensors[key], requires_grad=False)
        elif e["kind"] == "buffers":
            state[e["fqn"]] = tensors[key]
        elif e["kind"] == "constants":
            constants[e["fqn"]] = tensors[key]
    program = bytes(tensors[f"{name}/program"].numpy())
    try:
        sp = serde._bytes_to_dataclass(serde.ExportedProgram, program)
        _import_output_types(sp)
        ep = serde.ExportedProgramDeserializer().deserialize(sp, state, constants, None)
        gm = ep.module()
    except Exception as e:  # noqa: BLE001 - a program torch cannot rebuild is a format problem here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FormatError(f"{path}: tensor '{name}/program': torch {torch.__version__} cannot deserialize the program "
                          f"(saved with torch {saved_with}): {type(e).__name__}: {first}") from e
    found = {r.name: r.to_json() for _, r in meta.records(gm)}
    for layer in sorted(found.keys() | br["layers"].keys()):
        if found.get(layer) != br["layers"].get(layer):
            raise FormatError(f"{path}: metadata of layer {layer!r} (branch {name!r}) disagrees with the saved graph")
    meta.set_graph_record(gm, meta.GraphRecord.from_json(br["graph"]))
    return gm


def _import_output_types(sp: Any) -> None:
    """Import the installed modules that define the program's pytree types (e.g. diffusers' output
    dataclass registers itself as a pytree node on import); torch cannot rebuild the specs otherwise."""
    names: set[str] = set()

    def walk(spec: Any) -> None:
        if isinstance(spec, dict):
            if isinstance(spec.get("type"), str):
                names.add(spec["type"])
            for c in spec.get("children_spec", ()):
                walk(c)

    for entry in sp.graph_module.module_call_graph:
        sig = entry.signature
        for s in (sig.in_spec, sig.out_spec) if sig is not None else ():
            try:
                walk(json.loads(s)[1])
            except (json.JSONDecodeError, IndexError, TypeError):
                continue
    for name in names - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE):
        module = name.rpartition(".")[0]
        if re.fullmatch(r"[A-Za-z_][\w.]*", module or "") and importlib.util.find_spec(module.split(".")[0]):
            importlib.import_module(module)
