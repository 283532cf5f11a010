"""Which compiled GraphModules a LoRA call reaches, and the key prefix (pipeline component) of each.

    gm                                  -> [("module", gm, "transformer")]     (or prefixes="...")
    {"cond": a, "uncond": b}            -> [("branch 'cond'", a, "transformer"),
                                            ("branch 'uncond'", b, "unconditional_transformer")]
    pipe (.transformer, .unconditional_transformer compiled)
                                        -> [("pipe.transformer", ..., "transformer"), ...]

A dict's labels map to prefixes through ``prefixes=`` (default `DEFAULT_PREFIXES`).
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import torch.fx as fx

from .. import meta
from ..branches import as_branches
from ..errors import LoraError
from .files import TRANSFORMER, UNCONDITIONAL

DEFAULT_PREFIXES = {"cond": TRANSFORMER, "uncond": UNCONDITIONAL}
PIPELINE_COMPONENTS = (TRANSFORMER, UNCONDITIONAL)

Target = Union[fx.GraphModule, Mapping[str, fx.GraphModule], Any]
Prefixes = Union[str, Mapping[str, str], None]


def graph_modules(module: Target, who: str) -> list[tuple[str, fx.GraphModule]]:
    """(label, GraphModule) for each branch of a module, a dict of branches or a pipeline."""
    if isinstance(module, (fx.GraphModule, Mapping)):
        parts, is_dict = as_branches(module, who, single="module", error=LoraError)
        return [(label, _graph_module(gm, f"branch {label!r}" if is_dict else "module", who))
                for label, gm in parts.items()]
    found = [(c, getattr(module, c)) for c in PIPELINE_COMPONENTS if getattr(module, c, None) is not None]
    if not found:
        raise LoraError(f"{who}: expected a compiled GraphModule, a dict of them, or a pipeline with compiled "
                        f"transformer(s); got {type(module).__name__}")
    return [(c, _graph_module(m, f"pipe.{c}", who)) for c, m in found]


def branches(module: Target, prefixes: Prefixes, who: str) -> list[tuple[str, fx.GraphModule, str]]:
    """(description, GraphModule, component) for each branch of ``module`` (see the module docstring)."""
    found = graph_modules(module, who)
    if isinstance(module, fx.GraphModule):
        return [("module", found[0][1], single_prefix(prefixes))]
    if not isinstance(module, Mapping):
        return [(f"pipe.{c}", gm, c) for c, gm in found]
    table = prefix_table([label for label, _ in found], prefixes, who)
    return [(f"branch {label!r}", gm, table[label]) for label, gm in found]


def single_prefix(prefixes: Prefixes) -> str:
    """The key prefix of a single module: ``prefixes`` if it is a str, else ``transformer``."""
    return prefixes if isinstance(prefixes, str) else TRANSFORMER


def prefix_table(labels: list[str], prefixes: Prefixes, who: str) -> dict[str, str]:
    """Branch label -> key prefix, from ``prefixes`` (default `DEFAULT_PREFIXES`).

    Raises:
        LoraError: a label with no prefix, naming it.
    """
    table = dict(DEFAULT_PREFIXES) if prefixes is None else dict(prefixes)
    for label in labels:
        if label not in table:
            raise LoraError(f"{who}: branch {label!r} has no key prefix; pass prefixes={{{label!r}: 'transformer', ...}}")
    return table


def _graph_module(m: Any, where: str, who: str) -> fx.GraphModule:
    gm = m if isinstance(m, fx.GraphModule) else getattr(m, "graph_module", None)
    if not isinstance(gm, fx.GraphModule) or not meta.records(gm):
        raise LoraError(f"{who}: {where} is a {type(m).__name__}, not a module from fxquant.compile / fxquant.load")
    return gm
