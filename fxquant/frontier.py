"""Calibration forwards that start where the values stop changing (`round_gptq`'s Hessian forwards).

GPTQ runs one forward per calibration input for each Hessian chunk, and each forward sees the
weights rounded so far. A node that reads no linear still to be rounded, directly or not, is
*settled*: every later forward would compute it again, bit for bit the same. `Frontier` keeps, per
calibration input and within a byte budget, the settled values a later forward may read (those
with a reader that is not settled, or one this forward does not compute), and each forward
computes only what its chunk's inputs need and no cached value gives::

    chunk 1 (x_embedder):   hidden_states -> x_embedder                        (text path not run)
    chunk 2 (llm_cond_proj): encoder_hidden_states -> RMSNorm (53248 wide, f32) -> [cached: norm]
    chunk 3 (layer 0 qkv):  [norm] -> llm_cond_proj -> ... -> layer 0 qkv input  -> [cached: text tokens, ...]
    chunk 9 (layer 1 ...):  [residual stream after layer 0, modulation, rope]  -> layer 1 ...

When every input's cache fits, GPTQ's forwards cost the layers between two chunks instead of the
model up to each chunk (linear in depth, not quadratic; docs/memory.md has the counts and where,
at real width, the default budget falls short), and a late forward no longer starts with the text
path's float32 norm of the 53248-wide LLM features. The caches of all inputs together stay within a
byte budget, the one being renewed counted with its old one; an input whose renewed cache does
not fit keeps its old one (settled values stay right: its next forward starts further back), and
one that never had a cache that fits runs from its graph inputs. The values are the same either
way. Values that are views of the graph's own inputs cost nothing (the calibration inputs hold
that memory anyway); other storages count whole.
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
        self.computed = 0  # call nodes the forwards computed, all together
        self.started = 0  # forwards that started from a cache
        self.peak = 0  # the most the caches held at once (bytes)

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

    def run(self, watch: graph.Watch, i: int, args: list[Any], wanted: set[fx.Node],
            on_value: Callable[[fx.Node, Any], None]) -> None:
        """One forward of calibration input ``i`` (its graph inputs ``args``) through ``watch``,
        handing each node of ``wanted`` to ``on_value`` and stopping once all were handed; the
        input's cache is used and renewed."""
        have = self.cache[i] or {}
        need = _needed(wanted, have)
        users_outside = {n for n in self.cacheable
                         if any(u not in self.settled or (u not in need and u not in have) for u in n.users)}
        record = need & users_outside
        new = {n: v for n, v in have.items() if n in users_outside}
        own = _storages(args)  # the graph inputs: held by the calibration inputs anyway
        others = sum(s for j, s in enumerate(self.sizes) if j != i)
        held = _storages(list(have.values()), own)
        seen: set[fx.Node] = set()
        fits = True

        def value(n: fx.Node, v: Any) -> None:
            nonlocal fits
            if fits and n in record:
                new[n] = v
                held.update(_storages([v], own))
                total = others + sum(held.values())
                if total > self.budget:
                    fits = False
                    new.clear()
                else:
                    self.peak = max(self.peak, total)
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
        if fits:
            self.cache[i], self.sizes[i] = new or None, sum(_storages(list(new.values()), own).values())
        # else it keeps its old cache: settled values stay right, and it fitted

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
