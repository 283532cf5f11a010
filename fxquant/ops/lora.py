"""LoRA branch custom op: a low-rank float update added to a (lowered) linear's output.

    fxquant.lora(y, x, down, up, scale, factor)
        h = F.linear(x, down)                 [..., rank]    down = A  [rank, in]
        y + (h * (scale * factor)) @ up.T     [..., out]     up   = B  [out, rank]

``y`` is the linear's own output (``fxquant::linear_w8a8``, ``fxquant::linear_gguf`` or
``aten.linear``), ``x`` its unsmoothed input. ``scale`` is a float32 0-d buffer, the adapter's
strength, which `fxquant.set_lora_scale` replaces without touching the graph; ``factor`` is
the file's ``alpha / rank`` for this layer, a constant of the node. The scale multiplies the
rank-wide tensor, not the output: ``rank`` values per token instead of ``out``. The int8 / GGUF
weights are never read or changed. ``down`` and ``up`` are stored in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.library.custom_op("fxquant::lora", mutates_args=())
def lora(y: Tensor, x: Tensor, down: Tensor, up: Tensor, scale: Tensor, factor: float) -> Tensor:
    """``y + (scale * factor) * (x @ down.T) @ up.T``, the add fused into one ``addmm``."""
    h = F.linear(x, down.to(x.dtype))
    h = h * (scale.float() * factor).to(h.dtype)
    out_features = y.shape[-1]
    out = torch.addmm(y.reshape(-1, out_features), h.reshape(-1, h.shape[-1]), up.to(h.dtype).t())
    return out.reshape(y.shape)


@lora.register_fake
def _(y, x, down, up, scale, factor):
    torch._check(x.shape[-1] == down.shape[1], lambda: f"lora: x has {x.shape[-1]} features, down expects {down.shape[1]}")
    torch._check(up.shape[1] == down.shape[0], lambda: f"lora: up has rank {up.shape[1]}, down {down.shape[0]}")
    torch._check(y.shape[-1] == up.shape[0], lambda: f"lora: y has {y.shape[-1]} features, up gives {up.shape[0]}")
    return torch.empty_like(y)
