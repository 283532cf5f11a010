"""inline_autocast: put the body of every ``wrap_with_autocast`` region back into the graph,
between the ``_enter_autocast`` / ``_exit_autocast`` calls it stands for.

    submod_1 = self.submod_1
    out = torch.ops.higher_order.wrap_with_autocast("cpu", None, False, None, submod_1, inv_freq, pos)
    freqs = out[0]
        ->
    ctx = torch.amp.autocast_mode._enter_autocast("cpu", None, False, None)
    freqs = torch.ops.aten.matmul.default(inv_freq, pos)
    torch.amp.autocast_mode._exit_autocast(ctx)

Why: ``torch.export`` turns a ``with torch.autocast(...)`` block (diffusers' Ideogram 4 disables
autocast around its MRoPE matmul, so that positions past 65536 are not rounded to bfloat16)
into this higher-order op with the block as a submodule. Dynamo refuses the op as soon as its
body uses a symbolic size (``Unsupported: wrap_with_autocast: unexpected freevars``), so
``torch.compile(gm, fullgraph=True)`` failed at the second sequence length and, without
fullgraph, broke the graph there.

The autocast state is kept, not dropped: the higher-order op runs its body inside
``torch.autocast(device_type, dtype, enabled, cache_enabled)`` and the inlined body runs inside
exactly that context, so the same ops see the same autocast state, with or without an ambient
``torch.autocast``: outputs are bit-identical. This flat form is what export itself traces
before its ``replace_autocast_with_hop_pass``, so a re-export (`fxquant.save`) folds it back into
the higher-order op, and `fxquant.load` runs this pass again. fx keeps both calls through dead
code elimination (``torch.fx.node._side_effectful_functions``).

Nested regions are inlined too (their bodies are moved into the parent module and inlined on
the next round). The copied nodes keep their ``meta``, ``val`` and ``nn_module_stack`` included.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import graph
from ..errors import PassError
from .base import FxquantPass, PassResult

WRAP_WITH_AUTOCAST = torch.ops.higher_order.wrap_with_autocast
ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast
EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast


def is_autocast_region(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is WRAP_WITH_AUTOCAST


class InlineAutocast(FxquantPass):
    name = "inline_autocast"

    def call(self, gm: fx.GraphModule) -> PassResult:
        bodies: set[str] = set()
        while regions := [n for n in gm.graph.nodes if is_autocast_region(n)]:
            for node in regions:
                bodies.add(self._inline(gm, node))
        if not bodies:
            return PassResult(gm, False)
        gm.graph.eliminate_dead_code()
        still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in bodies - still_read:  # only the inlined bodies: other modules hold parameters
            gm.delete_submodule(name)
        graph.finalize(gm)
        return PassResult(gm, True)

    def _inline(self, gm: fx.GraphModule, node: fx.Node) -> str:
        """Inline one region; returns the name of its (now unread) body submodule."""
        device_type, dtype, enabled, cache_enabled, body_node, *operands = node.args
        if node.kwargs or not (isinstance(body_node, fx.Node) and body_node.op == "get_attr"):
            raise PassError(f"{self.name}: node {node.name!r}: expected wrap_with_autocast(device_type, dtype, enabled, "
                            f"cache_enabled, <get_attr body>, *operands), found args {node.args} kwargs {node.kwargs}")
        body = graph.get_attr(gm, str(body_node.target))
        placeholders = [b for b in body.graph.nodes if b.op == "placeholder"]
        if len(placeholders) != len(operands):
            raise PassError(f"{self.name}: region {body_node.target!r} takes {len(placeholders)} inputs "
                            f"but is called with {len(operands)}")
        env: dict[fx.Node, fx.Node] = dict(zip(placeholders, operands))
        g = gm.graph
        result = None
        with g.inserting_before(node):
            enter = g.call_function(ENTER_AUTOCAST, (device_type, dtype, enabled, cache_enabled))
            enter.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
            for b in body.graph.nodes:
                if b.op == "placeholder":
                    continue
                if b.op == "output":
                    result = fx.node.map_arg(b.args[0], env.__getitem__)
                    continue
                if b.op == "get_attr":  # a nested region's body (or a constant): move it to the parent
                    env[b] = g.get_attr(_adopt(gm, str(body_node.target), body, str(b.target)))
                    env[b].meta.update(b.meta)
                    continue
                env[b] = g.node_copy(b, env.__getitem__)
            g.call_function(EXIT_AUTOCAST, (enter,))
        _rewire(node, result)
        g.erase_node(node)
        return str(body_node.target)


def _adopt(gm: fx.GraphModule, body_name: str, body: torch.nn.Module, target: str) -> str:
    """Register ``body``'s attribute ``target`` on ``gm`` under a fresh top-level name."""
    value = graph.get_attr(body, target)
    base = f"{body_name}_{target}".replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    if isinstance(value, torch.nn.Module):
        gm.add_submodule(name, value)
    else:
        setattr(gm, name, value)
    return name


def _rewire(node: fx.Node, result: object) -> None:
    """Point the region's users at the inlined outputs: ``out[i]`` for a tuple body, ``out`` otherwise."""
    if not isinstance(result, (tuple, list)):
        node.replace_all_uses_with(result)
        return
    for user in list(node.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise PassError(f"inline_autocast: region {node.name!r} returns a tuple but {user.name!r} uses it whole")
        user.replace_all_uses_with(result[user.args[1]])
        node.graph.erase_node(user)
