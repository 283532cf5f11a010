"""Frontend: a module and one example input -> an FX GraphModule with dynamic batch and sequence.

``torch.export`` (non-strict) keeps every ``nn.Linear`` as one ``aten.linear`` whose weight is a
``get_attr`` named by the diffusers state-dict key, which is how passes name layers.

Dynamic dimensions: dims 0 (batch) and 1 (sequence) of every tensor input are exported as
``Dim.AUTO``: dynamic unless the model pins them (a feature dim that happens to be dim 1 of a
2-D input is pinned by the weights it meets).
A batch of 1 would be specialised by export, so a batch-1 example is traced with every input
whose dim 0 is 1 repeated to 2 (inputs without a batch dim, such as Flux's ``img_ids``, keep
their shape); if the model then pins one of those dims, tracing fails with a `TraceError` rather
than returning a module locked to batch 2.

``with torch.autocast(...)`` blocks, which export keeps as ``wrap_with_autocast`` regions that
``torch.compile`` cannot trace at a new shape, are inlined between enter/exit autocast calls
(`passes.inline_autocast`; same autocast state, bit-identical outputs).

The caller's model is left as it was: parameters are shared with the GraphModule but never
written (passes rebind new tensors), ``requires_grad`` and every submodule's training flag are
untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import sys
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .errors import CalibrationError, TraceError, describe


def as_args_kwargs(example: Any, where: str = "calibration[0]") -> tuple[tuple, dict]:
    """A calibration item (dict of keyword arguments or tuple of positional ones) -> (args, kwargs)."""
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, torch.Tensor):
        return (example,), {}
    raise CalibrationError(
        f"{where}: expected a dict of keyword arguments or a tuple of positional arguments, got {type(example).__name__}"
    )


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def batch_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size: dim 0 of the first tensor input with >= 2 dims (else >= 1 dim), or None."""
    tensors = _tensors((args, kwargs))
    for t in [t for t in tensors if t.ndim >= 2] + [t for t in tensors if t.ndim == 1]:
        return int(t.shape[0])
    return None


def repeat_batch(tree: Any) -> Any:
    """Every tensor whose dim 0 is 1 repeated to 2 along dim 0: export specialises a batch of 1."""
    return torch.utils._pytree.tree_map(
        lambda t: torch.cat([t, t], 0) if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == 1 else t, tree
    )


def dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Specs keyed like the bound arguments of ``model.forward``, as torch.export wants them."""

    def spec(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.ndim == 0:
            return None
        dims = {0: Dim.AUTO}
        if t.ndim >= 2:
            dims[1] = Dim.AUTO
        return dims

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise CalibrationError(f"calibration[0]: the inputs do not fit {type(model).__name__}.forward"
                               f"{inspect.signature(model.forward)}: {e}") from None
    # Keyed by parameter name: a `*args` parameter gets the tuple of its inputs' specs.
    return {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.items()}


def check_model(model: torch.nn.Module) -> None:
    """Refuse what torch would fail on later with a foreign error: tensors without data."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise TraceError(f"{type(model).__name__}: {kind} {name!r} is on the meta device (it has no values); "
                                 "load the weights first (e.g. from_pretrained without device_map='meta', or "
                                 "model.to_empty(device='cpu') then load_state_dict)")


def trace(model: torch.nn.Module, example: Any) -> fx.GraphModule:
    """Export ``model`` on ``example`` to a GraphModule that accepts the model's own call signature.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can trace non-strictly.
        example: a dict of keyword arguments or a tuple of positional arguments.

    Returns:
        A GraphModule with dynamic batch and sequence dims; it shares parameters with ``model``
        (passes replace tensors, never write into them).

    Raises:
        TraceError: naming the innermost module being traced and the cause.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    check_model(model)
    args, kwargs = as_args_kwargs(example)
    orig = (args, kwargs)
    if batch_of(args, kwargs) == 1:
        args, kwargs = repeat_batch((args, kwargs))
    gm = exported_module(_export(model, args, kwargs))
    _check_repeated_batch_dynamic(gm, orig, (args, kwargs))
    _own_parameters(gm)
    return gm


def _own_parameters(gm: fx.GraphModule) -> None:
    """New Parameter objects without grad: the caller's keep their ``requires_grad``."""
    for name, p in list(gm.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        mod._parameters[leaf] = torch.nn.Parameter(p.detach(), requires_grad=False)



def exported_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """``ep.module()`` in the form `trace` returns: ``torch.autocast`` regions inlined
    (`passes.inline_autocast`), so ``torch.compile`` traces it at every shape. `fxquant.load` and
    `fxquant.dtypes` rebuild modules through it."""
    # Imported here: the pass uses graph.py, which imports this module.
    from .passes.inline_autocast import InlineAutocast

    return InlineAutocast()(ep.module()).graph_module


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` in eval mode with dynamic dims; a failure is a `TraceError` naming the
    innermost module being traced (the model's training flags are restored either way)."""
    stack: list[str] = []
    flags = {m: m.training for m in model.modules()}

    def enter(name: str) -> Any:
        return lambda _m, _a: stack.append(name or f"<root {type(model).__name__}>")

    def leave(_m: torch.nn.Module, _a: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    # Per-module hooks (not the process-wide ones) tell which module was being traced on failure.
    handles = [h for name, m in model.named_modules()
               for h in (m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave))]
    shapes = dynamic_shapes(model, args, kwargs)
    err = io.StringIO()
    try:
        model.eval()
        # torch.export prints the partial graph of a failed trace to stderr: keep it on the error instead.
        with torch.no_grad(), contextlib.redirect_stderr(err):
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the module that failed
        where = stack[-1] if stack else f"<root {type(model).__name__}>"
        partial = getattr(e, "partial_fx_graph", None)
        rest = err.getvalue().replace(f"{partial}\n", "") if partial else err.getvalue()
        sys.stderr.write(rest if rest.strip() else "")
        error = TraceError(f"cannot trace {type(model).__name__}: failed in module {where!r}: {describe(e)}")
        error.partial_graph = partial  # the graph traced up to the failure, for debugging
        raise error from e
    else:
        sys.stderr.write(err.getvalue())  # warnings printed during a successful trace
    finally:
        for h in handles:
            h.remove()
        for m, training in flags.items():
            m.training = training
    return ep


def _check_repeated_batch_dynamic(gm: fx.GraphModule, orig: tuple, traced: tuple) -> None:
    """A dim 0 we repeated from 1 to 2 must have stayed symbolic, or the module would need batch 2."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None or orig is traced:
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat_o, flat_t = fx_pytree.tree_flatten_spec(orig, spec), fx_pytree.tree_flatten_spec(traced, spec)
    for o, t, ph in zip(flat_o, flat_t, placeholders):
        val = ph.meta.get("val")
        if isinstance(o, torch.Tensor) and o is not t and isinstance(val, torch.Tensor) and is_concrete_int(val.shape[0]):
            raise TraceError(
                f"input {ph.target!r}: the model pins its dim 0 (batch), so a batch-1 example "
                f"cannot be traced with a dynamic batch; give calibration[0] the batch size the model needs"
            )


def check_calibration(calibration: Any, where: str) -> list[Any]:
    if calibration is None:
        raise CalibrationError(f"{where}: calibration inputs are required (the first one is also the tracing example)")
    if isinstance(calibration, (Mapping, torch.Tensor)) or not isinstance(calibration, Sequence):
        items = list(calibration) if hasattr(calibration, "__iter__") and not isinstance(calibration, (Mapping, torch.Tensor)) else None
        if items is None:
            raise CalibrationError(f"{where}: expected a sequence of example inputs, got {type(calibration).__name__}")
        calibration = items
    if len(calibration) == 0:
        raise CalibrationError(f"{where}: calibration is empty; give at least one example input")
    for i, item in enumerate(calibration):
        as_args_kwargs(item, f"{where}[{i}]")
        for path, leaf in torch.utils._pytree.tree_flatten_with_path(item)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.is_meta:
                raise CalibrationError(f"{where}[{i}]{torch.utils._pytree.keystr(path)}: the tensor is on the meta "
                                       "device (it has no values); calibration needs real inputs")
    return list(calibration)
