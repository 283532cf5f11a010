"""Channel-dim bookkeeping through index-only ops, for `fold_targets`' backward walk.

A smoothing vector scales the channels of a tensor; walking back from a linear's input, the walk
must know which dims of each earlier tensor hold those channels:

    x[B, L, H*D] <- flatten(2, 3) <- [B, L, H, D] <- permute <- sdpa(q, k, v[B, H, L, D]) <- permute <- unflatten <- to_v
    dims (2,)                          (2, 3)                      (1, 3) on v's output         (2, 3)     (2,)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten


def val(n) -> Optional[torch.Tensor]:
    """The node's example value (``meta["val"]``) if it is a tensor."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def view_input_dims(n: fx.Node, v: torch.Tensor, dims: tuple[int, ...], start: int, channels: int) -> Optional[tuple[int, ...]]:
    """The dims of ``n``'s input that hold the channels, for an index-only op ``n`` (view, selection).

    Args:
        n: the op; v: its output value; dims: the output dims holding the ``channels`` channels
            (flattened in order); start: the first channel's offset inside a single dim (a chunk).

    Returns None where the op mixes channels with other dims, cuts them, or is not index-only.

    Example:
        >>> view_input_dims(unflatten(x[B, L, 128], -1, (4, 32)), v, (2, 3), 0, 128)  # doctest: +SKIP
        (2,)
    """
    t, a = n.target, n.args
    src = val(a[0]) if a and isinstance(a[0], fx.Node) else None
    if src is None:
        return None
    if t is aten.unsqueeze.default:
        d = norm_dim(a[1], v.ndim)
        return None if d in dims else tuple(x - (x > d) for x in dims)
    if t is aten.squeeze.dim:
        d = norm_dim(a[1], src.ndim)
        return tuple(x + (x >= d) for x in dims) if isinstance(src.shape[d], int) and src.shape[d] == 1 else None
    if t is aten.permute.default:
        return tuple(norm_dim(a[1][x], src.ndim) for x in dims)
    if t is aten.transpose.int:
        i, j = norm_dim(a[1], v.ndim), norm_dim(a[2], v.ndim)
        return tuple(j if x == i else i if x == j else x for x in dims)
    if t is aten.expand.default:
        off = v.ndim - src.ndim
        out = tuple(x - off for x in dims)
        return out if all(x >= 0 and src.shape[x] == v.shape[x + off] for x in out) else None
    if t in (aten.slice.Tensor, aten.select.int):
        d = norm_dim(a[1] if len(a) > 1 else 0, src.ndim)
        if t is aten.select.int:
            return tuple(x + (x >= d) for x in dims)
        if d in dims or (len(a) > 4 and a[4] != 1):
            return None  # a slice of the channels is not a view of the whole vector
        return dims
    if start:
        return None
    if t is aten.flatten.using_ints:
        return _flatten_dims(a, src, dims)
    if t is aten.unflatten.int:
        return _unflatten_dims(a, src, dims)
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return _view_dims(src, v, dims, channels)
    return None


def _flatten_dims(a: tuple, src: torch.Tensor, dims: tuple[int, ...]) -> tuple[int, ...]:
    """flatten(s, e): output dim s is input dims s..e; later dims shift by e - s."""
    s, e = norm_dim(a[1] if len(a) > 1 else 0, src.ndim), norm_dim(a[2] if len(a) > 2 else -1, src.ndim)
    out: list[int] = []
    for x in dims:
        out += list(range(s, e + 1)) if x == s else [x if x < s else x + (e - s)]
    return tuple(out)


def _unflatten_dims(a: tuple, src: torch.Tensor, dims: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """unflatten(d, sizes): output dims d..d+k-1 are input dim d; only the whole run maps back."""
    d, k = norm_dim(a[1], src.ndim), len(a[2])
    run = tuple(range(d, d + k))
    out = []
    i = 0
    while i < len(dims):
        if dims[i] == d:
            if tuple(dims[i:i + k]) != run:
                return None
            out.append(d)
            i += k
        elif d < dims[i] < d + k:
            return None
        else:
            out.append(dims[i] if dims[i] < d else dims[i] - (k - 1))
            i += 1
    return tuple(out)


def _view_dims(src: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...], channels: int) -> Optional[tuple[int, ...]]:
    """view / reshape: the channels must be the trailing dims of both sides (static sizes only)."""
    k = len(dims)
    if dims != tuple(range(v.ndim - k, v.ndim)):
        return None
    prod = 1
    for m in range(1, src.ndim + 1):
        size = src.shape[-m]
        if not isinstance(size, int):
            return None
        prod *= size
        if prod == channels:
            return tuple(range(src.ndim - m, src.ndim))
        if prod > channels:
            return None
    return None
