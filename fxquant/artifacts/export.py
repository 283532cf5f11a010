"""Re-export a lowered module to a ``torch.export`` program (and ``.pt2``) from its recorded shapes.

    compile(model, recipe, calibration=[x, ...])
        GraphRecord.example_inputs = describe_inputs(x)      {"dict": {"hidden_states": {"tensor":
                                                               {"shape": [2, 24, 16], "dtype": "float32"}}, ...}}
    export_program(gm)
        example_from(example_inputs) -> zeros of those shapes and dtypes
        -> torch.export.export(gm, zeros, dynamic batch/seq, strict=False) -> ExportedProgram
    save_pt2(gm, "m.pt2") = torch.export.save(export_program(gm), "m.pt2")

Only shapes and dtypes are kept, never values: non-strict export traces on fake tensors. The
fxquant artifact (`fxquant.artifacts.io.save`) stores the program this module produces.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Union

import torch
import torch.fx as fx

from .. import meta, trace
from ..errors import FormatError, FxquantError, describe
from .common import DTYPE_BY_NAME, PathLike, writable



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
    if kind == "tensor" and v.get("dtype") in DTYPE_BY_NAME:
        return torch.zeros(v["shape"], dtype=DTYPE_BY_NAME[v["dtype"]])
    if kind == "dict":
        return {k: example_from(x, f"{where}.{k}") for k, x in v.items()}
    if kind in ("list", "tuple"):
        items = [example_from(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return items if kind == "list" else tuple(items)
    if kind == "value":
        return v
    raise FxquantError(f"{where}: cannot rebuild an example input from {desc!r}; pass example= explicitly")


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
            return torch.export.export(gm, args, kwargs, dynamic_shapes=trace.dynamic_shapes(gm, args, kwargs),
                                       strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with what was being exported
        raise FxquantError(f"export: torch.export failed on the lowered module: {describe(e)}") from e


def save_pt2(gm: fx.GraphModule, path: PathLike, example: Any = None) -> None:
    """``torch.export.save(export_program(gm, example), path)``; reload with ``torch.export.load``
    after ``import fxquant`` (and the module defining the output type, e.g. ``import diffusers.models.modeling_outputs``).

    Raises:
        FxquantError: as `export_program`.
        FormatError: the file cannot be written (a missing folder, which is not created; a directory).
    """
    path = writable(path, "save_pt2")
    ep = export_program(gm, example)
    try:
        torch.export.save(ep, path)
    except OSError as e:  # no permission, a full disk
        raise FormatError(f"save_pt2: cannot write {path}: {e.strerror or e}") from None
