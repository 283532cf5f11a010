"""Fold-target finding for `fxquant.passes.fold_smoothing`: where a smoothing vector's ``1/s`` can go.

A group of linears reads one tensor ``x``. Smoothing divides ``x`` by ``s`` per input channel
and multiplies the linears' weight columns by ``s``. `FoldFinder` walks the graph backwards from
``x`` through channel-preserving operations to the parameters that can absorb ``1/s``:

    rms_norm / layer_norm affine weight (and bias)     ... -> mul(n, get_attr[norm.weight]) -> x
    adaLN modulation rows (and bias)                   linear(c) -> chunk -> [+1] -> mul(norm(h), .) -> x
    a preceding linear's rows (and bias)               to_v -> unflatten -> permute -> sdpa(v) -> ... -> x

The walk carries, for the tensor it stands on, which of its dims hold the channels (flattened in
order; ``unflatten``/``permute``/``sdpa`` move them around), the first channel's offset inside
that dim (``chunk``/``slice`` of a modulation output) and an additive ``shift`` c collected
from ``+ c``: a fold must turn ``p`` into ``(p + c) / s - c`` so that ``(1 + m) / s = 1 + m'``.
It declines (returns None) at anything else: a tensor also read elsewhere, a nonlinearity, an op
it does not know, a parameter read twice or belonging to a linear that must stay untouched.
The vector math (and `ParamFold`, what a found fold changes) is in `smoothing`.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch
import torch.fx as fx

from .channel_dims import norm_dim as _norm_dim, val as _val, view_input_dims
from ... import graph
from .smoothing import Fold, ParamFold, overlapping

aten = torch.ops.aten

def _occurrences(user: fx.Node, node: fx.Node) -> int:
    leaves = torch.utils._pytree.tree_leaves((user.args, user.kwargs))
    return sum(1 for a in leaves if a is node)


def readers(node: fx.Node) -> set[fx.Node]:
    """Nodes that read ``node``'s values (export's metadata asserts only check dtype and shape)."""
    return {u for u in node.users if u.target is not aten._assert_tensor_metadata.default}


def _sole_reader(node: fx.Node, user: fx.Node) -> bool:
    """``user`` is the only node reading ``node``, and reads it once."""
    return readers(node) == {user} and _occurrences(user, node) == 1


def _module_of(target: str) -> str:
    return target.rpartition(".")[0]


_IDENTITY = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
             aten.contiguous.default, aten.alias.default, aten.detach.default}
_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}


class FoldFinder:
    """Walks backwards from a group's input to the parameters that can absorb ``1/s``.

    Args:
        gm: the graph module.
        frozen: parameter targets that must not change (weights of skipped linears).
    """

    def __init__(self, gm: fx.GraphModule, frozen: set[str]) -> None:
        self.gm = gm
        self.frozen = frozen
        # Parameters read by more than one get_attr node (also through tied tensors) cannot be folded.
        readers: dict[int, int] = {}
        self._tensor: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                t = graph.get_attr(gm, str(n.target))
                key = id(t)
                self._tensor[str(n.target)] = key
                readers[key] = readers.get(key, 0) + 1
        self._readers = readers

    def find(self, x: fx.Node, members: Sequence[fx.Node], channels: int) -> Optional[Fold]:
        """The fold for a group of linears ``members`` reading ``x`` (``channels`` wide), or None."""
        if readers(x) != set(members) or any(_occurrences(m, x) != 1 or m.args[0] is not x for m in members):
            return None
        v = _val(x)
        if v is None:
            return None
        self.c = channels
        found = self._walk(x, (v.ndim - 1,), 0, 0.0, False)
        if found is None:
            return None
        params, kinds, names = found
        if overlapping(params, channels):
            return None  # two branches want the same parameter entries
        kind = "adaln" if "adaln" in kinds else ("norm" if "norm" in kinds else "linear")
        return Fold(kind, ",".join(dict.fromkeys(names)), tuple(params))

    # Each step returns (param folds, kinds, module names) or None.
    def _walk(self, n: fx.Node, dims: tuple[int, ...], start: int, shift: float, mod: bool):
        if n.op == "get_attr":
            return self._param(n, dims, start, shift, "norm")
        if n.op != "call_function":
            return None
        v = _val(n)
        if v is None:
            return None
        t, a = n.target, n.args
        if t is aten.linear.default:
            return self._linear(n, dims, start, shift, mod or shift != 0.0)
        if t in (aten.layer_norm.default, aten.rms_norm.default):
            return self._norm(n, v, dims, start, shift)
        if t in _IDENTITY or (t is aten.dropout.default and not a[2]):
            return self._step(n, a[0], dims, start, shift, mod)
        if t is operator.getitem:
            return self._getitem(n, dims, start, shift, mod)
        if t in (aten.add.Tensor, aten.sub.Tensor):
            return self._add(n, v, dims, start, shift, mod)
        if t in (aten.mul.Tensor, aten.div.Tensor):
            return self._mul(n, v, dims, start, shift, mod)
        if t is aten.scaled_dot_product_attention.default:
            if len(a) < 3 or n.kwargs.get("enable_gqa") or v.ndim < 3 or (v.ndim - 2) in dims:
                return None  # only V's head and feature dims commute with attention
            if any(_norm_dim(d, v.ndim) < v.ndim - 3 for d in dims):
                return None
            return self._step(n, a[2], dims, start, shift, mod)
        mapped = view_input_dims(n, v, dims, start, self.c)
        return None if mapped is None else self._step(n, a[0], mapped, start, shift, mod)

    def _step(self, n: fx.Node, child, dims, start, shift, mod):
        if not isinstance(child, fx.Node) or not _sole_reader(child, n):
            return None
        return self._walk(child, dims, start, shift, mod)

    def _getitem(self, n, dims, start, shift, mod):
        parent, i = n.args
        if not (isinstance(parent, fx.Node) and parent.op == "call_function" and parent.target in _SPLITS):
            return None
        src = parent.args[0]
        sv = _val(src) if isinstance(src, fx.Node) else None
        if sv is None or not _sole_reader(src, parent):
            return None
        if sum(1 for u in parent.users if u.args[1] == i) != 1:
            return None
        d = _norm_dim(parent.args[2] if len(parent.args) > 2 else parent.kwargs.get("dim", 0), sv.ndim)
        if d not in dims:  # a split along tokens: every other piece would change too
            return self._walk(src, dims, start, shift, mod) if len(parent.users) == 1 else None
        if len(dims) != 1:
            return None
        size = int(sv.shape[d])
        if parent.target is aten.chunk.default:
            offset = i * math.ceil(size / parent.args[1])
        elif parent.target is aten.split.Tensor:
            offset = i * parent.args[1]
        else:
            offset = sum(parent.args[1][:i])
        return self._walk(src, dims, start + offset, shift, True)

    def _add(self, n, v, dims, start, shift, mod):
        x, y = n.args[0], n.args[1]
        alpha = n.kwargs.get("alpha", 1)
        sign = -1.0 if n.target is aten.sub.Tensor else 1.0
        if isinstance(y, (int, float)) and isinstance(x, fx.Node) and alpha == 1:
            return self._step(n, x, dims, start, shift + sign * float(y), True)
        if isinstance(x, (int, float)) and sign > 0 and isinstance(y, fx.Node):
            return self._step(n, y, dims, start, shift + float(x), True)
        if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)) or sign < 0 or alpha != 1 or x is y:
            return None
        # (a + b + c)/s - c = a/s + ((b + c)/s - c): both branches must take the fold.
        da, db = self._factor_dims(x, v, dims), self._factor_dims(y, v, dims)
        if da is None or db is None:
            return None
        fa = self._step(n, x, da, start, 0.0, mod)
        fb = self._step(n, y, db, start, shift, mod) if fa is not None else None
        if fb is None:
            return None
        return fa[0] + fb[0], fa[1] + fb[1], fa[2] + fb[2]

    def _mul(self, n, v, dims, start, shift, mod):
        x, y = n.args[0], n.args[1]
        if shift != 0.0:
            return None  # (a*b + c)/s - c does not fold into one factor
        if isinstance(y, (int, float)) and isinstance(x, fx.Node):
            return self._step(n, x, dims, start, 0.0, mod) if y != 0 else None
        if n.target is aten.div.Tensor or not (isinstance(x, fx.Node) and isinstance(y, fx.Node)) or x is y:
            return None
        # A parameter factor (a norm weight) first, then the factors in argument order.
        cands = sorted((x, y), key=lambda f: f.op != "get_attr")
        for f in cands:
            fd = self._factor_dims(f, v, dims)
            if fd is None:
                continue
            fv = _val(f)
            broadcast = fv is not None and fv.numel() != v.numel()
            found = self._step(n, f, fd, start, 0.0, mod or broadcast)
            if found is not None:
                return found
        return None

    def _factor_dims(self, f: fx.Node, out: torch.Tensor, dims: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """Channel dims inside a broadcast operand, or None if it is broadcast along a channel dim."""
        fv = _val(f)
        if fv is None:
            return None
        off = out.ndim - fv.ndim
        fd = tuple(d - off for d in dims)
        if any(d < 0 or fv.shape[d] != out.shape[d + off] for d in fd):
            return None
        return fd

    def _param(self, n: fx.Node, dims, start, shift, kind):
        target = str(n.target)
        if target in self.frozen or self._readers.get(self._tensor.get(target, -1), 0) != 1 or len(n.users) != 1:
            return None
        if not isinstance(graph.get_attr(self.gm, target), torch.Tensor):
            return None
        return [ParamFold(target, dims, start, shift, self.c)], [kind], [_module_of(target)]

    def _linear(self, n, dims, start, shift, modulation):
        v = _val(n)
        if len(dims) != 1 or dims[0] != v.ndim - 1:
            return None
        w, b = n.args[1], (n.args[2] if len(n.args) > 2 else None)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        if b is None and shift != 0.0:
            return None
        kind = "adaln" if modulation else "linear"
        fw = self._param(w, (0,), start, 0.0, kind)
        fb = self._param(b, (0,), start, shift, kind) if isinstance(b, fx.Node) else ([], [], [])
        if fw is None or fb is None or (b is not None and not isinstance(b, fx.Node)):
            return None
        return fw[0] + fb[0], [kind], [_module_of(str(w.target))]

    def _norm(self, n, v, dims, start, shift):
        is_ln = n.target is aten.layer_norm.default
        a = n.args
        shape = a[1]
        w = a[2] if len(a) > 2 else None
        b = a[3] if is_ln and len(a) > 3 else None
        if not isinstance(w, fx.Node) or (shift != 0.0 and not isinstance(b, fx.Node)):
            return None
        off = v.ndim - len(shape)
        pd = tuple(d - off for d in dims)
        if any(d < 0 for d in pd) or (start and len(pd) != 1):
            return None
        fw = self._param(w, pd, start, 0.0, "norm")
        fb = self._param(b, pd, start, shift, "norm") if isinstance(b, fx.Node) else ([], [], [])
        if fw is None or fb is None:
            return None
        return fw[0] + fb[0], ["norm"], [_module_of(str(w.target))]
