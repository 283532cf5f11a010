"""lower_gguf: rewrite each linear whose selected scheme is ``q4_k`` or ``q8_0`` into the GGUF
weight-only custom op.

    before:  y = aten.linear(x, get_attr[l.weight], get_attr[l.bias])
    after:   y = fxquant.linear_gguf(x, get_attr[l.qweight], "q4_k", in_features, get_attr[l.bias])

``l.qweight`` is a uint8 buffer ``[out_features, row_bytes]`` holding the exact GGUF bytes
(`fxquant.codecs.quantize`); the float weight is deleted from the module. Every other node is
declined: linears of other schemes, and nodes already lowered. A linear ``round_gptq`` rounded
reads ``fxquant.dequantize_gguf(get_attr[l.qweight], qtype, in_features, dtype)``: its bytes are
taken as they are. Whether a linear's width fits the
block size was decided by ``select_schemes`` (the recipe's misaligned policy); a selection that
does not fit is a `PassError` here, never a silent fallback.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

from .. import codecs, graph, meta
from ..errors import PassError
from ..schemes import DecidedBy, Scheme
from .base import FxquantPass, PassResult, owned_linears, require_records

LINEAR_GGUF = torch.ops.fxquant.linear_gguf.default
QWEIGHT_SUFFIX = ".qweight"


def _encoder(qtype: str) -> Callable[[torch.Tensor], tuple[torch.Tensor]]:
    """Slices of rows (`graph.weight_rows`) -> their bytes, by the reference encoder. The codecs
    quantize float32 (as llama.cpp does from f16/bf16); new tensors, never in place."""
    def encode(rows: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.from_numpy(codecs.quantize(rows.detach().float().cpu().numpy(), qtype)).to(rows.device),)
    return encode


def _rounded(node: fx.Node, rec: meta.LinearRecord, qtype: str) -> Optional[fx.Node]:
    """The ``get_attr`` node of the bytes of a weight ``round_gptq`` rounded, or None."""
    arg = node.args[1]
    if not graph.is_dequantize(arg):
        return None
    if arg.target is not graph.DEQUANTIZE_GGUF or str(arg.args[1]).lower() != qtype:
        raise PassError(f"lower_gguf: linear {rec.name!r} is selected {qtype} but reads a weight rounded for "
                        f"another scheme ({arg.format_node()})")
    return arg.args[0]


class LowerGGUF(FxquantPass):
    """Lower the linears selected ``q4_k`` / ``q8_0`` to ``fxquant::linear_gguf``.

    Raises:
        PassError: no ``selection`` records (run select_schemes), a non-float weight, or a selected
            block type that does not divide the linear's in_features.
    """

    name = "lower_gguf"
    schemes = frozenset({Scheme.Q4_K, Scheme.Q8_0})

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "selection", before="select_schemes")

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node, rec, w in owned_linears(gm, self):
            qtype = rec.selection.scheme.value
            block = codecs.BLOCKS[qtype][0]
            if rec.in_features % block:
                raise PassError(f"{self.name}: linear {rec.name!r} is selected {qtype} but its in_features "
                                f"{rec.in_features} is not a multiple of the block ({block}); select_schemes "
                                f"applies the recipe's misaligned policy")
            qweight = _rounded(node, rec, qtype)
            if qweight is None:
                target = rec.name + QWEIGHT_SUFFIX
                graph.set_buffer(gm, target, graph.weight_rows(gm, node, _encoder(qtype))[0])
                qweight = graph.get_attr_node(gm, target, node)
            nbytes = graph.get_attr(gm, str(qweight.target)).numel()
            args = (node.args[0], qweight, qtype, rec.in_features, graph.bias_arg(node))
            new = graph.replace_node(gm, node, LINEAR_GGUF, args)
            note = rec.selection.reason if rec.selection.by is DecidedBy.MISALIGNED else ""
            if rec.rounding is not None and rec.rounding.method == "gptq":
                note = "; ".join(filter(None, [note, "gptq-rounded"]))
            meta.update(new, lowering=meta.Lowering(rec.selection.scheme, nbytes * 8 / w.numel(), nbytes, note))
            modified = True
        if modified:
            graph.finalize(gm)
        return PassResult(gm, modified)
