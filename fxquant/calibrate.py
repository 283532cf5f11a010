"""Calibration inputs from real use: record what a transformer is called with, and read timesteps.

    with fxquant.record_inputs(pipe.transformer, max_items=8) as rec_c, \\
         fxquant.record_inputs(pipe.unconditional_transformer, max_items=8) as rec_u:
        pipe(prompt, num_inference_steps=24)
    gms = fxquant.compile({"cond": pipe.transformer, "uncond": pipe.unconditional_transformer},
                          "int8-w8a8", calibration={"cond": rec_c, "uncond": rec_u})

A forward pre-hook stores each call's arguments (bound to parameter names, so every item is a
dict of keyword arguments; tensors detached and cloned onto the CPU), which is exactly the
``calibration=`` format. Each CFG branch records the inputs it really sees.

Timesteps (`timestep_of`): the argument named ``timestep``, ``timesteps`` or ``t`` (positional
arguments are bound to the module's ``forward`` signature first). A 0-d or one-element tensor
gives its value; a per-sample ``(B,)`` or per-token ``(B, L)`` tensor gives its mean (one
calibration input = one trajectory step; a batch that mixes steps is pooled at their mean).
No such argument: the input's index in the calibration sequence is its step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Iterator, Optional

import torch

from .errors import CalibrationError, is_int

TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def bind_arguments(fn: Any, args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    """``args``/``kwargs`` as one dict keyed by parameter name, or None if ``fn`` takes ``*args``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()) and args:
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CalibrationError(f"arguments do not match {getattr(fn, '__qualname__', fn)}{sig}: {e}") from None
    out = dict(bound.arguments)
    for name, p in sig.parameters.items():  # **kwargs of the callee come back nested: flatten them
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


def timestep_value(value: Any, where: str) -> Optional[float]:
    """A timestep argument -> one float (mean of a per-sample / per-token tensor); None if absent."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() > 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        return float(value.detach().double().mean())
    raise CalibrationError(f"{where}: expected a number or a non-empty real tensor as the timestep, got {value!r}")


def timestep_of(fn: Any, args: tuple, kwargs: dict, where: str) -> Optional[float]:
    """The timestep of one call of ``fn(*args, **kwargs)`` (see the module docstring), or None."""
    named = dict(kwargs)
    if args:
        named = bind_arguments(fn, args, kwargs) or named
    for name in TIMESTEP_NAMES:
        if name in named:
            return timestep_value(named[name], f"{where}.{name}")
    return None


# record_inputs' default memory budget. At Ideogram 4's real settings (1024x1024, 2048 text
# tokens, 53248-wide LLM features, bf16) one call is about 1.8 GiB, and the default max_items=64
# would keep over 100 GiB: the budget stops that with an error instead.
DEFAULT_MAX_BYTES = 4 << 30


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def _to_cpu(x: Any) -> Any:
    # clone: a denoising loop may update its latents in place after the call.
    return torch.utils._pytree.tree_map(
        lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t, x)


class Recorder(Sequence):
    """The recorded inputs: a sequence of keyword-argument dicts, usable as ``calibration=``.

    ``timesteps[i]`` is the timestep of item ``i`` (None if the module takes none) and
    ``call_indices[i]`` the index of the forward call it came from; ``calls`` counts every call
    seen, recorded or not.
    """

    def __init__(self, module: torch.nn.Module, max_items: int, max_bytes: int = 0) -> None:
        self._module = module
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.nbytes = 0  # bytes of the items kept now
        self.items: list[Any] = []
        self.timesteps: list[Optional[float]] = []
        self.call_indices: list[int] = []
        self.stride = 1
        self.calls = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: Any) -> Any:
        return self.items[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __repr__(self) -> str:
        return f"Recorder({len(self)} of {self.calls} calls, stride {self.stride}, timesteps {self.timesteps})"

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        i = self.calls
        self.calls += 1
        if i % self.stride:
            return
        if len(self.items) == self.max_items:
            # Full: keep every other item and double the stride, so the kept calls stay evenly
            # spread over the whole trajectory (not just its first steps) at bounded memory.
            keep = slice(0, None, 2)
            self.items, self.timesteps, self.call_indices = self.items[keep], self.timesteps[keep], self.call_indices[keep]
            self.nbytes = sum(_nbytes(it) for it in self.items)
            self.stride *= 2
            if i % self.stride:
                return
        where = f"record_inputs({type(module).__name__}) call {i}"
        size = _nbytes((args, kwargs))
        if self.nbytes + size > self.max_bytes:
            raise CalibrationError(
                f"{where}: keeping this call's inputs ({size / 2**20:.1f} MiB) would hold "
                f"{(self.nbytes + size) / 2**20:.1f} MiB, over the budget max_bytes={self.max_bytes} "
                f"({self.max_bytes / 2**30:.2f} GiB) with {len(self.items)} item(s) kept; use fxquant.observe(module) "
                "to stream statistics without keeping inputs, or lower max_items / raise max_bytes")
        named = bind_arguments(module.forward, args, kwargs)
        if named is None:
            if kwargs:
                raise CalibrationError(f"{where}: forward takes *args and was called with keyword arguments too; "
                                       "a calibration item is either positional or keyword arguments")
            item: Any = _to_cpu(tuple(args))
        else:
            item = _to_cpu(named)
        self.items.append(item)
        self.nbytes += size
        self.timesteps.append(timestep_of(module.forward, args, kwargs, where))
        self.call_indices.append(i)


class record_inputs:  # noqa: N801 - used as a context manager, reads like a function
    """Record a module's inputs while ordinary code (a denoising loop, a diffusers pipeline) runs.

    Args:
        module: the transformer (one CFG branch) whose calls to record. It is not modified
            beyond a forward pre-hook that is removed on exit.
        max_items: the most inputs kept. Beyond it, every other kept input is dropped and only
            every 2nd (then 4th, ...) call is recorded, so the items stay evenly spread over all
            calls: a 50-step loop with ``max_items=8`` keeps calls 0, 8, 16, ..., 48.
        max_bytes: the most bytes of tensors kept (default 4 GiB, `DEFAULT_MAX_BYTES`). A call
            whose inputs would exceed it raises a `CalibrationError` naming the call and the
            budget, never a silent 100 GiB; `fxquant.observe` streams statistics instead.

    Returns (on ``__enter__``):
        A `Recorder`: a sequence of keyword-argument dicts on the CPU, with ``.timesteps``.

    Raises:
        CalibrationError: ``max_items`` < 1, ``max_bytes`` < 1, a call whose arguments cannot be
            bound, or inputs over ``max_bytes``.

    Example:
        >>> with fxquant.record_inputs(model, max_items=4) as rec:  # doctest: +SKIP
        ...     for t in (0.2, 0.5, 0.8):
        ...         model(**inputs_at(t))
        >>> gm = fxquant.compile(model, recipe, calibration=rec)  # doctest: +SKIP
    """

    def __init__(self, module: torch.nn.Module, max_items: int = 64, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if not isinstance(module, torch.nn.Module):
            raise CalibrationError(f"record_inputs: expected an nn.Module, got {type(module).__name__}")
        if not is_int(max_items, 1):
            raise CalibrationError(f"record_inputs: max_items must be an integer >= 1, got {max_items!r}")
        if not is_int(max_bytes, 1):
            raise CalibrationError(f"record_inputs: max_bytes must be an integer >= 1, got {max_bytes!r}")
        self.recorder = Recorder(module, max_items, max_bytes)
        self._handle: Any = None

    def __enter__(self) -> Recorder:
        self._handle = self.recorder._module.register_forward_pre_hook(self.recorder._hook, with_kwargs=True)
        return self.recorder

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
