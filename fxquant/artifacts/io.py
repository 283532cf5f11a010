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

The re-export (and the example-input description it needs) is `export.py`; the manifest and every
check `load` makes before reading tensor bytes are `manifest.py`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from typing import Any, Mapping, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._export.serde import serialize as serde

from .. import meta, module
from ..branches import as_branches, unless_dict
from ..errors import FormatError, FxquantError, describe
from ..trace import exported_module
from .common import PathLike, atomic_path, fspath, writable
from .export import export_program
from .manifest import (DIGESTS_KEY, FORMAT, FORMAT_VERSION, MANIFEST_KEY, SAFETENSORS_DTYPE, SINGLE, check_manifest,
                       digests, entry, find_entry, read_header, sha256, write_safetensors)
from .common import version


def save(model: Union[fx.GraphModule, Mapping[str, fx.GraphModule]], path: PathLike, example: Any = None) -> None:
    """Write a compiled module, or a dict of CFG branches, to one safetensors file.

    Args:
        model: what `fxquant.compile` (or `fxquant.load`) returned.
        path: the file to write (``.safetensors`` by convention).
        example: inputs with the trace's shapes (a dict of them per branch for a dict), only for a
            module that records none.

    Raises:
        FxquantError: something other than a GraphModule (or a dict of them), a module without
            fxquant records or example inputs, or export failed.
        FormatError: the file cannot be written (its folder does not exist, which `save` does not
            create; the path is a directory; no permission), naming the path.

    Example:
        >>> fxquant.save(fxquant.compile(model, "int8-w8a8", calibration=xs), "model.safetensors")  # doctest: +SKIP
    """
    path = writable(path, "save")
    branches, is_dict = as_branches(model, "save", single=SINGLE)
    for name, gm in branches.items():  # before any export: a wrong argument fails at once
        if not isinstance(gm, fx.GraphModule):
            where = f"branch {name!r} of the dict" if is_dict else "model"
            raise FxquantError(f"save: {where} is a {type(gm).__name__}; expected the GraphModule returned by "
                               f"fxquant.compile or fxquant.load, or a dict of branch name -> GraphModule")
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "branches" if is_dict else "module",
                                "fxquant_version": version(), "torch_version": torch.__version__, "order": list(branches),
                                "branches": {}}
    for name, gm in branches.items():
        ex = example.get(name) if is_dict and isinstance(example, Mapping) else example
        manifest["branches"][name] = _save_branch(name, gm, ex, f"branch {name!r}" if is_dict else "module", tensors)
    text = json.dumps(manifest, sort_keys=True)
    digested = json.dumps(digests(json.loads(text)), sort_keys=True)
    with atomic_path(path, "save") as tmp:  # a full disk raises OSError here: FormatError, old file kept
        write_safetensors(tmp, tensors, {MANIFEST_KEY: text, DIGESTS_KEY: digested})


def _save_branch(name: str, gm: fx.GraphModule, example: Any, where: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Re-export one branch, add its program and tensors to ``tensors``; returns its manifest section."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise FxquantError(f"save: branch name {name!r} must be a non-empty string of letters, digits, '_', '.', '-'")
    grec, recs = meta.graph_record(gm), meta.records(gm)
    if grec is None or not recs:
        raise FxquantError(f"save: {where} has no fxquant records; was it produced by fxquant.compile?")
    ep = export_program(gm, example)
    program = serde.serialize(ep, serialize_state_dict=False, serialize_constants=False,
                              serialize_example_inputs=False).exported_program
    tensors[f"{name}/program"] = torch.frombuffer(bytearray(program), dtype=torch.uint8)
    entries: dict[str, Any] = {f"{name}/program": entry("program", "", tensors[f"{name}/program"])}
    seen: set[int] = set()
    params = set(ep.graph_signature.parameters)
    stored = [("params" if k in params else "buffers", k, v) for k, v in ep.state_dict.items()]
    for kind, fqn, t in stored + [("constants", k, v) for k, v in ep.constants.items()]:
        if not isinstance(t, torch.Tensor) or t.dtype not in SAFETENSORS_DTYPE:
            raise FxquantError(f"save: {where}: {kind} entry {fqn!r} is a {getattr(t, 'dtype', type(t).__name__)}, "
                               f"which the format does not store")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        t = t.clone() if ptr in seen and t.numel() else t  # safetensors refuses shared storage
        seen.add(ptr)
        tensors[f"{name}/{kind}/{fqn}"] = t
        entries[f"{name}/{kind}/{fqn}"] = entry(kind, fqn, t)
    return {"graph": grec.to_json(), "layers": {r.key: r.to_json() for _, r in recs},
            "schema_version": list(serde.SCHEMA_VERSION), "tensors": entries}


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

    path = fspath(path, "load")
    header = read_header(path)
    manifest = check_manifest(path, header)
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
            expected, found = find_entry(manifest, key)["sha256"], sha256(t)
            if found != expected:
                raise FormatError(f"{path}: tensor {key!r}: data does not match its sha256 in the metadata "
                                  f"(corrupt bytes); expected {expected[:16]}…, found {found[:16]}…")
            checked[key] = t
    out = {name: _build(path, name, manifest["branches"][name], checked, manifest["torch_version"])
           for name in manifest["order"]}
    return unless_dict(out, manifest["kind"] == "branches")


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
        import_output_types(sp)
        ep = serde.ExportedProgramDeserializer().deserialize(sp, state, constants, None)
        gm = exported_module(ep)  # as after tracing: torch.compile needs it
    except Exception as e:  # noqa: BLE001 - a program torch cannot rebuild is a format problem here
        raise FormatError(f"{path}: tensor '{name}/program': torch {torch.__version__} cannot deserialize the program "
                          f"(saved with torch {saved_with}): {describe(e)}") from e
    found = {r.key: r.to_json() for _, r in meta.records(gm)}
    for layer in sorted(found.keys() | br["layers"].keys()):
        if found.get(layer) != _record_json(br["layers"].get(layer)):
            raise FormatError(f"{path}: metadata of layer {layer!r} (branch {name!r}) disagrees with the saved graph")
    try:
        grec = meta.GraphRecord.from_json(br["graph"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"{path}: metadata key 'branches/{name}/graph' is malformed ({type(e).__name__}: {e})") from None
    meta.set_graph_record(gm, grec)
    return module.adopt(gm)


def _record_json(raw: Any) -> Any:
    """A manifest's layer record in this version's JSON form (format 1 records are upgraded the way
    the graph's own records are), or the raw value if it is not a record at all."""
    try:
        return meta.LinearRecord.from_json(raw).to_json()
    except (KeyError, TypeError, ValueError, AttributeError):
        return raw


def import_output_types(sp: Any) -> None:
    """Import the installed modules that define the program's pytree types (e.g. diffusers' output
    dataclass registers itself as a pytree node on import); torch cannot rebuild the specs otherwise."""
    names: set[str] = set()

    def walk(spec: Any) -> None:
        if isinstance(spec, dict):
            if isinstance(spec.get("type"), str):
                names.add(spec["type"])
            for c in spec.get("children_spec", ()):
                walk(c)

    for call in sp.graph_module.module_call_graph:
        sig = call.signature
        for s in (sig.in_spec, sig.out_spec) if sig is not None else ():
            try:
                walk(json.loads(s)[1])
            except (json.JSONDecodeError, IndexError, TypeError):
                continue
    for name in names - set(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE):
        module = name.rpartition(".")[0]
        if re.fullmatch(r"[A-Za-z_][\w.]*", module or "") and importlib.util.find_spec(module.split(".")[0]):
            importlib.import_module(module)
