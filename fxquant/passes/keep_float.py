"""keep_float: the lowering of the ``float`` scheme: the linear stays ``aten.linear`` in its
dtype, and its record says what that costs.

    y = aten.linear(x, get_attr[l.weight], ...)      (graph unchanged)
        meta["fxquant"].lowering = Lowering("float", bits_per_weight=16.0, weight_bytes=..., note)

Protected, skipped and misaligned linears end here, so every linear has a lowering record and
`fxquant.summary` shows what each one costs. Linears of other schemes are declined.
"""

from __future__ import annotations

import torch.fx as fx

from .. import meta
from ..schemes import DecidedBy, Scheme
from .base import FxquantPass, PassResult, owned_linears, require_records


class KeepFloat(FxquantPass):
    name = "keep_float"
    schemes = frozenset({Scheme.FLOAT})

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "selection", before="select_schemes")

    def call(self, gm: fx.GraphModule) -> PassResult:
        for node, rec, w in owned_linears(gm, self):
            note = rec.selection.reason if rec.selection.by is DecidedBy.MISALIGNED else ""
            meta.update(node, lowering=meta.float_lowering(w, note))
        return PassResult(gm, False)  # metadata only
