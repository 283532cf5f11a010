"""The folds one run of `fold_smoothing` decided, kept in a table until the pass ends.

    add("norm.weight", "to_q.smooth_vector", (0,), 0, 0.0, True)   decided; the graph is unchanged
    value("norm.weight")                                           the parameter as the folds so far make it
    emit():  get_attr[norm.weight]
             -> scale_param(get_attr[norm.weight], get_attr[to_q.smooth_vector], [0], 0, 0.0, True)

The fold finder walks the graph as traced while the pass runs; `emit` joins every decided fold
at the end (see the `fold_smoothing` module docstring).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ... import graph
from ...ops.fold import scale_region, scale_rows


class Deferred:
    """The folds one run of the pass decided, in order, per parameter target; joined to the graph
    as ``fxquant::scale_param`` chains by `emit` (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.todo: dict[str, list[tuple[str, tuple[int, ...], int, float, bool]]] = {}

    def vector(self, group: str, s: torch.Tensor) -> str:
        """Register ``s`` (float32) as the group's ``smooth_vector`` buffer; returns its target."""
        target = f"{group}.smooth_vector"
        graph.set_buffer(self.gm, target, s.detach().float())
        return target

    def add(self, target: str, s_target: str, dims: tuple[int, ...], start: int, shift: float, divide: bool) -> None:
        self.todo.setdefault(target, []).append((s_target, tuple(dims), start, shift, divide))

    def value(self, target: str) -> torch.Tensor:
        """The parameter as the folds decided so far make it (the original if none: no copy)."""
        v = graph.get_attr(self.gm, target)
        for s_target, dims, start, shift, divide in self.todo.get(target, ()):
            v = scale_region(v, graph.get_attr(self.gm, s_target), list(dims), start, shift, divide)
        return v

    def weight(self, node: fx.Node) -> torch.Tensor:
        return self.value(str(node.args[1].target))

    def col_absmax(self, node: fx.Node, slice_elems: int = 1 << 22) -> torch.Tensor:
        """max |W| per input channel of a linear's weight as the folds so far make it, computed a
        slice of rows at a time (no full-size copy of the weight or of |W|)."""
        target = str(node.args[1].target)
        base = graph.get_attr(self.gm, target)
        folds = [(graph.get_attr(self.gm, s_t), *rest) for s_t, *rest in self.todo.get(target, ())]
        step = max(1, slice_elems // max(1, base[0].numel()))
        out = None
        for i in range(0, base.shape[0], step):
            block = base[i:i + step]
            for s, dims, start, shift, divide in folds:
                block = scale_rows(block, s, list(dims), start, shift, divide, i, base.ndim)
            m = block.abs().amax(0)
            out = m if out is None else torch.maximum(out, m)
        return out

    def emit(self) -> None:
        g = self.gm.graph
        for target, folds in self.todo.items():
            for attr in [n for n in g.nodes if n.op == "get_attr" and n.target == target]:
                users = list(attr.users)
                if not users:
                    continue
                head = attr
                first = min(users, key=lambda u: list(g.nodes).index(u)) if len(users) > 1 else users[0]
                with g.inserting_before(first):
                    for s_target, dims, start, shift, divide in folds:
                        sv = g.get_attr(s_target)
                        head = g.call_function(graph.SCALE_PARAM, (head, sv, list(dims), start, shift, divide))
                        if "val" in attr.meta:
                            head.meta["val"] = attr.meta["val"]
                for u in users:
                    u.replace_input_with(attr, head)
