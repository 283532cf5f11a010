"""`QuantizedModule`: what `fxquant.compile` and `fxquant.load` return. A ``torch.fx.GraphModule``
(``.graph``, ``.code``, passes, `fxquant.summary`, `fxquant.save` work as on any lowered module)
that also stands in for the diffusers model it came from:

    .config        the source model's config (diffusers ``FrozenDict``), recorded at compile
    .dtype/.device the compute dtype and device: ``.to()`` moves every tensor and casts the float
                   ones, except the quantization parameters (int8 / uint8 weights, float32 scales
                   and smoothing vectors), which keep their dtype; the graph's dtype and device
                   constants follow (`fxquant.dtypes`)
    __call__       the source model's signature (`fxquant.signature`): keyword or positional
                   arguments, ``return_dict``, non-tensor arguments checked, not frozen
    train(True)    an error: a lowered graph is inference only; ``eval()`` works
    cache_context  what diffusers pipelines (Flux, SD3, Wan, ...) wrap each transformer call in:
                   a no-op, as on a diffusers model with no cache enabled; ``enable_cache``
                   (FasterCache, FirstBlockCache, ...) is an error (its hooks need the float
                   model's blocks)

``torch.fx.GraphModule`` gives each instance its own class (so that it can hold the generated
``forward``); `adopt` gives a traced module such a class built on `QuantizedModule`, in place: no
tensor, node or hook is copied or lost. Its ``__call__`` binds the arguments from names
precomputed at compile, then calls the graph; ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx

from . import dtypes, meta
from .errors import FxquantError
from .signature import CallSpec
from .artifacts.export import example_from

CALL = "fxquant.call"  # gm.meta key: the CallSpec
CONFIG = "fxquant.config"  # gm.meta key: the source model's config


class QuantizedModule(fx.GraphModule):
    """A lowered GraphModule that behaves like the model it was compiled from (module docstring)."""

    @property
    def config(self) -> Any:
        cfg = self.meta.get(CONFIG)
        if cfg is None:  # (nn.Module.__getattr__ then raises the usual "has no attribute 'config'")
            raise AttributeError("config")
        return cfg

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, dtypes.BUFFER).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, dtypes.BUFFER).device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call: Optional[CallSpec] = self.meta.get(CALL)
        if call is None:
            return super().__call__(*args, **kwargs)
        graph_kwargs, return_dict = call.bind(args, kwargs)
        return call.output(super().__call__(**graph_kwargs), return_dict)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        yield

    @property
    def is_cache_enabled(self) -> bool:
        return False

    def enable_cache(self, config: Any) -> None:
        raise FxquantError(f"{type(self).__name__}: diffusers' caching ({type(config).__name__}) hooks the float "
                           "model's blocks; a quantized graph does not support enable_cache")

    def train(self, mode: bool = True) -> "QuantizedModule":
        if mode:
            raise FxquantError(f"{type(self).__name__}: a quantized module is inference only; train(True) is not "
                               "supported (eval() is)")
        return super().train(False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "QuantizedModule":
        keep = {id(t) for t in quantization_tensors(self)}

        def guarded(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and out.dtype != t.dtype:
                return t.to(out.device)  # moved, never cast (from the original, not the cast copy)
            return out

        if not hasattr(self, dtypes.BUFFER):  # not adopted yet (torch internals building the module)
            return super()._apply(fn, recurse)
        before, after = self.dtype, fn(torch.empty(0, dtype=self.dtype, device=self.device)).dtype
        if after != before and getattr(meta.graph_record(self), "dtype_marks", None) is False:
            raise FxquantError(f"{type(self).__name__}: cannot change the compute dtype from {before} to {after}: "
                               "compile could not tell which of the graph's dtype constants follow the model's "
                               f"dtype; compile the model in {after} instead")
        super()._apply(guarded, recurse)
        if after != before:
            _retype_record(self, before, after)
            rec = meta.graph_record(self)
            if rec is not None and rec.example_inputs is not None:
                dtypes.legalize(self, lambda: example_from(rec.example_inputs, "example_inputs"))
        return self


def quantization_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The tensors ``fxquant::`` ops read as quantization parameters (every tensor argument but the
    activation and the bias): they keep their dtype under ``.to(dtype)``, ``.half()``, ``.type()``."""
    out = []
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        for n in sub.graph.nodes:
            if not (isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fxquant"):
                continue
            for arg, a in zip(n.target._schema.arguments, n.args):
                if arg.name not in ("x", "bias") and isinstance(a, fx.Node) and a.op == "get_attr":
                    out.append(_attr(sub, str(a.target)))
    return out


def _attr(m: torch.nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(m.get_submodule(owner) if owner else m, leaf)


def _retype_record(gm: fx.GraphModule, before: torch.dtype, after: torch.dtype) -> None:
    """Keep the graph record true after ``.to(dtype)``: the example inputs a re-export (`fxquant.save`)
    builds, and the compute dtype a reload restores, are the new dtype's."""
    rec = meta.graph_record(gm)
    if rec is None:
        return
    old, new = str(before).removeprefix("torch."), str(after).removeprefix("torch.")

    def walk(d: Any) -> Any:
        if isinstance(d, dict):
            if set(d) == {"shape", "dtype"} and d["dtype"] == old:
                return {**d, "dtype": new}
            return {k: walk(v) for k, v in d.items()}
        if isinstance(d, list):
            return [walk(v) for v in d]
        return d

    meta.update_graph(gm, example_inputs=walk(rec.example_inputs), compute_dtype=new)


def _instance_class() -> type:
    # fx.GraphModule.__new__ builds the per-instance class; mirror it (the name matters to it).
    class GraphModuleImpl(QuantizedModule):  # noqa: D401 - per-instance class, as fx makes them
        pass

    return GraphModuleImpl


def adopt(gm: fx.GraphModule, dtype: Optional[torch.dtype] = None) -> QuantizedModule:
    """Make a lowered GraphModule a `QuantizedModule`, in place, from its graph record (the call
    spec, the model config and compute dtype recorded by `fxquant.compile`). Idempotent.

    Args:
        gm: a module from `fxquant.compile`'s pipeline or `fxquant.load`'s deserializer.
        dtype: the compute dtype (default: the recorded one, else the first float tensor's).
    """
    if not isinstance(gm, QuantizedModule):
        gm.__class__ = _instance_class()
        for name in ("train", "eval"):  # torch.export's module() makes both raise
            gm.__dict__.pop(name, None)
    rec = meta.graph_record(gm)
    if rec is not None and rec.call is not None:
        gm.meta[CALL] = CallSpec.from_json(rec.call)
    if rec is not None and rec.model_config is not None and CONFIG not in gm.meta:
        gm.meta[CONFIG] = _frozen(rec.model_config)
    if dtype is None:
        dtype = getattr(torch, rec.compute_dtype, None) if rec is not None and rec.compute_dtype else None
        dtype = dtype if isinstance(dtype, torch.dtype) else _first_float(gm)
    device = next((t.device for t in list(gm.parameters()) + list(gm.buffers())), torch.device("cpu"))
    dtypes.bind_compute(gm, dtype, device)
    gm.recompile()
    return gm


def set_config(gm: QuantizedModule, config: Any) -> None:
    """Keep the source model's own config object (`compile` has it; `load` rebuilds it from JSON)."""
    if config is not None:
        gm.meta[CONFIG] = config


def _first_float(gm: torch.nn.Module) -> torch.dtype:
    floats = [t.dtype for t in list(gm.parameters()) + list(gm.buffers()) if t.is_floating_point()]
    return floats[0] if floats else torch.get_default_dtype()


def _frozen(config: dict[str, Any]) -> Any:
    try:
        from diffusers.configuration_utils import FrozenDict
    except ImportError:  # the config of a diffusers model without diffusers installed: a plain dict
        return dict(config)
    return FrozenDict(config)
