"""Calibration forwards that start where the values stop changing (`round_gptq`'s Hessian forwards).

GPTQ runs one forward per calibration input for each Hessian chunk, and each forward sees the
weights rounded so far. A node that reads no linear still to be rounded, directly or not, is
*settled*: every later forward would compute it again, bit for bit the same. The settled values
read by a node not yet settled are the *boundary*: what later forwards start from. `Frontier`
keeps, per calibration input and within a byte budget, settled values to start from, and each
forward computes only what its chunk's inputs need and no cached value gives::

    chunk 1 (x_embedder):   hidden_states -> x_embedder                        (text path not run)
    chunk 2 (llm_cond_proj): encoder_hidden_states -> RMSNorm (53248 wide, f32) -> [cached: norm]
    chunk 3 (layer 0 qkv):  [norm] -> llm_cond_proj -> ... -> layer 0 qkv input  -> [cached: text tokens, ...]
    chunk 9 (layer 1 ...):  [residual stream after layer 0, modulation, rope]  -> layer 1 ...

Any settled values are right to start from, so a cache may hold part of the boundary: during a
forward each settled value it computes is held while it fits (graph order; none larger than an
input's share of the budget, such as the 53248-wide float32 norm), and at the end the cache keeps
the boundary values held and the held values that the boundary values left out are computed from.
So when the residual streams do not fit, the small values that are dear to compute (the text
tokens after ``llm_cond_proj``, the modulation) still spare a late forward the text path. Values
are held in graph order, so an early value can fill the budget and leave a later, better one out
(tested). When every input's boundary fits, GPTQ's forwards cost the layers between two chunks
instead of the model up to each chunk (linear in depth, not quadratic; docs/memory.md has the
counts). The caches of all inputs together stay within the budget, the one being renewed counted
with its old one. The values, and so the codes, are the same with or without a cache. Values that
are views of the graph's own inputs cost nothing (the calibration inputs hold that memory anyway);
other storages count whole.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import graph
from .errors import PassError


class _Done(Exception):
    """Ends a forward early: every wanted node has been seen."""


class Frontier:
    """Per calibration input, the cached settled values of ``gm`` (module doc).

    Args:
        gm: the graph whose forwards are run (its nodes key the caches).
        items: how many calibration inputs.
        budget: bytes the caches of all inputs may hold together (0: no cache; every forward
            still computes only what its wanted nodes need).
    """

    def __init__(self, gm: fx.GraphModule, items: int, budget: int) -> None:
        self.gm, self.budget = gm, budget
        self.live: set[fx.Node] = set()  # call nodes computed from a graph input
        for n in gm.graph.nodes:
            if n.op == "placeholder" or any(a in self.live for a in n.all_input_nodes):
                self.live.add(n)
        self.live = {n for n in self.live if n.op.startswith("call")}
        self.cache: list[Optional[dict[fx.Node, Any]]] = [None] * items
        self.sizes = [0] * items
        self.settled: set[fx.Node] = set()
        self.cacheable: set[fx.Node] = set()  # settled call nodes computed from a graph input
        self.boundary: set[fx.Node] = set()  # those read by a node still to be settled: what later forwards start from
        self.computed = 0  # call nodes the forwards computed, all together
        self.started = 0  # forwards that started from a cache
        self.peak = 0  # the most the caches held at once (bytes)
        self.left_out = 0  # boundary values a forward computed but could not keep

    def settle(self, pending: set[fx.Node]) -> None:
        """Mark as settled every node that reads none of the linears in ``pending`` (the weights
        still to be rounded), directly or not. Call it before each chunk's forwards."""
        moving: set[fx.Node] = set()
        for n in self.gm.graph.nodes:
            if n in pending or any(a in moving for a in n.all_input_nodes):
                moving.add(n)
        nodes = set(self.gm.graph.nodes)
        settled = nodes - moving
        if not self.settled & nodes <= settled:  # (a rewritten weight's old nodes have left the graph)
            raise PassError("frontier: a node settled before reads a weight still to be rounded; a rounded weight "
                            "must stay rounded (cached values would be stale)")
        self.settled, self.cacheable = settled, self.live & settled
        self.boundary = {n for n in self.cacheable if any(u not in settled for u in n.users)}

    def run(self, watch: graph.Watch, i: int, args: list[Any], wanted: set[fx.Node],
            on_value: Callable[[fx.Node, Any], None]) -> None:
        """One forward of calibration input ``i`` (its graph inputs ``args``) through ``watch``,
        handing each node of ``wanted`` to ``on_value`` and stopping once all were handed; the
        input's cache is used and renewed."""
        have = self.cache[i] or {}
        need = _needed(wanted, have)
        # any settled value may start a later forward (which ones do is seen at the end); budget 0: none
        record = need & self.cacheable if self.budget else set()
        new = dict(have)
        own = _storages(args)  # the graph inputs: held by the calibration inputs anyway
        others = sum(s for j, s in enumerate(self.sizes) if j != i)
        share = self.budget // len(self.cache)  # no one value larger than an input's share (a 53248-wide float32 norm)
        held = _storages(list(have.values()), own)
        held_bytes = sum(held.values())
        seen: set[fx.Node] = set()

        def value(n: fx.Node, v: Any) -> None:
            nonlocal held_bytes
            if n in record:  # held while it fits beside what is held (each input's old cache included)
                more = {k: b for k, b in _storages([v], own).items() if k not in held}
                size = sum(more.values())
                if size <= share and others + held_bytes + size <= self.budget:
                    new[n] = v
                    held.update(more)
                    held_bytes += size
                    self.peak = max(self.peak, others + held_bytes)
            if n in wanted:
                on_value(n, v)
                seen.add(n)
                if len(seen) == len(wanted):
                    raise _Done

        nodes, callback, skip = watch.nodes, watch.on_value, watch.skip
        watch.nodes, watch.on_value = record | wanted, value
        watch.skip = {n for n in self.gm.graph.nodes if n.op.startswith("call") and n not in need and n not in have}
        self.computed += sum(n.op.startswith("call") for n in need)
        try:
            if have:
                self.started += 1
            for n in self.gm.graph.nodes:  # wanted values the cache already has
                if n in wanted and n in have:
                    on_value(n, have[n])
                    seen.add(n)
            if len(seen) < len(wanted):
                watch.run(*args, initial_env=dict(have))
        except _Done:
            pass
        finally:
            watch.env = {}  # the activations still held when it stopped
            watch.nodes, watch.on_value, watch.skip = nodes, callback, skip
        # kept: the boundary values held, and the values the ones not held are computed from
        lost = self.boundary - new.keys()
        self.left_out += len(lost & need)
        keep = (self.boundary & new.keys()) | {a for n in _needed(lost, new) for a in n.all_input_nodes if a in new}
        new = {n: v for n, v in new.items() if n in keep}
        self.cache[i], self.sizes[i] = new or None, sum(_storages(list(new.values()), own).values())

    def bytes(self) -> int:
        """What the caches hold now."""
        return sum(self.sizes)


def _needed(wanted: set[fx.Node], have: dict[fx.Node, Any]) -> set[fx.Node]:
    """``wanted`` and every node they are computed from, stopping at the values in ``have``."""
    out: set[fx.Node] = set()
    todo = [n for n in wanted if n not in have]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(a for a in n.all_input_nodes if a not in have and a not in out)
    return out


def _storages(values: list[Any], exclude: Optional[dict[int, int]] = None) -> dict[int, int]:
    """{storage address: its bytes} of the tensors in ``values`` (a view holds its whole storage),
    less those in ``exclude``."""
    out: dict[int, int] = {}
    for t in pytree.tree_leaves(values):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in (exclude or {}):
                out[s.data_ptr()] = s.nbytes()
    return out
