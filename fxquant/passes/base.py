"""The pass protocol: ``pass_(gm) -> PassResult(gm, modified)``, with ``requires``/``ensures`` hooks.

This is torch.fx's own `PassBase`; fxquant passes add a ``name`` used in error messages and the
pipeline's log, print as ``Name(options)``, and never call each other: they read and write the
graph and ``node.meta["fxquant"]``. A lowering pass also names the ``schemes`` it owns and uses
`owned_linears`, so it declines every node it does not own (running it twice changes nothing).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import graph, meta
from ..errors import PassError
from ..schemes import Scheme

__all__ = ["FxquantPass", "PassResult", "owned_linears", "require_records"]


class FxquantPass(PassBase):
    name: str = "pass"
    schemes: frozenset[Scheme] = frozenset()  # lowering passes: the schemes they lower

    def __repr__(self) -> str:
        opts = getattr(self, "options", None)
        if dataclasses.is_dataclass(opts):
            fields = ", ".join(f"{f.name}={_show(getattr(opts, f.name))}" for f in dataclasses.fields(opts)
                               if getattr(opts, f.name) != f.default)  # only what differs from the default
            return f"{type(self).__name__}({fields})"
        return f"{type(self).__name__}()"


def _show(v: object) -> str:
    if isinstance(v, enum.Enum):
        return repr(v.value)
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    to_json = getattr(v, "to_json", None)
    return repr(to_json()) if callable(to_json) else repr(v)


def require_records(gm: fx.GraphModule, pass_name: str, field: str | None = None, before: str = "") -> None:
    """Raise unless every linear has a record (and, if given, ``field`` set by an earlier pass)."""
    recs = meta.records(gm)
    if not recs:
        raise PassError(f"{pass_name}: the graph has no fxquant records; run find_linears first")
    if field is not None:
        missing = [r.name for _, r in recs if getattr(r, field) is None]
        if missing:
            raise PassError(
                f"{pass_name}: {len(missing)} linear(s) lack '{field}' (first: {missing[0]}); run {before or 'the pass that writes it'} first"
            )


def owned_linears(gm: fx.GraphModule, pass_: FxquantPass) -> Iterator[tuple[fx.Node, meta.LinearRecord, torch.Tensor]]:
    """(node, record, float weight) of every not yet lowered linear whose selected scheme the pass owns.

    The weight is the parameter under any ``fxquant::scale_param`` folds (``fold_smoothing``): its
    shape and dtype, no copy. Quantize the effective weight with `graph.weight_rows` (a slice at a
    time) or `graph.weight` (whole).

    Raises:
        PassError: such a linear's weight is not floating point.
    """
    for node, rec in meta.records(gm):
        if not graph.is_linear(node) or rec.selection is None or rec.selection.scheme not in pass_.schemes:
            continue
        w = graph.root_weight(gm, node)
        if not w.is_floating_point():
            raise PassError(f"{pass_.name}: linear {rec.name!r} has a {w.dtype} weight, expected a float weight")
        yield node, rec, w
