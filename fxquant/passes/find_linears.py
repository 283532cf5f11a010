"""find_linears: give every ``aten.linear`` node its `LinearRecord` (name, shape, bias).

A linear whose weight is computed in the graph (``F.linear(x, w * 2)``) gets no record, so no
pass touches it; its module is listed under ``computed_weight_linears`` in the graph record and
the summary says so. A module called more than once gets a record per call (``call`` = 0, 1, ...);
the calls share one weight, which the lowering passes quantize once. A node that already has a
record keeps it (running the pass twice changes nothing).

    linear(x, get_attr[layers.0.attention.to_q.weight])      (graph unchanged)
        meta["fxquant"] = LinearRecord(name="layers.0.attention.to_q", in_features=..., ...)
"""

from __future__ import annotations

import torch.fx as fx

from .. import graph, meta
from ..errors import PassError
from .base import FxquantPass, PassResult


class FindLinears(FxquantPass):
    name = "find_linears"

    def call(self, gm: fx.GraphModule) -> PassResult:
        calls: dict[str, int] = {}
        computed: list[str] = []
        for node in graph.linear_nodes(gm):
            name = graph.module_name(node)
            if name is None:  # F.linear(x, <computed weight>): nothing to quantize ahead of time
                computed.append(_owner(node))
                continue
            w = graph.weight(gm, node)
            if w.ndim != 2:
                raise PassError(f"{self.name}: linear {name!r} has a weight of shape {tuple(w.shape)}, expected 2-D")
            # A module called more than once (DiT's timestep embedder) gets one record per call.
            call = calls[name] = calls.get(name, -1) + 1
            if meta.get(node) is not None:  # a second run: the record (and what later passes wrote) stays
                continue
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            meta.put(node, meta.LinearRecord(name=name, in_features=int(w.shape[1]), out_features=int(w.shape[0]),
                                             has_bias=bias is not None, call=call))
        if not calls and not meta.records(gm):
            raise PassError(f"{self.name}: the traced graph has no aten.linear nodes with parameter weights; nothing to quantize"
                            + (f" (linears with computed weights, left as they are: {computed})" if computed else ""))
        g = meta.graph_record(gm)
        if computed and g is not None:
            meta.update_graph(gm, computed_weight_linears=tuple(computed))
        return PassResult(gm, False)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return (list(stack.values())[-1][0] or "<root>") if stack else "<root>"
