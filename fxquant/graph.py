"""Small helpers every pass uses: finding linears, reading and writing attributes, replacing
nodes, and leaving a valid graph behind."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx

from . import memory
from .errors import CalibrationError, PassError
from .ops import dequant as _dequant  # noqa: F401 - registers fxquant::dequantize_*
from .ops import fold as _fold  # noqa: F401 - registers fxquant::scale_param
from .trace import as_args_kwargs

LINEAR = torch.ops.aten.linear.default
SCALE_PARAM = torch.ops.fxquant.scale_param.default
DEQUANTIZE_INT8 = torch.ops.fxquant.dequantize_int8.default
DEQUANTIZE_GGUF = torch.ops.fxquant.dequantize_gguf.default
DEQUANTIZE = (DEQUANTIZE_INT8, DEQUANTIZE_GGUF)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is LINEAR


def linear_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    for n in list(gm.graph.nodes):
        if is_linear(n):
            yield n


def module_name(node: fx.Node) -> str | None:
    """The qualified name of the ``nn.Linear`` a linear node came from, or None if its weight is
    computed in the graph (not a parameter).

    Node names change between traces; the module path in ``nn_module_stack`` does not. A tied
    weight is read through the first owner's ``get_attr``, so the stack, not the weight's target,
    names the module.
    """
    w = node.args[1]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    target = str(w.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        if path and (target == f"{path}.weight" or cls_name.endswith("Linear")):
            return path
    return target[: -len(".weight")] if target.endswith(".weight") else target


def weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The effective weight a linear node reads (the node must have a record: its weight is a
    parameter, possibly behind ``fxquant::scale_param`` folds, which are computed here: a new
    tensor of one layer, never a copy of the model)."""
    return param_value(gm, node.args[1])


def param_value(gm: torch.nn.Module, arg: fx.Node) -> torch.Tensor:
    """The value of a ``get_attr`` node, of a chain of ``fxquant::scale_param`` over one, or of a
    ``fxquant::dequantize_*`` of quantized buffers (``round_gptq``'s rounded weights)."""
    if arg.op == "get_attr":
        return get_attr(gm, str(arg.target))
    if arg.op == "call_function" and arg.target is SCALE_PARAM:
        p, s, *rest = arg.args
        return _fold.scale_region(param_value(gm, p), param_value(gm, s), *rest)
    if is_dequantize(arg):
        return arg.target(*_dequantize_args(gm, arg))
    raise PassError(f"expected a parameter (get_attr or fxquant::scale_param over one), found {arg.format_node()}")


def is_dequantize(arg: Any) -> bool:
    """A ``fxquant::dequantize_int8`` / ``dequantize_gguf`` node (a weight ``round_gptq`` rounded)."""
    return isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in DEQUANTIZE


def _dequantize_args(gm: torch.nn.Module, arg: fx.Node) -> list[Any]:
    """The argument values of a ``fxquant::dequantize_*`` node (its buffers, then its constants)."""
    return [get_attr(gm, str(a.target)) if isinstance(a, fx.Node) else a for a in arg.args]


def root_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The parameter under a linear's weight (before any fold): its shape and dtype, no copy. For a
    rounded weight (``fxquant::dequantize_*``), a meta tensor of the float weight's shape and dtype."""
    root = param_root(node.args[1])
    if is_dequantize(root):
        return torch.empty(_root_rows(gm, root)[1], dtype=root.args[-1], device="meta")
    return get_attr(gm, str(root.target))


def weight_rows(gm: fx.GraphModule, node: fx.Node, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                slice_elems: int = 1 << 22, cols: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, ...]:
    """``fn`` applied to the effective weight of a linear a slice of rows at a time, its outputs
    (each with the slice's rows in dim 0) assembled into whole tensors. With ``cols = (a, b)``
    ``fn`` sees columns ``[a, b)`` only, and a slice holds as many more rows as the window is
    narrower.

    For row-wise codecs (per-channel int8, GGUF blocks) this is bit-identical to ``fn(weight(gm,
    node))`` and never holds a full float copy of the weight: the folds are computed per slice.

    Example:
        >>> q, scale = graph.weight_rows(gm, node, quantize_weight_per_channel)  # doctest: +SKIP
    """
    chain, arg = [], node.args[1]
    while arg.op == "call_function" and arg.target is SCALE_PARAM:
        chain.append(arg)
        arg = arg.args[0]
    rows_of, shape = _root_rows(gm, arg)
    folds = [(param_value(gm, c.args[1]), *c.args[2:]) for c in reversed(chain)]
    n_rows, ndim = shape[0], len(shape)
    a, b = cols if cols is not None else (0, shape[1] if ndim > 1 else 1)
    window = cols is not None and ndim == 2 and all(len(f[1]) == 1 for f in folds)
    if window:  # each fold restricted to the window (a fold over columns moves with it)
        folds = [_fold_window(f, a, b) for f in folds]
        folds = [f for f in folds if f is not None]
    width = (b - a) if window else max(1, shape[1:].numel())
    step = max(1, slice_elems // max(1, width))
    outs: list[torch.Tensor] = []
    for i in range(0, n_rows, step):
        block = rows_of(slice(i, i + step))
        if window:
            block = block[:, a:b]
        for s, dims, start, shift, divide in folds:
            block = _fold.scale_rows(block, s, dims, start, shift, divide, i, ndim)
        if cols is not None and not window:
            block = block[:, a:b]
        parts = fn(block)
        memory.made(4 * block.numel())  # about what a slice's float32 temporaries take
        if not outs:
            outs = [torch.empty((n_rows, *p.shape[1:]), dtype=p.dtype, device=p.device) for p in parts]
        for o, p in zip(outs, parts):
            o[i:i + step] = p
    memory.trim()  # the slices' float32 temporaries: back to the OS, not kept by the allocator
    return tuple(outs)


def _fold_window(fold: tuple, a: int, b: int) -> Optional[tuple]:
    """A one-dim fold of a 2-d weight as it applies to its columns ``[a, b)`` (None: it misses them)."""
    s, dims, start, shift, divide = fold
    if dims[0] % 2 == 0:
        return fold  # over rows: the same for every column
    lo, hi = max(start, a), min(start + s.numel(), b)
    return (s[lo - start:hi - start], dims, lo - a, shift, divide) if lo < hi else None


def _root_rows(gm: fx.GraphModule, arg: fx.Node) -> tuple[Callable[[slice], torch.Tensor], torch.Size]:
    """(rows of the tensor under a fold chain by slice, its shape): a parameter's own rows (views),
    or a rounded weight's rows decoded per slice (``fxquant::dequantize_*``)."""
    if not is_dequantize(arg):
        base = get_attr(gm, str(arg.target))
        return (lambda r: base[r]), base.shape
    vals = _dequantize_args(gm, arg)
    if arg.target is DEQUANTIZE_INT8:
        q, scale, dtype = vals
        return (lambda r: _dequant.int8_rows(q[r], scale[r], dtype)), q.shape
    qweight, qtype, in_features, dtype = vals
    return (lambda r: _dequant.gguf_rows(qweight[r], qtype, in_features, dtype)), torch.Size((qweight.shape[0], in_features))


def linear_by_rows(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, bias: Optional[torch.Tensor],
                   op: Callable[..., torch.Tensor] = torch.nn.functional.linear, slice_elems: int = 1 << 22) -> torch.Tensor:
    """``op(x, weight(gm, node), bias)`` (``F.linear`` or any op whose output features are the
    weight's rows) computed a slice of the effective weight's rows at a time (`weight_rows`): no
    copy of a folded or rounded weight is made. The output is contiguous, like ``op``'s own."""
    x2d, done, out = x.reshape(-1, x.shape[-1]), 0, None

    def rows_out(rows: torch.Tensor) -> tuple[()]:
        nonlocal done, out
        b = None if bias is None else bias[done:done + rows.shape[0]]
        y = op(x2d, rows, b)
        if out is None:  # each slice's output features go straight into their columns: no second copy
            out = torch.empty((x2d.shape[0], _root_rows(gm, param_root(node.args[1]))[1][0]), dtype=y.dtype, device=y.device)
        out[:, done:done + rows.shape[0]] = y
        done += rows.shape[0]
        return ()

    weight_rows(gm, node, rows_out, slice_elems)
    return out.reshape(*x.shape[:-1], -1)


def set_weight_op(gm: fx.GraphModule, node: fx.Node, target: Callable[..., Any], args: tuple) -> None:
    """Make the linear ``node`` read its weight as ``target(*args)`` (a node inserted before it);
    the weight it read (a parameter, its fold chain) is dropped once nothing reads it."""
    old = node.args[1]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    node.update_arg(1, new)
    release_unused(gm, [old])


def param_root(arg: fx.Node) -> fx.Node:
    """The ``get_attr`` node under a chain of ``fxquant::scale_param`` (``arg`` itself if none)."""
    while arg.op == "call_function" and arg.target is SCALE_PARAM:
        arg = arg.args[0]
    return arg


def bias_arg(node: fx.Node) -> Optional[fx.Node]:
    """The bias argument of an ``aten.linear`` node (positional or keyword), or None."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def get_attr(gm: torch.nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    return getattr(mod, leaf)


def set_buffer(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Register ``value`` as a buffer at ``target``, creating empty parent modules as needed."""
    owner, _, leaf = target.rpartition(".")
    mod = gm
    for part in owner.split(".") if owner else ():
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if hasattr(mod, leaf) and leaf not in mod._buffers:
        delattr(mod, leaf)
    mod.register_buffer(leaf, value)


def set_parameter(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at ``target`` with a new tensor (never in place).

    Passes must not write into tensors shared with the caller's model.
    """
    owner, _, leaf = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if leaf in mod._parameters:
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise PassError(f"no parameter or buffer named {target!r}")


def get_attr_node(gm: fx.GraphModule, target: str, before: fx.Node) -> fx.Node:
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            return n
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(target)


def replace_node(gm: fx.GraphModule, node: fx.Node, target: Callable[..., Any], args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
    """Insert ``target(*args)`` before ``node``, port its meta, rewire its users and erase it.

    Metadata-porting policy: the new node takes *every* key of the old one's meta — ``val`` (the
    output is the same tensor: shape, dtype, device), ``nn_module_stack`` / ``stack_trace`` /
    ``source_fn_stack`` (where it came from, which names layers), ``fxquant`` and ``custom`` (the
    typed record and its JSON mirror, which survives export). The rewriting pass then updates the
    record's own field (``lowering``) through `meta.update`, which keeps the mirror in step.

    Weights the old node read and nothing reads any more are dropped at once (`release_unused`),
    so a lowering frees each float weight it replaces layer by layer (when fxquant owns it: see
    ``compile(consume=True)``), not at the end of the pass."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs or {})
    new.meta.update({k: v for k, v in node.meta.items()})
    node.replace_all_uses_with(new)
    inputs = list(node.all_input_nodes)
    gm.graph.erase_node(node)
    release_unused(gm, inputs)
    return new


def release_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the ``get_attr`` / ``fxquant::scale_param`` / ``fxquant::dequantize_*`` nodes among ``nodes`` (and below them)
    that nothing reads, and delete a parameter or buffer once no ``get_attr`` node names it."""
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if getattr(n, "_erased", False) or n.users or not (n.op == "get_attr" or n.target is SCALE_PARAM
                                                           or is_dequantize(n)):
            continue
        todo += list(n.all_input_nodes)
        target = str(n.target) if n.op == "get_attr" else None
        gm.graph.erase_node(n)
        if target is not None and not any(m.op == "get_attr" and m.target == target for m in gm.graph.nodes):
            _delete_attr(gm, target)


def _delete_attr(gm: torch.nn.Module, target: str) -> None:
    owner, _, leaf = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif leaf in mod._buffers:
        del mod._buffers[leaf]


def remove_unused_attrs(gm: fx.GraphModule) -> list[str]:
    """Delete parameters and buffers no ``get_attr`` node reads (DCE leaves them behind)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    removed = []
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            _delete_attr(gm, name)
            removed.append(name)
    return removed


def finalize(gm: fx.GraphModule) -> None:
    """Every mutating pass ends here: DCE, drop unused weights, lint, recompile."""
    gm.graph.eliminate_dead_code()
    remove_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()


def graph_inputs(gm: fx.GraphModule, item: Any, where: str, who: str) -> list[Any]:
    """One calibration item (dict of keyword arguments or tuple of positional ones) -> the traced
    graph's flat placeholder values, in the order of its input spec (``gm._in_spec``), with tensors
    moved to the module's device (calibration inputs are recorded on CPU).

    Raises:
        CalibrationError: the item has another form than the tracing example.
    """
    args, kwargs = as_args_kwargs(item, where)
    spec = gm._in_spec
    keys = list(spec.child(1).context) if spec.num_children == 2 else []
    if set(kwargs) == set(keys):
        kwargs = {k: kwargs[k] for k in keys}  # the spec is order-sensitive, calls are not
    flat, got = torch.utils._pytree.tree_flatten((args, kwargs))
    if got != spec:
        raise CalibrationError(
            f"{who}: {where} has {len(args)} positional argument(s) and keywords {sorted(kwargs)}, but the "
            f"module was traced on calibration[0] with {spec.child(0).num_children} positional argument(s) and "
            f"keywords {sorted(keys)}; give every calibration input the same form")
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in flat]


class Watch(fx.Interpreter):
    """Runs the graph and hands each watched node's value to ``on_value(node, value)`` as soon as
    it is computed (analysis passes observe activations this way; the graph is not changed).

    With ``by_rows``, a linear whose weight is computed in the graph (a ``fxquant::scale_param``
    fold chain, a ``fxquant::dequantize_*``) multiplies by a slice of its rows at a time
    (`linear_by_rows`), and the weight itself is never computed: after ``fold_smoothing`` a plain
    run makes a full copy of every folded weight as its linear runs (0.5 GB for Ideogram 4's
    ``llm_cond_proj`` in bfloat16), then frees it. Nodes in ``skip`` are not computed (their value
    is None): `fxquant.frontier` runs only what the watched nodes need.
    """

    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node], on_value: Callable[[fx.Node, Any], None],
                 by_rows: bool = False) -> None:
        super().__init__(gm)
        self.nodes, self.on_value = nodes, on_value
        self.by_rows, self.skipped = _row_linears(gm) if by_rows else (set(), set())
        self.skip: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        if n in self.skipped or n in self.skip:
            return None  # a weight computed by slices in the linear reading it, or a node nothing watched needs
        if n in self.by_rows:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = linear_by_rows(self.module, n, args[0], args[2] if len(args) > 2 else kwargs.get("bias"))
        else:
            out = super().run_node(n)
        if n.op.startswith("call"):
            memory.made(out)  # activations fragment the heap too (`memory.made`)
        if n in self.nodes:
            self.on_value(n, out)
        return out


def _row_linears(gm: fx.GraphModule) -> tuple[set[fx.Node], set[fx.Node]]:
    """(linears whose weight is a fold chain or a rounded weight, the chain nodes nothing else reads)."""
    linears, chain = set(), set()
    for n in gm.graph.nodes:
        if is_linear(n) and isinstance(n.args[1], fx.Node) and (n.args[1].target is SCALE_PARAM or is_dequantize(n.args[1])):
            linears.add(n)
            arg = n.args[1]
            while arg.op == "call_function" and arg.target is SCALE_PARAM:
                chain.add(arg)
                arg = arg.args[0]
            if is_dequantize(arg):
                chain.add(arg)
    changed = True
    while changed:  # a chain node read by anything but a row linear's weight or another skipped node is computed
        changed = False
        for c in list(chain):
            if any(not ((u in linears and u.args[1] is c) or u in chain) for u in c.users):
                chain.discard(c)
                changed = True
    return linears, chain
