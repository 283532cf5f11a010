"""lower_gguf: rewrite each selected linear into the GGUF weight-only custom op.

    before:  y = aten.linear(x, get_attr[l.weight], get_attr[l.bias])
    after:   y = fxquant.linear_gguf(x, get_attr[l.qweight], "q4_k", in_features, get_attr[l.bias])

``l.qweight`` is a uint8 buffer ``[out_features, row_bytes]`` holding the exact GGUF bytes
(`fxquant.codecs.quantize`); the float weight is deleted from the module. Protected and skipped
linears stay as they are.

A linear whose ``in_features`` is not a multiple of the block size (256 for Q4_K, 32 for Q8_0;
Ideogram 4's ``input_proj`` has 128 inputs) cannot be stored in that block type. The recipe's
``misaligned`` policy decides, and the record's ``lowering.note`` (shown by `fxquant.summary`)
says what happened:

    keep_float  ->  the linear stays float
    q8_0        ->  Q8_0 if in_features is a multiple of 32, else float

Nothing is left float without a note.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import codecs, graph, meta
from ..errors import PassError
from ..recipe import MisalignedPolicy, WeightScheme
from .base import FxquantPass, PassResult, require_records

QWEIGHT_SUFFIX = ".qweight"


def choose_qtype(in_features: int, qtype: str, policy: MisalignedPolicy) -> tuple[str | None, str]:
    """(block type to store the weight in, or None for float; the note explaining a fallback).

    Example: ``choose_qtype(128, "q4_k", MisalignedPolicy.Q8_0) == ("q8_0", "in_features 128 is not ...")``.
    """
    block = codecs.BLOCKS[qtype][0]
    if in_features % block == 0:
        return qtype, ""
    why = f"in_features {in_features} is not a multiple of the {qtype.upper()} block ({block})"
    if policy is MisalignedPolicy.KEEP_FLOAT:
        return None, f"{why}: kept float (misaligned policy keep_float)"
    q8_block = codecs.BLOCKS["q8_0"][0]
    if qtype != "q8_0" and in_features % q8_block == 0:
        return "q8_0", f"{why}: stored as Q8_0 (misaligned policy q8_0)"
    return None, f"{why} nor of the Q8_0 block ({q8_block}): kept float (misaligned policy q8_0)"


class LowerGGUF(FxquantPass):
    """Lower selected linears to ``fxquant::linear_gguf``.

    Args:
        weights: `WeightScheme.Q4_K` or `WeightScheme.Q8_0`.
        misaligned: what to do with a linear whose in_features is not a multiple of the block size.

    Raises:
        PassError: (when run) no ``selection`` records (``select_protected`` has not run), or a
            linear weight that is not floating point.
    """

    name = "lower_gguf"

    def __init__(self, weights: WeightScheme, misaligned: MisalignedPolicy = MisalignedPolicy.KEEP_FLOAT) -> None:
        weights, misaligned = WeightScheme(weights), MisalignedPolicy(misaligned)
        if weights.value not in codecs.BLOCKS:
            raise PassError(f"{self.name}: weights must be one of {sorted(codecs.BLOCKS)}, got {weights.value!r}")
        self.qtype = weights.value
        self.misaligned = misaligned

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "selection", before="select_protected")

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node, rec in meta.records(gm):
            if not graph.is_linear(node):  # already lowered (a pass run twice): nothing to do
                continue
            w = graph.root_weight(gm, node)  # shape and dtype; folds are computed per slice below
            if not w.is_floating_point():
                raise PassError(f"{self.name}: linear {rec.name!r} has a {w.dtype} weight, expected a float weight")
            if rec.selection.kind != "quantize":
                meta.update(node, lowering=meta.float_lowering(w))
                continue
            qtype, note = choose_qtype(rec.in_features, self.qtype, self.misaligned)
            if qtype is None:
                meta.update(node, lowering=meta.float_lowering(w, note))
                continue
            # The codecs quantize float32 (as llama.cpp does from f16/bf16); new tensor, never in place.
            packed = graph.weight_rows(gm, node, lambda rows: (torch.from_numpy(
                codecs.quantize(rows.detach().float().cpu().numpy(), qtype)).to(w.device),))[0]
            target = rec.name + QWEIGHT_SUFFIX
            graph.set_buffer(gm, target, packed)
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            args = (node.args[0], graph.get_attr_node(gm, target, node), qtype, rec.in_features, bias)
            new = graph.replace_node(gm, node, torch.ops.fxquant.linear_gguf.default, args)
            nbytes = packed.numel()
            meta.update(new, lowering=meta.Lowering(qtype, nbytes * 8 / w.numel(), nbytes, note))
            modified = True
        if modified:
            graph.finalize(gm)
        return PassResult(gm, modified)
