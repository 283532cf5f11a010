"""Frontend: a module and one example input -> an FX GraphModule with dynamic batch and sequence.

``torch.export`` (non-strict) keeps every ``nn.Linear`` as one ``aten.linear`` whose weight is a
``get_attr`` named by the diffusers state-dict key, which is how passes name layers.

Dynamic dimensions: dims 0 (batch) and 1 (sequence) of every tensor input are exported as
``Dim.AUTO``: dynamic unless the model pins them (a feature dim that happens to be dim 1 of a
2-D input is pinned by the weights it meets).
A batch of 1 would be specialised by export, so a batch-1 example is traced repeated to 2.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.export import Dim

from .errors import CalibrationError, TraceError


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
    """The batch size shared by every tensor input (dim 0), or None if they disagree or there is none."""
    sizes = {t.shape[0] for t in _tensors((args, kwargs)) if t.ndim >= 1}
    return sizes.pop() if len(sizes) == 1 else None


def repeat_batch(tree: Any) -> Any:
    """Every tensor (ndim >= 1) repeated twice along dim 0: export specialises a batch of 1."""
    return torch.utils._pytree.tree_map(
        lambda t: torch.cat([t, t], 0) if isinstance(t, torch.Tensor) and t.ndim >= 1 else t, tree
    )


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Specs keyed like the bound arguments of ``model.forward``, as torch.export wants them."""

    def spec(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.ndim == 0:
            return None
        dims = {0: Dim.AUTO}
        if t.ndim >= 2:
            dims[1] = Dim.AUTO
        return dims

    if not kwargs:
        return torch.utils._pytree.tree_map(spec, args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.items()}


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
    args, kwargs = as_args_kwargs(example)
    if batch_of(args, kwargs) == 1:
        args, kwargs = repeat_batch((args, kwargs))
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod: torch.nn.Module, _a: Any) -> None:
        stack.append(names.get(mod, type(mod).__name__))

    def post(mod: torch.nn.Module, _a: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_shapes(model, args, kwargs), strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the module that failed
        where = stack[-1] if stack else "<root>"
        where = where or f"<root {type(model).__name__}>"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"cannot trace {type(model).__name__}: failed in module {where!r}: {type(e).__name__}: {msg}") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    gm = ep.module()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm


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
    return list(calibration)
