"""Re-export a lowered module to a ``torch.export`` program (and ``.pt2``) from its recorded shapes.

    compile(model, recipe, calibration=[x, ...])
        GraphRecord.example_inputs = describe_inputs(x)      {"dict": {"hidden_states": {"tensor":
                                                               {"shape": [2, 24, 16], "dtype": "float32"}}, ...}}
    export_program(gm)
        example_from(example_inputs) -> zeros of those shapes and dtypes
        -> torch.export.export(gm, zeros, dynamic batch/seq, strict=False) -> ExportedProgram

The export runs on a private copy of the module's graph and node metadata (torch writes
``_torchdynamo_disable*`` annotations into the metadata of the module it traces), and the program
is made reproducible: torch's annotations and the ``from_node`` provenance (which records Python
object ids) are dropped. `pt2.save_pt2` writes the program as a ``.pt2``.

Only shapes and dtypes are kept, never values: non-strict export traces on fake tensors. The
fxquant artifact (`fxquant.artifacts.io.save`) stores the program this module produces.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from typing import Any, Mapping, Union

import torch
import torch.fx as fx

from .. import meta, trace
from ..errors import FxquantError, describe
from .common import DTYPE_BY_NAME

EVAL_KEY = re.compile(r"<eval_with_key>\.\d+")
DYNAMO_KEYS = "_torchdynamo_disable"  # torch.export's annotations of @torch._dynamo.disable frames


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
    if not isinstance(gm, fx.GraphModule):
        raise FxquantError(f"export: expected the GraphModule returned by fxquant.compile or fxquant.load, got a "
                           f"{type(gm).__name__}; compile it first (fxquant.compile(model, recipe, calibration=...))")
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
    private = _private_copy(gm)
    try:
        with torch.no_grad():
            ep = torch.export.export(private, args, kwargs, dynamic_shapes=trace.dynamic_shapes(gm, args, kwargs),
                                     strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with what was being exported
        raise FxquantError(f"export: torch.export failed on the lowered module: {describe(e)}") from e
    _reproducible(ep)
    return ep


def _private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s tensors but owning its graph, node metadata and ``meta``, so
    that whatever export writes while tracing stays out of the caller's module."""
    with warnings.catch_warnings():  # copying the pytree codegen trips torch's own LeafSpec deprecation
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    for n in graph.nodes:  # graph copies share each node's meta values; "custom" is the one export writes
        if "custom" in n.meta:
            n.meta["custom"] = copy.deepcopy(n.meta["custom"])
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta = copy.deepcopy(gm.meta)
    return out


def _reproducible(ep: torch.export.ExportedProgram) -> None:
    """Drop what differs between two exports of the same module: torch's dynamo annotations in
    ``custom``, ``from_node`` provenance (it records ``id()`` of intermediate graphs) and the
    per-process counter in the names of fx-generated code in stack traces."""
    nodes = [n for m in ep.graph_module.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes]
    for n in nodes:  # submodules too: a nested graph (e.g. of a higher-order op) carries the same fields
        n.meta.pop("from_node", None)
        if isinstance(n.meta.get("stack_trace"), str):  # fx numbers the code it generates per process
            n.meta["stack_trace"] = EVAL_KEY.sub("<eval_with_key>", n.meta["stack_trace"])
        custom = n.meta.get("custom")
        if isinstance(custom, dict) and any(k.startswith(DYNAMO_KEYS) for k in custom):
            n.meta["custom"] = {k: v for k, v in custom.items() if not k.startswith(DYNAMO_KEYS)}
