"""The fold op: a parameter with a SmoothQuant vector folded in, computed from the original.

    fxquant.scale_param(p, s, dims, start, shift, divide)
        divide:      region(p) -> (region(p) + shift) / s - shift      (1/s folded into a norm / rows)
        not divide:  region(p) -> region(p) * s                        (s folded into weight columns)

``region`` is ``[start, start + len(s))`` along ``dims[0]`` (one dim), or the whole parameter with
``s`` laid over ``dims`` in order (several dims). Arithmetic is float32, the result has ``p``'s
dtype, and ``p`` is never written.

``fold_smoothing`` leaves these ops in the graph instead of materializing every smoothed weight
(which would be a second full float copy of the model); the lowering computes one linear's
effective weight, quantizes it and frees the original (`fxquant.graph.weight`), and
``materialize_folds`` bakes what stays float. The op works in slices of dim 0, so the float32
temporary is one slice, not one parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements per float32 slice: 16 MiB of temporaries.
SLICE_ELEMS = 1 << 22


def _broadcast(p: Tensor, s: Tensor, dims: list[int], start: int) -> tuple[Tensor, Tensor]:
    """(the region of ``p`` that changes, ``s`` shaped to broadcast over it)."""
    if len(dims) == 1:
        d = dims[0] % p.ndim
        shape = [1] * p.ndim
        shape[d] = s.numel()
        return p.narrow(d, start, s.numel()), s.reshape(shape)
    dims = [d % p.ndim for d in dims]
    sizes = [p.shape[d] for d in dims]
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    shape = [1] * p.ndim
    for i in order:
        shape[dims[i]] = sizes[i]
    return p, s.reshape(sizes).permute(order).reshape(shape)


def scale_region(p: Tensor, s: Tensor, dims: list[int], start: int, shift: float, divide: bool) -> Tensor:
    """The reference computation of ``fxquant::scale_param`` (a new tensor; ``p`` is untouched)."""
    out = p.detach().clone()
    region, sv = _broadcast(out, s.detach().float(), list(dims), start)
    if region.ndim == 0:
        region, sv = region.reshape(1), sv.reshape(1)
    step = max(1, SLICE_ELEMS // max(1, region[0].numel()))
    for i in range(0, region.shape[0], step):
        r = region[i:i + step]
        sc = sv if sv.shape[0] == 1 else sv[i:i + step]
        q = r.float()
        q = (q + shift) / sc - shift if divide else q * sc
        r.copy_(q.to(p.dtype))
    return out


@torch.library.custom_op("fxquant::scale_param", mutates_args=())
def scale_param(p: Tensor, s: Tensor, dims: list[int], start: int, shift: float, divide: bool) -> Tensor:
    """``p`` with the smoothing vector ``s`` folded in (see the module docstring)."""
    return scale_region(p, s, dims, start, shift, divide)


@scale_param.register_fake
def _(p: Tensor, s: Tensor, dims: list[int], start: int, shift: float, divide: bool) -> Tensor:
    return torch.empty_like(p)


def scale_rows(block: Tensor, s: Tensor, dims: list[int], start: int, shift: float, divide: bool, row0: int,
               ndim: int) -> Tensor:
    """Rows ``[row0, row0 + len(block))`` of ``scale_param(p, ...)`` for a parameter ``p`` of
    ``ndim`` dims, computed from the same rows of ``p`` alone (bit-identical to slicing the whole)."""
    dims = [d % ndim for d in dims]
    if 0 not in dims:
        return scale_region(block, s, dims, start, shift, divide)
    if len(dims) != 1:
        raise NotImplementedError("scale_rows: a fold over dim 0 and other dims needs the whole parameter")
    lo, hi = max(start, row0), min(start + s.numel(), row0 + block.shape[0])
    if lo >= hi:
        return block
    out = block.detach().clone()
    out[lo - row0:hi - row0] = scale_region(block[lo - row0:hi - row0], s[lo - start:hi - start], [0], 0, shift, divide)
    return out
