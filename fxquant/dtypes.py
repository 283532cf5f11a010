"""Which dtype constants of a traced graph are the model's compute dtype, and making them (and
every device constant) follow ``module.to(...)``.

torch.export bakes dtypes and devices into the graph: ``x.to(hidden_states.dtype)`` becomes
``aten.to.dtype(x, torch.float32)``, exactly like the deliberate ``pos.to(torch.float32)`` of a
float32 RoPE. The two cannot be told apart from one graph, so `mark` traces the model a second
time, on fake tensors in another float dtype (no memory, no weights), and compares:

    traced (float32 model):  to.dtype(mask, float32)   to.dtype(pos, float32)   arange(..., device=cpu)
    probe  (float64 copy):   to.dtype(mask, float64)   to.dtype(pos, float32)
                                      ^ follows the model          ^ deliberate: stays

and records the following leaves in ``node.meta["custom"]["fxquant_dtype"]`` (which survives
save / load). `bind_compute` then rewrites those leaves, and every device leaf, to read a
0-element non-persistent buffer ``_fxquant_compute``:

    before:  to = aten.to.dtype(mask, torch.float32);  arange(n, device=device(type='cpu'))
    after:   like = self._fxquant_compute; dt = getattr(like, 'dtype'); dev = getattr(like, 'device')
             to = aten.to.dtype(mask, dt);             arange(n, device=dev)

The buffer is cast and moved by ``.to()`` like any float buffer, so the graph follows without
being rewritten again (and a forward captured by an offload hook stays valid).
``aten._assert_tensor_metadata`` nodes (checks that inputs have the traced dtype and device) stop
checking dtype and device: after ``.to()`` they would check the old ones. They stay in the graph:
a re-export (`fxquant.save`) makes such a check for every ``aten.to`` anyway, and one made right
after a linear would otherwise copy that linear's record from the node before it.

The probe uses a dtype of the same kind (float32 / float64, bfloat16 / float16), because models
branch on half versus full precision: diffusers' RMSNorm casts to its weight's dtype only for
float16 / bfloat16, so a graph traced in float32 lacks that cast. After ``.to()`` changes the kind,
`legalize` runs the graph on fake tensors and inserts, before each float matmul whose operands
disagree, the cast to the weight's dtype the model's own code would have made:

    float32 graph, .to(bfloat16):  linear(norm_out_f32, w_bf16)
                               ->  linear(to.dtype(norm_out_f32, dt), w_bf16)
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .trace import as_args_kwargs, exported_module

KEY = "fxquant_dtype"  # in node.meta["custom"]: indices of the node's leaves that follow the compute dtype
BUFFER = "_fxquant_compute"
ASSERT = torch.ops.aten._assert_tensor_metadata.default


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's compute dtype: its ``.dtype`` if it has one, else its first float parameter's."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    floats = [t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return floats[0] if floats else torch.get_default_dtype()


def _leaves(node: fx.Node) -> tuple[list[Any], Any]:
    return torch.utils._pytree.tree_flatten((node.args, node.kwargs))


def _graphs(gm: torch.nn.Module) -> Iterator[tuple[str, fx.GraphModule]]:
    for name, m in gm.named_modules():
        if isinstance(m, fx.GraphModule):
            yield name, m


def _dtype_nodes(g: fx.Graph) -> list[fx.Node]:
    return [n for n in g.nodes if n.target is not ASSERT and any(isinstance(v, torch.dtype) for v in _leaves(n)[0])]


def _probe(model: torch.nn.Module, example: Any, dtype: torch.dtype) -> fx.GraphModule:
    """``model`` traced on fake tensors with every float parameter, buffer and input in ``dtype``
    (static shapes; autocast regions inlined as `trace` does)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        memo: dict[int, Any] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            f = mode.from_tensor(t)
            f = f.to(dtype) if t.is_floating_point() else f
            memo[id(t)] = torch.nn.Parameter(f, requires_grad=False) if isinstance(t, torch.nn.Parameter) else f
        fake = copy.deepcopy(model, memo)  # shares nothing with the caller's model, holds no memory
        args, kwargs = as_args_kwargs(example)
        args, kwargs = torch.utils._pytree.tree_map(
            lambda v: (mode.from_tensor(v).to(dtype) if v.is_floating_point() else mode.from_tensor(v))
            if isinstance(v, torch.Tensor) else v, (args, kwargs))
        with torch.no_grad():
            ep = torch.export.export(fake.eval(), args, kwargs, strict=False)
        return exported_module(ep)


def _probe_dtype(dtype: torch.dtype) -> torch.dtype:
    """Another dtype of the same kind: models branch on half vs full precision (diffusers' RMSNorm
    casts to its weight's dtype only when that is float16 / bfloat16), not within a kind."""
    return {torch.float32: torch.float64, torch.float64: torch.float32,
            torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}.get(dtype, torch.float64)


def mark(gm: fx.GraphModule, model: torch.nn.Module, example: Any) -> bool:
    """Record which dtype leaves of ``gm`` (traced from ``model`` on ``example``) follow the model's
    compute dtype. Returns False, marking nothing, when the probe's graph does not line up (the
    model's control flow depends on its dtype) or the model cannot be traced on fake tensors."""
    dtype = compute_dtype(model)
    other = _probe_dtype(dtype)
    try:
        probe = _probe(model, example, other)
    except Exception:  # noqa: BLE001 - a model the fake trace cannot handle simply gets no marks
        return False
    theirs = dict(_graphs(probe))
    pairs = []
    for name, sub in _graphs(gm):
        mine, other_nodes = _dtype_nodes(sub.graph), _dtype_nodes(theirs[name].graph) if name in theirs else []
        if [n.target for n in mine] != [n.target for n in other_nodes]:
            return False
        pairs += list(zip(mine, other_nodes))
    for a, b in pairs:
        la, lb = _leaves(a)[0], _leaves(b)[0]
        follow = [i for i, (x, y) in enumerate(zip(la, lb)) if isinstance(x, torch.dtype) and x == dtype and y == other]
        if follow:
            a.meta["custom"] = {**(a.meta.get("custom") or {}), KEY: follow}
    return True


def bind_compute(gm: fx.GraphModule, dtype: torch.dtype, device: torch.device) -> None:
    """Make every marked dtype leaf and every device leaf of ``gm`` (and of its submodule graphs)
    read the ``_fxquant_compute`` buffer, created with ``dtype`` on ``device``; the
    ``_assert_tensor_metadata`` checks stop checking dtype and device. Idempotent."""
    for _, sub in _graphs(gm):
        g = sub.graph
        if BUFFER not in sub._buffers:
            sub.register_buffer(BUFFER, torch.empty(0, dtype=dtype, device=device), persistent=False)
        for n in g.nodes:  # kept (a re-export makes them again), but no longer checking dtype and device
            if n.target is ASSERT:  # (size, stride and dtype may also come positionally)
                n.args, n.kwargs = n.args[:1], {k: v for k, v in n.kwargs.items() if k == "layout"}
        anchor = next((n for n in g.nodes if n.op != "placeholder"), None)
        if anchor is None:
            continue
        with g.inserting_before(anchor):
            like = next((n for n in g.nodes if n.op == "get_attr" and n.target == BUFFER), None) or g.get_attr(BUFFER)
        with g.inserting_after(like):
            dev = g.call_function(getattr, (like, "device"))
            dt = g.call_function(getattr, (like, "dtype"))
        for n in list(g.nodes):
            if n in (like, dt, dev):
                continue
            leaves, spec = _leaves(n)
            follow = set((n.meta.get("custom") or {}).get(KEY, ()))
            new = [dt if i in follow and isinstance(v, torch.dtype) else dev if isinstance(v, torch.device) else v
                   for i, v in enumerate(leaves)]
            if any(x is not y for x, y in zip(new, leaves)):
                n.args, n.kwargs = torch.utils._pytree.tree_unflatten(new, spec)
        for n in (dt, dev):
            if not n.users:
                g.erase_node(n)
        if not like.users:
            g.erase_node(like)
        g.lint()
        sub.recompile()


MATMULS = (torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.matmul.default, torch.ops.aten.conv2d.default)


class _Legalize(fx.Interpreter):
    """Runs the graph on fake tensors; before a matmul whose float operands disagree (a full-precision
    activation meeting a weight cast to half precision), casts the activation to the weight's dtype."""

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in MATMULS and len(n.args) >= 2:
            x, w = self.env.get(n.args[0]), self.env.get(n.args[1])
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.is_floating_point()
                    and w.is_floating_point() and x.dtype != w.dtype):
                g = n.graph
                with g.inserting_before(n):
                    cast = g.call_function(torch.ops.aten.to.dtype, (n.args[0], w.dtype))
                cast.meta["custom"] = {KEY: [1]}  # follows the compute dtype, like the model's own casts
                n.replace_input_with(n.args[0], cast)
                self.env[cast] = x.to(w.dtype)
        return super().run_node(n)


def legalize(gm: fx.GraphModule, example: Any) -> int:
    """After a change of precision kind (a float32 graph made bfloat16), insert the casts the model's
    own dtype-dependent code would have made before each float matmul. Returns how many.

    ``example``: the graph's keyword inputs, or a function making them (called under the fake mode,
    so that tensors of the real sizes take no memory)."""
    before = len(gm.graph.nodes)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        args, kwargs = as_args_kwargs(example() if callable(example) else example)
        inputs = torch.utils._pytree.tree_leaves((args, {k: kwargs[k] for k in gm._in_spec.child(1).context}))
        _Legalize(gm).run(*inputs)
    added = len(gm.graph.nodes) - before
    if added:  # the new casts read the compute buffer like the model's own
        like = getattr(gm, BUFFER)
        bind_compute(gm, like.dtype, like.device)
    return added
