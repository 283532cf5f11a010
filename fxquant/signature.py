"""The source model's call signature, kept by a lowered module: keyword or positional calls,
``return_dict``, and the non-tensor arguments a pipeline passes.

    model.forward(hidden_states, timestep, ..., attention_kwargs=None, return_dict=True)
    compile:  CallSpec.record(model, calibration[0])
              every calibration item -> spec.canonical(item)   {"hidden_states": t, "timestep": t, ...}
              the graph is traced on canonical items: tensor arguments only, non-tensor arguments at
              their defaults (or, if calibration[0] gives another value, frozen at that value)
    call:     spec.bind(args, kwargs) -> (graph keyword arguments, return_dict)
              spec.output(graph output, return_dict) -> the model's output type, or its tuple

A non-tensor argument the graph was traced without is checked at call time: the value it was
traced with (or an equivalent one: ``{}`` for a ``*_kwargs`` argument traced as None) is
accepted, anything else is an `FxquantError` naming the argument, because the lowered graph
cannot honour it (e.g. ``attention_kwargs={"scale": 0.5}``). Binding uses the precomputed names,
never ``inspect`` at call time, so ``torch.compile`` traces it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import CalibrationError, FxquantError
from .trace import as_args_kwargs

RETURN_DICT = "return_dict"


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in torch.utils._pytree.tree_leaves(value))


def same(name: str, given: Any, traced: Any) -> bool:
    """Whether a non-tensor argument's value is the one the graph was traced with."""
    if given is traced:
        return True
    if isinstance(given, torch.Tensor) or isinstance(traced, torch.Tensor):
        return False
    if name.endswith("kwargs") and not given and not traced:  # None and {} both mean "no extra arguments"
        return True
    if isinstance(given, tuple):  # recorded values are JSON: a traced tuple reads back as a list
        given = list(given)
    # bool is an int to Python but not to the model
    return isinstance(given, bool) == isinstance(traced, bool) and given == traced


@dataclass(frozen=True)
class CallSpec:
    """What a lowered module needs to accept the source model's calls (see the module docstring)."""

    model: str  # the source model's class name, for messages
    positional: tuple[str, ...]  # parameters that may be given by position, in order
    keyword_only: tuple[str, ...]
    graph_keys: tuple[str, ...]  # the graph's keyword inputs, in the order of its input spec
    fixed: tuple[tuple[str, Any], ...]  # non-tensor arguments: (name, the value the graph was traced with)
    return_dict: bool = False  # the model takes ``return_dict`` (default True) and the graph returns its dict output

    @property
    def names(self) -> tuple[str, ...]:
        return self.positional + self.keyword_only

    @staticmethod
    def record(model: torch.nn.Module, example: Any) -> Optional["CallSpec"]:
        """The spec of ``model.forward`` given the tracing example, or None for a ``*args`` / ``**kwargs``
        forward (such a module is called exactly as it was traced).

        Raises:
            CalibrationError: the example does not bind to the signature, lacks a required argument,
                or freezes a non-tensor argument to a value that is not JSON (it could not be saved).
        """
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            return None
        params = list(sig.parameters.values())
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return None
        named = _bind(sig, example, "calibration[0]")
        rd = any(p.name == RETURN_DICT and p.default is True for p in params)
        keys, fixed = [], []
        for p in params:
            if rd and p.name == RETURN_DICT:
                continue
            if p.name in named and _has_tensor(named[p.name]):
                keys.append(p.name)
                continue
            if p.name not in named and p.default is p.empty:
                raise CalibrationError(f"calibration[0]: {type(model).__name__}.forward needs argument {p.name!r}")
            value = named.get(p.name, p.default)
            if p.default is p.empty or not same(p.name, value, p.default):
                try:
                    json.dumps(value)
                except (TypeError, ValueError):
                    raise CalibrationError(f"calibration[0]: argument {p.name!r} is a {type(value).__name__}, which "
                                           "the quantized module cannot record; pass tensors or JSON values") from None
                keys.append(p.name)  # traced with this value: the graph takes it as an input (a constant)
            fixed.append((p.name, json.loads(json.dumps(value)) if p.name in keys else value))
        positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        keyword_only = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        return CallSpec(type(model).__name__, positional, keyword_only, tuple(keys), tuple(fixed), rd)

    def canonical(self, item: Any, where: str) -> dict[str, Any]:
        """A calibration item as the graph's keyword inputs (checked against the traced values)."""
        args, kwargs = as_args_kwargs(item, where)
        try:
            named, _ = self.bind(args, kwargs)
        except FxquantError as e:
            raise CalibrationError(f"{where}: {e}") from None
        return named

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool]:
        """A call's arguments -> (the graph's keyword inputs, return_dict).

        Raises:
            FxquantError: too many positional arguments, an unexpected or repeated argument, a missing
                one, or a non-tensor value the graph was not traced with, each naming the argument.
        """
        if len(args) > len(self.positional):
            raise FxquantError(f"{self.model}: takes {len(self.positional)} positional arguments but {len(args)} were given")
        named = dict(zip(self.positional, args))
        for k, v in kwargs.items():
            if k in named:
                raise FxquantError(f"{self.model}: got multiple values for argument {k!r}")
            if k not in self.names:
                raise FxquantError(f"{self.model}: unexpected argument {k!r}; it takes {', '.join(self.names)}")
            named[k] = v
        return_dict = bool(named.pop(RETURN_DICT, True)) if self.return_dict else True
        traced = dict(self.fixed)
        for name, value in self.fixed:
            if name in named and not same(name, named[name], value):
                raise FxquantError(f"{self.model}: argument {name!r} = {_short(named[name])}: the quantized graph was "
                                   f"traced with {name}={value!r} and cannot honour another value")
        out = {}
        for name in self.graph_keys:
            if name in named:
                if named[name] is None and name not in traced:
                    raise FxquantError(f"{self.model}: argument {name!r} is None, but the quantized graph was traced "
                                       "with a tensor there")
                out[name] = named[name]
            elif name in traced:  # frozen at a value that is not the default: omitting it means the default
                raise FxquantError(f"{self.model}: argument {name!r} is missing: the quantized graph was traced "
                                   f"with {name}={traced[name]!r}, not its default; pass that value")
            else:
                raise FxquantError(f"{self.model}: missing argument {name!r}")
        return out, return_dict

    def output(self, out: Any, return_dict: bool) -> Any:
        """The graph's output as the model returns it: its output type, or that type's tuple."""
        if return_dict or not self.return_dict or not isinstance(out, Mapping):
            return out
        return tuple(out.values())

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "positional": list(self.positional), "keyword_only": list(self.keyword_only),
                "graph_keys": list(self.graph_keys), "fixed": [[k, _json(v)] for k, v in self.fixed],
                "return_dict": self.return_dict}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "CallSpec":
        return CallSpec(d["model"], tuple(d["positional"]), tuple(d["keyword_only"]), tuple(d["graph_keys"]),
                        tuple((k, v) for k, v in d["fixed"]), bool(d["return_dict"]))


def _bind(sig: inspect.Signature, example: Any, where: str) -> dict[str, Any]:
    args, kwargs = as_args_kwargs(example, where)
    try:
        return dict(sig.bind(*args, **kwargs).arguments)
    except TypeError as e:
        raise CalibrationError(f"{where}: does not match the model's forward{sig}: {e}") from None


def _json(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):  # a default no call can repeat (an object): recorded by its text
        return repr(value)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
