"""materialize_folds: bake every ``fxquant::scale_param`` chain still in the graph into its parameter.

    mul(n, scale_param(get_attr[norm.w], get_attr[g.smooth_vector], [0], 0, 0.0, True))
        ->  mul(n, get_attr[norm.w])          norm.w now holds the folded values (a new tensor)

``fold_smoothing`` records folds as ops over the original parameters; the lowering consumes the
chains of the linears it quantizes. What stays float (norm gains, adaLN rows, protected linears,
biases) is computed here, one parameter at a time, under its original name: the module keeps the
state-dict names the artifact writers expect, and its old tensor is released at once (freed when
fxquant owns it, see ``compile(consume=True)``). The group vectors go once nothing reads them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import graph
from .base import FxquantPass, PassResult


class MaterializeFolds(FxquantPass):
    """Compute every remaining ``fxquant::scale_param`` chain into its root parameter (see module doc).

    Returns (from ``__call__``): ``PassResult(gm, modified)``; ``modified`` is False when the graph
    has no such chain (a second run, or a recipe without SmoothQuant).

    Example:
        >>> MaterializeFolds()(gm)  # after fold_smoothing and the lowering  # doctest: +SKIP
    """

    name = "materialize_folds"

    def call(self, gm: fx.GraphModule) -> PassResult:
        tops = [n for n in gm.graph.nodes if n.target is graph.SCALE_PARAM
                and not any(u.target is graph.SCALE_PARAM for u in n.users)]
        for top in tops:
            root = graph.param_root(top)
            if len(root.users) != 1:  # the original is read elsewhere too: keep it, bake a new buffer
                target = f"{root.target}_folded"
                graph.set_buffer(gm, target, graph.param_value(gm, top))
                with gm.graph.inserting_before(top):
                    new = gm.graph.get_attr(target)
            else:
                value = graph.param_value(gm, top)
                graph.set_parameter(gm, str(root.target), value)
                new = root
            new.meta.update({k: v for k, v in top.meta.items() if k == "val"})
            top.replace_all_uses_with(new)
            graph.release_unused(gm, [top])
        if tops:
            graph.finalize(gm)
        return PassResult(gm, bool(tops))
