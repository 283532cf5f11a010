"""Write a GGUF-lowered module to a ``.gguf`` file with gguf-py's writer.

    GraphModule (after lower_gguf)                  model.gguf
      layers.0.feed_forward.w2.qweight  uint8  ->    layers.0.feed_forward.w2.weight  Q4_K  [256, 512]
      layers.0.feed_forward.w2.bias     f32    ->    layers.0.feed_forward.w2.bias    F32   [256]
      input_proj.weight (kept float)    bf16   ->    input_proj.weight                BF16  [256, 32]
      input_proj.bias                   bf16   ->    input_proj.bias                  F32   [256]

Tensor names are the source model's state-dict keys, so diffusers (or anything reading
diffusers names) finds every tensor where the float checkpoint had it. Quantized tensors are the
packed bytes the op runs on, written raw with their ``GGMLQuantizationType`` and logical shape;
float tensors keep their dtype (F32, F16 or BF16), except that BF16 tensors other than linear
weights (biases, norm gains, embeddings) are written F32, losslessly: GGUF readers return BF16 as
raw bytes, which diffusers decodes only for linear weights. Metadata: ``general.architecture`` is the
source model's class name; ``fxquant.*`` keys hold the recipe (JSON), the fxquant version, the
model's diffusers config (JSON), the branch and the per-linear scheme and note;
``fxquant.tensor_sha256`` holds each tensor's type, shape and sha256, ``fxquant.metadata_sha256`` the
sha256 of every other key (`gguf_file.verify_gguf` checks both). The file is written to a temp
file beside the target and renamed into place (`common.atomic_path`).

A dict of CFG branches is written as one file per branch, ``<dir>/<branch>.gguf``: GGUF has one
tensor namespace, and each branch is a complete set of weights a loader reads on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union

import numpy as np
import torch
import torch.fx as fx

from .. import codecs, graph, meta
from ..branches import as_branches
from ..errors import FormatError, FxquantError, MissingDependencyError
from .common import atomic_path, fspath, version, writable
from .gguf_file import ARRAY, METADATA_DIGESTS, TENSOR_DIGESTS, decoded, read_gguf, value_digest, verify_gguf

LINEAR_GGUF = "fxquant::linear_gguf"
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as written: GGUF type name, logical shape, bytes in the file, bits per element."""

    name: str
    ggml_type: str  # "Q4_K" | "Q8_0" | "F32" | "F16" | "BF16"
    shape: tuple[int, ...]
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / max(1, int(np.prod(self.shape)))


@dataclass(frozen=True)
class GGUFReport:
    """What `save_gguf` wrote: every tensor, and the file's size on disk."""

    path: str
    tensors: tuple[TensorEntry, ...]
    file_bytes: int

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type] = out.get(t.ggml_type, 0) + t.nbytes
        return out

    def bits_per_weight(self, ggml_type: str) -> float:
        """Bits per element over all tensors of ``ggml_type`` (4.5 for Q4_K, 8.5 for Q8_0)."""
        sel = [t for t in self.tensors if t.ggml_type == ggml_type]
        if not sel:
            raise KeyError(f"no {ggml_type} tensors in {self.path}")
        return sum(t.nbytes for t in sel) * 8 / sum(int(np.prod(t.shape)) for t in sel)

    def __str__(self) -> str:
        lines = [f"{self.path}: {len(self.tensors)} tensors, {self.file_bytes} bytes on disk"]
        for ty, nbytes in sorted(self.bytes_by_type().items()):
            n = sum(1 for t in self.tensors if t.ggml_type == ty)
            lines.append(f"  {ty:5} {n:4d} tensors  {nbytes:12d} bytes  {self.bits_per_weight(ty):6.2f} bits/weight")
        return "\n".join(lines)

    __repr__ = __str__


def _ggml(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _quantized(gm: fx.GraphModule) -> dict[str, tuple[str, int, str]]:
    """qweight buffer target -> (qtype, in_features, GGUF tensor name), read from the op arguments
    (they survive re-export) and the layer record (the name is the float weight's state-dict key)."""
    out: dict[str, tuple[str, int, str]] = {}
    for n in gm.graph.nodes:
        if not (n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                and n.target.namespace == "fxquant"):
            continue
        rec = meta.get(n)
        where = rec.name if rec else n.name
        if n.target.name() != LINEAR_GGUF:
            raise FxquantError(f"save_gguf: layer {where!r} is lowered to {n.target.name()}, which GGUF cannot store; "
                               "only q4_k / q8_0 recipes can be exported to .gguf")
        qweight, qtype, in_features = n.args[1], n.args[2], n.args[3]
        name = f"{rec.name}.weight" if rec else str(qweight.target).rpartition(".")[0] + ".weight"
        out[str(qweight.target)] = (qtype, int(in_features), name)
    return out


def _tensors(gm: fx.GraphModule) -> list[tuple[str, np.ndarray, Any, TensorEntry]]:
    """(GGUF name, array, raw GGML type or None, report entry) for every state-dict tensor."""
    quant = _quantized(gm)
    linear_weights = {str(n.args[1].target) for n in graph.linear_nodes(gm)}
    out = []
    for key, t in gm.state_dict().items():
        t = t.detach().cpu().contiguous()
        if key in quant:
            qtype, cols, name = quant[key]
            if t.dtype != torch.uint8 or t.ndim != 2 or t.shape[1] != codecs.row_bytes(qtype, cols):
                raise FormatError(f"save_gguf: {key}: expected uint8 [rows, {codecs.row_bytes(qtype, cols)}] for "
                                  f"{qtype} with {cols} columns, got {t.dtype} {list(t.shape)}")
            ty = qtype.upper()
            out.append((name, t.numpy(), _ggml(ty), TensorEntry(name, ty, (t.shape[0], cols), t.numel())))
        elif t.dtype in FLOAT_TYPES:
            if t.dtype == torch.bfloat16 and key not in linear_weights:
                # GGUF readers hand BF16 back as raw bytes, and diffusers only decodes those inside
                # GGUFLinear weights: a BF16 bias, norm gain or embedding would load as bytes.
                # llama.cpp's converters keep such tensors F32 too; the upcast is lossless.
                t = t.float()
            ty = FLOAT_TYPES[t.dtype]
            # numpy has no bfloat16: hand the writer the raw bytes and the BF16 type.
            arr = t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            raw = _ggml(ty) if t.dtype == torch.bfloat16 else None
            out.append((key, arr, raw, TensorEntry(key, ty, tuple(t.shape), t.numel() * t.element_size())))
        else:
            raise FormatError(f"save_gguf: tensor {key!r} has dtype {t.dtype}; expected a float (F32/F16/BF16) "
                              f"tensor or a GGUF-packed weight")
    names = [e[0] for e in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FormatError(f"save_gguf: tensor name(s) {dup} would be written twice (a float weight beside its qweight)")
    return out


def _write_one(gm: fx.GraphModule, path: str) -> GGUFReport:
    if not isinstance(gm, fx.GraphModule):
        raise FxquantError(f"save_gguf: expected a GraphModule from fxquant.compile (or a dict of them), "
                           f"got {type(gm).__name__}")
    g = meta.graph_record(gm)
    if g is None or not meta.records(gm):
        raise FxquantError("save_gguf: this module has no fxquant records; was it produced by fxquant.compile "
                           "with a q4_k or q8_0 recipe?")
    if not g.model_class:
        raise FxquantError("save_gguf: the graph record does not name the source model class; "
                           "compile the model with this version of fxquant")
    try:
        import gguf
    except ImportError:  # an optional dependency: say which
        raise MissingDependencyError("save_gguf needs gguf-py: pip install 'fxquant[gguf]'") from None
    tensors = _tensors(gm)
    linears = [{"name": r.name, "scheme": r.lowering.scheme.value if r.lowering else "float",
                "selection": r.selection.kind.value if r.selection else "",
                "note": r.lowering.note if r.lowering else ""} for _, r in meta.records(gm)]
    S = gguf.GGUFValueType.STRING
    kv = {"general.architecture": (S, g.model_class), "general.type": (S, "model"),
          "general.name": (S, g.model_class + (f" ({g.branch})" if g.branch else "")),
          "general.quantization_version": (gguf.GGUFValueType.UINT32, gguf.GGML_QUANT_VERSION),
          "fxquant.version": (S, version()), "fxquant.model_class": (S, g.model_class),
          "fxquant.recipe": (S, json.dumps(g.recipe, sort_keys=True)), "fxquant.linears": (S, json.dumps(linears))}
    if g.model_config is not None:
        kv["fxquant.model_config"] = (S, json.dumps(g.model_config, sort_keys=True))
    if g.branch:
        kv["fxquant.branch"] = (S, g.branch)
    kv[TENSOR_DIGESTS] = (S, json.dumps({e.name: {"type": e.ggml_type, "ne": list(reversed(e.shape)),
                                                    "sha256": hashlib.sha256(np.ascontiguousarray(arr)).hexdigest()}
                                         for _, arr, _, e in tensors}, sort_keys=True))
    kv[METADATA_DIGESTS] = (S, json.dumps({k: value_digest(t, v) for k, (t, v) in kv.items()}, sort_keys=True))
    with atomic_path(path, "save_gguf") as tmp:
        w = gguf.GGUFWriter(tmp, arch=g.model_class)  # adds general.architecture itself
        try:
            for key, (vtype, value) in kv.items():
                if key != "general.architecture":
                    w.add_key_value(key, value, vtype)
            for name, arr, raw, _ in tensors:
                w.add_tensor(name, arr, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return GGUFReport(os.fspath(path), tuple(e for *_, e in tensors), os.path.getsize(path))


def save_gguf(gm_or_dict: Union[fx.GraphModule, Mapping[str, fx.GraphModule]],
              path: Union[str, "os.PathLike[str]"]) -> Union[GGUFReport, dict[str, GGUFReport]]:
    """Write a module lowered by a ``q4_k`` / ``q8_0`` recipe to a ``.gguf`` file.

    Args:
        gm_or_dict: the result of `fxquant.compile`; a dict of CFG branches writes one file per
            branch, ``<path>/<branch>.gguf`` (``path`` is then a folder, created if missing).
        path: the file (or, for a dict, directory) to write.

    Returns:
        A `GGUFReport` (tensor types, bits per weight, bytes on disk), or a dict of them.

    Raises:
        FxquantError: not an fxquant-compiled module, or lowered to a scheme GGUF cannot store (w8a8).
        FormatError: a tensor of a dtype GGUF cannot hold, a malformed packed weight, or the file
            cannot be written (naming the path; an existing file is kept).

    Example:
        >>> gm = fxquant.compile(model, "q4_k", calibration=[inputs])  # doctest: +SKIP
        >>> print(fxquant.save_gguf(gm, "ideogram4-q4_k.gguf"))        # doctest: +SKIP
    """
    branches, is_dict = as_branches(gm_or_dict, "save_gguf")
    if is_dict:
        bad = [b for b in branches if os.sep in b or b in (".", "..")]
        if bad:
            raise FxquantError(f"save_gguf: branch names {bad} cannot be file names")
        folder = fspath(path, "save_gguf")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise FormatError(f"save_gguf: cannot write the branches into {folder}: it is a file; a dict of branches "
                              f"is written as one file per branch, <folder>/<branch>.gguf")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise FormatError(f"save_gguf: cannot create the folder {folder}: {e.strerror or e}") from None
        return {b: _write_one(g, os.path.join(folder, f"{b}.gguf")) for b, g in branches.items()}
    return _write_one(branches[""], writable(path, "save_gguf"))


def gguf_metadata(path: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
    """The ``general.*`` and ``fxquant.*`` metadata of a ``.gguf`` file written by `save_gguf`, after
    verifying the file's structure and digests (`gguf_file.verify_gguf`); JSON values decoded.

    Raises:
        FormatError: ``path`` is not a well-formed GGUF file, a key or tensor does not match its
            digest (naming it), a JSON value is malformed, or the file was not written by `save_gguf`.
    """
    g = read_gguf(path)
    if "fxquant.version" not in g.kv:
        raise FormatError(f"{g.path}: no fxquant.version key; this file was not written by fxquant.save_gguf")
    verify_gguf(g)
    out = {k: (v[1] if v[0] != ARRAY else v[1][1]) for k, v in g.kv.items() if k.startswith(("general.", "fxquant."))}
    for key in ("fxquant.recipe", "fxquant.model_config", "fxquant.linears", TENSOR_DIGESTS, METADATA_DIGESTS):
        if key in out:
            out[key] = decoded(g, key)
    return out
