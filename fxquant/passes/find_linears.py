"""find_linears: give every ``aten.linear`` node its `LinearRecord` (name, shape, bias).

A linear whose weight is computed in the graph (``F.linear(x, w * 2)``) gets no record, so no
pass touches it; its module is listed under ``computed_weight_linears`` in the graph record and
the summary says so.

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
        seen: dict[str, str] = {}
        computed: list[str] = []
        for node in graph.linear_nodes(gm):
            name = graph.module_name(node)
            if name is None:  # F.linear(x, <computed weight>): nothing to quantize ahead of time
                computed.append(_owner(node))
                continue
            w = graph.weight(gm, node)
            if w.ndim != 2:
                raise PassError(f"{self.name}: linear {name!r} has a weight of shape {tuple(w.shape)}, expected 2-D")
            if name in seen:
                # A module called twice (shared weights) would be lowered twice from one weight.
                raise PassError(f"{self.name}: linear {name!r} is called more than once (nodes {seen[name]} and {node.name}); shared linears are not supported")
            seen[name] = node.name
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            meta.put(node, meta.LinearRecord(name=name, in_features=int(w.shape[1]),
                                             out_features=int(w.shape[0]), has_bias=bias is not None))
        if not seen:
            raise PassError(f"{self.name}: the traced graph has no aten.linear nodes with parameter weights; nothing to quantize"
                            + (f" (linears with computed weights, left as they are: {computed})" if computed else ""))
        g = meta.graph_record(gm)
        if computed and g is not None:
            meta.update_graph(gm, extra=g.extra + (("computed_weight_linears", computed),))
        return PassResult(gm, False)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return (list(stack.values())[-1][0] or "<root>") if stack else "<root>"
