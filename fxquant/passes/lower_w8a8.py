"""lower_w8a8: rewrite each linear whose selected scheme is ``w8a8`` into the W8A8 custom op.

    before:  y = aten.linear(x, get_attr[l.weight], get_attr[l.bias])
    after:   y = fxquant.linear_w8a8(x, get_attr[l.weight_int8], get_attr[l.weight_scale],
                                     get_attr[l.bias], smooth)

Weights become per-output-channel symmetric int8 plus a float32 scale per row; the float weight
is deleted from the module. A weight ``round_gptq`` rounded (read through
``fxquant.dequantize_int8(get_attr[l.weight_int8], get_attr[l.weight_scale], dtype)``) keeps its
codes and scale as they are. Where ``fold_smoothing`` recorded a "fused" smoothing (it left a
``mul(x, get_attr[l.smooth])`` feeding the linear only), the multiply moves into the op's activation
quantization instead of running as a separate pass over memory. Every other node is declined:
linears of other schemes, and nodes already lowered (a second run changes nothing).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import graph, meta
from ..errors import PassError
from ..ops import w8a8 as ops
from ..schemes import Scheme, SmoothingTarget
from .base import FxquantPass, PassResult, owned_linears, require_records

LINEAR_W8A8 = torch.ops.fxquant.linear_w8a8.default


def fused_smooth(node: fx.Node, rec: meta.LinearRecord) -> tuple[fx.Node, fx.Node | None]:
    """(activation input, smooth get_attr or None). When ``fold_smoothing`` recorded a "fused"
    smoothing, the linear is fed by the ``mul(x, get_attr[smooth])`` it inserted."""
    x = node.args[0]
    if rec.smoothing is None or rec.smoothing.target is not SmoothingTarget.FUSED:
        return x, None
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is torch.ops.aten.mul.Tensor
            and len(x.users) == 1 and isinstance(x.args[1], fx.Node) and x.args[1].op == "get_attr"):
        raise PassError(f"lower_w8a8: linear {rec.name!r} has a fused smoothing record but is not fed by "
                        f"mul(x, get_attr[smooth]) alone (found {x})")
    return x.args[0], x.args[1]


def _rounded(node: fx.Node, rec: meta.LinearRecord) -> tuple[fx.Node, fx.Node] | None:
    """The (int8 codes, scale) ``get_attr`` nodes of a weight ``round_gptq`` rounded, or None."""
    arg = node.args[1]
    if not (graph.is_dequantize(arg) and arg.target is graph.DEQUANTIZE_INT8):
        if graph.is_dequantize(arg):
            raise PassError(f"lower_w8a8: linear {rec.name!r} is selected w8a8 but reads a weight rounded for "
                            f"another scheme ({arg.format_node()})")
        return None
    return arg.args[0], arg.args[1]


class LowerW8A8(FxquantPass):
    """Lower the linears selected ``w8a8`` to ``fxquant::linear_w8a8``.

    Raises:
        PassError: no ``selection`` records (run select_schemes), a non-float weight, or a fused
            smoothing record without its multiply.
    """

    name = "lower_w8a8"
    schemes = frozenset({Scheme.W8A8})

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "selection", before="select_schemes")

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node, rec, w in owned_linears(gm, self):
            x, smooth = fused_smooth(node, rec)
            codes = _rounded(node, rec)
            if codes is None:
                q, scale = graph.weight_rows(gm, node, ops.quantize_weight_per_channel)  # no full float copy
                graph.set_buffer(gm, f"{rec.name}.weight_int8", q)
                graph.set_buffer(gm, f"{rec.name}.weight_scale", scale)
                codes = (graph.get_attr_node(gm, f"{rec.name}.weight_int8", node),
                         graph.get_attr_node(gm, f"{rec.name}.weight_scale", node))
            q, scale = (graph.get_attr(gm, str(c.target)) for c in codes)
            new = graph.replace_node(gm, node, LINEAR_W8A8, (x, *codes, graph.bias_arg(node), smooth))
            bpw = 8 + 32 / rec.in_features  # int8 weights + one float32 scale per row
            meta.update(new, lowering=meta.Lowering(Scheme.W8A8, bpw, q.numel() + scale.numel() * 4))
            modified = True
        if modified:
            graph.finalize(gm)
        return PassResult(gm, modified)
