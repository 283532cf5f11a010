"""round_gptq: GPTQ rounding for the weights ``lower_w8a8`` and ``lower_gguf`` will quantize.

    before:  y = aten.linear(x, get_attr[l.weight])                               W, float
    after:   y = aten.linear(x, fxquant.dequantize_int8(get_attr[l.weight_int8], get_attr[l.weight_scale], bf16))
             y = aten.linear(x, fxquant.dequantize_gguf(get_attr[l.qweight], "q4_k", in_features, bf16))

The weight becomes its codes: int8 codes on the per-output-channel scale the lowering computes
anyway (``max_k |W[o, k]| / 127``, `fxquant.ops.w8a8.quantize_weight_per_channel`), or GGUF bytes
whose block headers are the ones llama.cpp's reference encoder computes from ``W``
(`fxquant.codecs.grid`: Q8_0's fp16 ``d`` per 32 weights; Q4_K's ``d``, ``dmin`` and 6-bit scales
and mins per 256; a code q of weight (o, k) stands for ``step * q - offset``,
`fxquant.codecs.grid_values`). Only the codes differ from round-to-nearest. They come from GPTQ
(Frantar et al., 2023): columns in decreasing order of the calibration Hessian's diagonal ("act
order"), each column rounded and its error spread over the columns not yet rounded through the
inverse Hessian ``H = X^T X + damp * mean(diag H) * I`` of the linear's input ``X`` on the
calibration inputs (after smoothing: the pass runs after ``fold_smoothing``). The float weight
(and its fold chain) leaves the module as soon as its codes are there; the lowering then takes
the codes as they are (``lower_w8a8``: ``linear_w8a8`` on ``weight_int8`` / ``weight_scale``;
``lower_gguf``: ``linear_gguf`` on ``qweight``). Between the two passes the graph runs, on the
dequantized codes, and the forwards of later Hessian chunks see the rounded weights of the
earlier ones. The int8 code at each row's max-|W| position is its RTN code (+-127), so that the
codes' largest magnitude matches the scale. The GGUF bytes are checked to decode to GPTQ's float32
values bit for bit (a ``PassError`` otherwise). Each weight's record gets ``rounding``
(`fxquant.meta.Rounding`); a linear already rounded is declined.

Memory (docs/memory.md): the Hessians, float32 ``in_features^2`` per distinct input (q/k/v share
one), are held at most ``hessian_bytes`` at a time, counting the one extra copy the inversion
makes (default: a twentieth of the module's float bytes, at least 64 MiB: half of the 10 % that
`compile` may hold beyond the model and its output, the other half for the forwards' activations
and the row slices). Inputs are processed in
chunks whose Hessians fit; each chunk costs one forward pass per calibration input, which computes
only what the chunk's inputs need and starts from the input's cached values that no weight still
to be rounded can change (`fxquant.frontier`, within ``frontier_bytes``), and each
Hessian is freed once the weights reading it are rounded. A weight whose own Hessian does not fit
is rounded in column groups that do, each against its own diagonal block of ``H`` (the error is
spread within the group, not across groups: between whole GPTQ and round-to-nearest); its record
says how many groups (``rounding.groups``). Rounding works on a slice of the weight's rows at a
time, of the group's columns only (rows are independent given the inverse Hessian; a narrow group
gets proportionally more rows per slice, so fewer trips through GPTQ's column loop), and the
weight's codes take one byte per weight, so nothing holds a second float copy of the model. A
weight rounded in groups ends its chunk (the next chunk's forwards see it rounded). With
``in_place`` (``compile(consume=True)``) a weight nothing else holds takes its own codes: they
are written into its columns group by group, then it becomes its int8 codes in its own memory
(`_compact`), so a weight and its codes never take memory side by side.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx

from .. import codecs, frontier, graph, memory, meta
from ..errors import CalibrationError, PassError, is_int
from ..ops.w8a8 import INT8_MAX, quantize_weight_per_channel
from ..schemes import Scheme
from .base import FxquantPass, PassResult, require_records

log = logging.getLogger("fxquant")

MIN_BUDGET = 64 << 20  # the least ``hessian_bytes`` the default takes, whatever the model's size
BUDGET_DIVISOR = 20  # the default ``hessian_bytes``: the module's float bytes over this (5 %)
FRONTIER_SHARE = 2  # the default cache of settled values (`fxquant.frontier`): the Hessian budget over this
ROW_SLICE = 1 << 22  # float32 elements of activation rows added to a Hessian at once (16 MiB)
ROUND_SLICE = 1 << 21  # elements of a weight's rows rounded, encoded or compacted at once (8 MiB as float32)
RoundCol = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def act_order(h: torch.Tensor) -> torch.Tensor:
    """The column order GPTQ rounds in: decreasing Hessian diagonal (a dead input counts 1)."""
    d = torch.diagonal(h.detach().float())
    return torch.argsort(torch.where(d > 0, d, 1.0), descending=True, stable=True)


def prepare(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(act order ``perm``, upper Cholesky factor of the damped inverse Hessian in that order).

    ``h`` (float32) is overwritten with the factor, step by step: at most one extra ``in^2``
    matrix exists at a time, whoever else holds ``h``."""
    perm = act_order(h)
    h = h.detach()
    if h.dtype != torch.float32:
        raise PassError(f"round_gptq: the Hessian must be float32, got {h.dtype}")
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.copy_(h.index_select(0, perm))
    h.copy_(h.index_select(1, perm))
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky(h, upper=True, out=h)
    return perm, h


def gptq_rows(wp: torch.Tensor, hinv: torch.Tensor, round_col: RoundCol, block: int = 128,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ's loop over ``wp`` [rows, n] (float32, columns already in the rounding order; written
    in place) against ``hinv`` (`prepare`); ``round_col(column, i)`` rounds the i-th column of that
    order and returns (codes, their values). Returns the codes in that order, as ``dtype`` (int8
    holds every code exactly, in a quarter of the memory)."""
    codes = torch.zeros(wp.shape, dtype=dtype, device=wp.device)
    n = wp.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err = wp[:, i1:i2].clone(), torch.zeros(wp.shape[0], i2 - i1, device=wp.device)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q, value = round_col(col, i1 + i)
            codes[:, i1 + i] = q
            e = (col - value) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        wp[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1)  # in place: no [rows, n] product
    return codes


def _int8_pins(wf: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's max-|w| column, its RTN code) for float32 rows ``wf`` on their ``scale``."""
    col = wf.abs().argmax(1)
    return col, torch.round(wf.gather(1, col[:, None]).squeeze(1) / scale).clamp(-INT8_MAX, INT8_MAX)


def _int8_round_col(scale: torch.Tensor, pins: tuple[torch.Tensor, torch.Tensor], perm: torch.Tensor,
                    cols: tuple[int, int]) -> RoundCol:
    """Round-to-nearest on the per-row ``scale``, except each row's max-|w| element (`_int8_pins`;
    if it lies in ``cols``), which keeps its RTN code (+-127): the codes' largest magnitude matches the scale."""
    a, b = cols
    inv = torch.argsort(perm)
    amax_col, pin_code = pins
    inside = (amax_col >= a) & (amax_col < b)
    pin_col = torch.where(inside, inv[(amax_col - a).clamp(0, b - a - 1)], -1)

    def round_col(col: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(col / scale).clamp(-INT8_MAX, INT8_MAX)
        pinned = pin_col == i
        q[pinned] = pin_code[pinned]
        return q, q * scale
    return round_col


def _grid_round_col(step: torch.Tensor, offset: torch.Tensor, codes: tuple[int, int]) -> RoundCol:
    """Nearest code on a fixed grid (columns of ``step`` / ``offset`` in the rounding order)."""
    lo, hi = codes

    def round_col(col: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, o = step[:, i], offset[:, i]
        q = torch.where(s != 0, torch.round((col + o) / torch.where(s != 0, s, 1.0)), 0.0).clamp(lo, hi)
        return q, s * q - o
    return round_col


def gptq_codes(w: torch.Tensor, h: torch.Tensor, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """int8 codes of ``w`` [out, in] on the RTN per-row scale, GPTQ-rounded against Hessian ``h`` [in, in]."""
    wf = w.detach().float()
    _, scale = quantize_weight_per_channel(wf)
    perm, hinv = prepare(h.detach().float().clone(), damp)
    round_col = _int8_round_col(scale, _int8_pins(wf, scale), perm, (0, wf.shape[1]))
    return gptq_rows(wf[:, perm], hinv, round_col, block)[:, torch.argsort(perm)].to(torch.int8)


def gptq_grid_codes(w: torch.Tensor, h: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, codes: tuple[int, int],
                    damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Codes of ``w`` [out, in] on a fixed grid (code q of weight (o, k) stands for ``step[o, k] * q -
    offset[o, k]``, codes in ``codes = (lo, hi)``), GPTQ-rounded against Hessian ``h`` [in, in].
    Returns float32 codes; where ``step`` is 0 every code means ``-offset``, and the code is 0.

    Example (a GGUF weight, `fxquant.codecs`)::

        g = codecs.grid(codecs.quantize(w, "q4_k"), "q4_k")
        step, offset = map(torch.from_numpy, codecs.grid_values(g, "q4_k", w.shape[1]))
        q = gptq_grid_codes(w, x.T @ x, step, offset, codecs.code_range("q4_k"))
    """
    wf = w.detach().float()
    perm, hinv = prepare(h.detach().float().clone(), damp)
    round_col = _grid_round_col(step[:, perm].float(), offset[:, perm].float(), codes)
    return gptq_rows(wf[:, perm], hinv, round_col, block)[:, torch.argsort(perm)]


def column_groups(n: int, budget: int) -> list[tuple[int, int]]:
    """Column ranges of an ``n``-input weight whose float32 Hessian blocks fit ``budget`` twice
    (the block and the one extra copy `prepare` makes): ``[(0, n)]`` when the whole Hessian does."""
    widest = max(1, math.isqrt(budget // 8))
    k = -(-n // widest)
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


Unit = tuple[tuple[fx.Node, ...], int, int]  # (the inputs whose X^T X add up, first column, end column)


@dataclass
class _Weight:
    """One weight being rounded: its readers, scheme, Hessian units, and the codes so far."""

    target: str
    nodes: list[fx.Node]
    scheme: Scheme
    units: list[Unit]
    left: int = 0
    in_place: bool = False  # codes written into the float weight's own memory (RoundGPTQ's in_place)
    codes: Optional[torch.Tensor] = None
    extra: Any = field(default=None, repr=False)  # W8A8: (row scales, pinned columns, their codes); GGUF: the grid


class RoundGPTQ(FxquantPass):
    """Replace the float weight of every linear selected W8A8, Q4_K or Q8_0 by its GPTQ codes (module doc).

    Args:
        calibration: the example inputs (as given to ``compile``).
        damp: Hessian damping, a fraction of the mean diagonal (> 0).
        hessian_bytes: memory for the Hessians held at once, the inversion's extra copy included;
            0 (default): a twentieth of the module's float parameter and buffer bytes, at least 64 MiB.
            A weight whose own Hessian does not fit is rounded in column groups that do.
        in_place: the module owns its weights (``compile(consume=True)``): a float weight that
            nothing else holds or reads gets its codes written into its own columns as they are
            rounded, and becomes its int8 codes in its own memory (`_compact`), so its codes and
            its float values never take memory side by side. Same codes.
        frontier_bytes: memory for the calibration inputs' cached settled values, from which later
            Hessian forwards start (`fxquant.frontier`); None (default): half the Hessian budget
            (by default a fortieth of the model, from the forwards' half of the 10 %); 0: none
            (every forward starts at the graph inputs). Same codes either way.

    Raises:
        PassError: no ``selection`` (run select_schemes first), GGUF codes that do not decode to
            GPTQ's values, or one weight read by linears of different schemes. Linears already
            lowered or rounded are declined (a second run changes nothing).
        CalibrationError: no calibration inputs.
    """

    name = "round_gptq"

    def __init__(self, calibration: Optional[Sequence[Any]], damp: float = 0.01, hessian_bytes: int = 0,
                 in_place: bool = False, frontier_bytes: Optional[int] = None) -> None:
        if not calibration:
            raise CalibrationError(f"{self.name}: needs at least one calibration input, got {calibration!r}")
        if not damp > 0:
            raise PassError(f"{self.name}: damp must be > 0, got {damp!r}")
        if not is_int(hessian_bytes):
            raise PassError(f"{self.name}: hessian_bytes must be an integer >= 0 (0: automatic), got {hessian_bytes!r}")
        if frontier_bytes is not None and not is_int(frontier_bytes):
            raise PassError(f"{self.name}: frontier_bytes must be an integer >= 0 or None (automatic), got {frontier_bytes!r}")
        self.calibration, self.damp, self.hessian_bytes, self.in_place = calibration, float(damp), hessian_bytes, in_place
        self.frontier_bytes = frontier_bytes
        self.forwards, self.seconds, self.budget, self.computed, self.cached, self.frontier_peak = 0, 0.0, 0, 0, 0, 0
        self.left_out = 0

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "selection", before="select_schemes")

    def call(self, gm: fx.GraphModule) -> PassResult:
        t0 = time.perf_counter()
        self.budget = self.hessian_bytes or max(MIN_BUDGET, _float_bytes(gm) // BUDGET_DIVISOR)
        weights = self._weights(gm)
        if not weights:
            return PassResult(gm, False)
        self.forwards, done = 0, set()
        front = frontier.Frontier(gm, len(self.calibration),
                                  self.budget // FRONTIER_SHARE if self.frontier_bytes is None else self.frontier_bytes)
        for chunk in self._chunks(weights):
            front.settle({n for w in weights if not set(w.units) <= done for n in w.nodes})
            hess = self._hessians(gm, chunk, front)
            done.update(chunk)
            for unit in chunk:
                perm, hinv = prepare(hess.pop(unit), self.damp)
                for w in weights:
                    if unit in w.units:
                        self._round(gm, w, unit, perm, hinv)
                del hinv
                memory.trim()
        graph.finalize(gm)
        self.seconds = time.perf_counter() - t0
        self.computed, self.cached, self.frontier_peak = front.computed, front.started, front.peak
        self.left_out = front.left_out
        log.info("%s: %d weights, %d forward passes (%d from cached values, at most %.1f MB, %d left out; %d nodes "
                 "computed) in %.1f s (Hessians within %.1f MB)", self.name, len(weights), self.forwards, front.started,
                 front.peak / 1e6, front.left_out, front.computed, self.seconds, self.budget / 1e6)
        return PassResult(gm, True)

    @staticmethod
    def _owns(rec: meta.LinearRecord) -> bool:
        """W8A8 linears; GGUF ones whose width fits the block (lower_gguf refuses the others); none
        already rounded."""
        scheme = rec.selection.scheme
        if rec.rounding is not None:
            return False
        if scheme is Scheme.W8A8:
            return True
        return scheme.value in codecs.BLOCKS and rec.in_features % codecs.BLOCKS[scheme.value][0] == 0

    def _weights(self, gm: fx.GraphModule) -> list[_Weight]:
        """The weights to round, in graph order, each with its Hessian units (column groups, module doc)."""
        users: dict[str, list[fx.Node]] = {}
        for node, rec in meta.records(gm):
            if graph.is_linear(node) and self._owns(rec):  # a rounded weight's readers have a rounding record
                users.setdefault(str(graph.param_root(node.args[1]).target), []).append(node)
        out = []
        for target, nodes in users.items():
            schemes = {meta.get(n).selection.scheme for n in nodes}
            if len(schemes) > 1:
                raise PassError(f"{self.name}: {target}: one weight, read by linears selected "
                                f"{sorted(s.value for s in schemes)}; GPTQ rounds a weight for one scheme")
            n_in = meta.get(nodes[0]).in_features
            groups = column_groups(n_in, self.budget)
            inputs = tuple(dict.fromkeys(n.args[0] for n in nodes))
            out.append(_Weight(target, nodes, schemes.pop(), [(inputs, a, b) for a, b in groups], len(groups),
                               self.in_place and _sole_holder(gm, nodes)))
            if len(groups) > 1:
                log.info("%s: %s: its Hessian (%.1f MB float32) does not fit hessian_bytes=%d twice; GPTQ in %d column "
                         "groups (recipe.gptq_hessian_bytes)", self.name, target, 4 * n_in ** 2 / 1e6, self.budget,
                         len(groups))
        return out

    def _chunks(self, weights: list[_Weight]) -> list[list[Unit]]:
        """The Hessian units in order, grouped so that each group's Hessians plus the largest one's
        extra copy fit the budget (a unit alone always does: `column_groups`)."""
        units = list(dict.fromkeys(u for w in weights for u in w.units))
        # a weight rounded in column groups ends its chunk: later forwards see it rounded, and (in
        # place) none runs its linear while its earlier groups' columns hold codes (a forward stops
        # at its chunk's inputs). In place or not, the same chunks: the same codes.
        ends = {w.units[-1] for w in weights if len(w.units) > 1}
        chunks: list[list[Unit]] = [[]]
        for u in units:
            sizes = [_unit_bytes(v) for v in chunks[-1] + [u]]
            if chunks[-1] and (sum(sizes) + max(sizes) > self.budget or chunks[-1][-1] in ends):
                chunks.append([])
            chunks[-1].append(u)
        return chunks

    def _hessians(self, gm: fx.GraphModule, chunk: list[Unit], front: frontier.Frontier) -> dict[Unit, torch.Tensor]:
        """X^T X of each unit over every calibration input (one forward each, from the input's
        cached settled values where `fxquant.frontier` has them, and only as far as the chunk's
        inputs; the input's rows are taken a slice at a time, so no float32 copy of a whole activation)."""
        hess: dict[Unit, torch.Tensor] = {}
        wanted: dict[fx.Node, list[Unit]] = {}
        for u in chunk:
            for x in u[0]:
                wanted.setdefault(x, []).append(u)

        def add(x_node: fx.Node, x: torch.Tensor) -> None:
            x2d = x.detach().reshape(-1, x.shape[-1])
            step = max(1, ROW_SLICE // x2d.shape[1])
            for r in range(0, x2d.shape[0], step):
                xs = x2d[r:r + step].float()
                for u in wanted[x_node]:
                    part = xs[:, u[1]:u[2]]
                    if u in hess:
                        hess[u].addmm_(part.T, part)  # in place: no second matrix per call
                    else:
                        hess[u] = part.T @ part

        watch = graph.Watch(gm, set(wanted), add, by_rows=True)  # no copy of a folded or rounded weight
        for i, ex in enumerate(self.calibration):
            with torch.no_grad():
                front.run(watch, i, graph.graph_inputs(gm, ex, f"calibration[{i}]", self.name), set(wanted), add)
            self.forwards += 1
        return hess

    def _round(self, gm: fx.GraphModule, w: _Weight, unit: Unit, perm: torch.Tensor, hinv: torch.Tensor) -> None:
        """GPTQ codes of one column group of ``w``, a slice of rows of that group at a time; the
        weight is rewritten once its last group is done. What the groups share is taken from the
        whole rows first: W8A8's row scales and pinned codes, or GGUF's block headers."""
        node, (_, a, b) = w.nodes[0], unit
        n_in, inv, done = meta.get(node).in_features, torch.argsort(perm), 0
        if w.scheme is Scheme.W8A8:
            if w.extra is None:
                def pins(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    wf = rows.float()
                    scale = quantize_weight_per_channel(wf)[1]
                    return (scale, *_int8_pins(wf, scale))
                w.extra = graph.weight_rows(gm, node, pins)

            def fn(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
                nonlocal done
                scale, col, code = (t[done:done + rows.shape[0]] for t in w.extra)
                done += rows.shape[0]
                q = gptq_rows(rows[:, perm].float(), hinv, _int8_round_col(scale, (col, code), perm, (a, b)),
                              dtype=torch.int8)
                return (q[:, inv],)
        else:
            qtype = w.scheme.value
            if w.extra is None:  # the reference encoder's block headers, from the weight before rounding
                w.extra = graph.weight_rows(gm, node, lambda rows: (
                    torch.from_numpy(codecs.grid(codecs.quantize(rows.detach().float().cpu().numpy(), qtype), qtype)),))[0]
            per = codecs.BLOCKS[qtype][0]
            head = w.extra.shape[1] // (n_in // per)
            a0, b0 = a // per * per, -(-b // per) * per  # the whole blocks around the group

            def fn(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
                nonlocal done
                g = w.extra[done:done + rows.shape[0], a0 // per * head:b0 // per * head].numpy()
                done += rows.shape[0]
                step, offset = (torch.from_numpy(v[:, a - a0:b - a0]).to(rows.device) for v in codecs.grid_values(g, qtype, b0 - a0))
                round_col = _grid_round_col(step[:, perm], offset[:, perm], codecs.code_range(qtype))
                return (gptq_rows(rows[:, perm].float(), hinv, round_col, dtype=torch.int8)[:, inv],)
        _into_columns(gm, w, fn, (a, b))
        w.left -= 1
        if not w.left:
            if w.in_place:
                w.codes = _compact(graph.root_weight(gm, node))
            if w.scheme is Scheme.W8A8:
                w.extra = w.extra[0]  # the row scales
            self._rewrite(gm, w)

    def _rewrite(self, gm: fx.GraphModule, w: _Weight) -> None:
        """Make every reader of ``w`` read its codes through ``fxquant::dequantize_*``; the float
        weight (and its fold chain) leaves the module."""
        node = w.nodes[0]
        dtype, prefix = graph.root_weight(gm, node).dtype, w.target.removesuffix(".weight")
        if w.scheme is Scheme.W8A8:
            buffers = {f"{prefix}.weight_int8": w.codes, f"{prefix}.weight_scale": w.extra}
            op, extra = graph.DEQUANTIZE_INT8, (dtype,)
        else:
            qtype = w.scheme.value
            buffers = {f"{prefix}.qweight": self._gguf_bytes(w, qtype)}
            op, extra = graph.DEQUANTIZE_GGUF, (qtype, w.codes.shape[1], dtype)
        for name, t in buffers.items():
            graph.set_buffer(gm, name, t)
        for n in w.nodes:
            graph.set_weight_op(gm, n, op, (*(graph.get_attr_node(gm, name, n) for name in buffers), *extra))
            meta.update(n, rounding=meta.Rounding("gptq", self.damp, len(w.units)))
        w.codes = w.extra = None

    def _gguf_bytes(self, w: _Weight, qtype: str) -> torch.Tensor:
        """GPTQ's codes on the grid, encoded (`codecs.quantize_on_grid`), a slice of rows at a time;
        checked to decode to the values ``step * q - offset`` bit for bit."""
        out, cols = w.codes.shape
        parts = []
        step_rows = max(1, ROUND_SLICE // cols)
        for i in range(0, out, step_rows):
            g = w.extra[i:i + step_rows].numpy()
            step, offset = codecs.grid_values(g, qtype, cols)
            values = step * w.codes[i:i + step_rows].cpu().numpy().astype(np.float32) - offset  # float32, rounded once
            data = codecs.quantize_on_grid(values, g, qtype)
            got = codecs.dequantize(data, qtype).numpy()
            if not np.array_equal(got, values):
                raise PassError(f"{self.name}: {w.target}: {int((got != values).sum())} of the {qtype} GPTQ values do not "
                                "encode back to their codes on the fixed grid")
            parts.append(torch.from_numpy(data))
        return torch.cat(parts).to(w.codes.device)


def _into_columns(gm: fx.GraphModule, w: _Weight, fn: Callable[[torch.Tensor], tuple[torch.Tensor]],
                  cols: tuple[int, int]) -> None:
    """``fn`` (a slice of ``w``'s rows, of columns ``cols`` -> their codes) over the whole weight, each
    slice's codes written straight into those columns: of the float weight itself (``in_place``;
    exact: small integers) or of the weight's int8 codes, never into a group-sized copy first."""
    node, (a, b), at = w.nodes[0], cols, 0
    if w.in_place:
        dest = graph.root_weight(gm, node)
    else:
        if w.codes is None:
            root = graph.root_weight(gm, node)
            w.codes = torch.empty(root.shape, dtype=torch.int8, device=root.device)
        dest = w.codes

    def write(rows: torch.Tensor) -> tuple[()]:
        nonlocal at
        q = fn(rows)[0]
        dest[at:at + q.shape[0], a:b] = q
        at += q.shape[0]
        return ()
    graph.weight_rows(gm, node, write, slice_elems=ROUND_SLICE, cols=cols)


def _sole_holder(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    """Whether the float weight under ``nodes`` may take its codes in place: a contiguous CPU
    parameter of >= 2 bytes per element that no other tensor, name or Python reference holds, read
    by ``nodes`` alone (directly or through ``fxquant::scale_param`` folds)."""
    root = graph.param_root(nodes[0].args[1])
    if root.op != "get_attr" or sum(n.op == "get_attr" and n.target == root.target for n in gm.graph.nodes) != 1:
        return False
    todo = [root]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u.op == "call_function" and u.target is graph.SCALE_PARAM and u.args[0] is n:
                todo.append(u)
            elif not (u in nodes and u.args[1] is n):
                return False
    t = graph.get_attr(gm, str(root.target))
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if not (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point() and t.element_size() >= 2
            and t.dim() == 2 and t.is_contiguous() and t.storage_offset() == 0 and use_count is not None
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()):
        return False
    # references: the owning module's dict, ``t``, getrefcount's argument; the storage: ``t`` and
    # the storage object asked
    return sys.getrefcount(t) <= 3 and use_count(t.untyped_storage()._cdata) <= 2


def _compact(w: torch.Tensor) -> torch.Tensor:
    """The int8 codes [out, in] held as float values by ``w`` (`RoundGPTQ` ``in_place``), made in
    ``w``'s own memory: row slices in order, each converted, then written over the bytes of rows
    already read (slice i's bytes end at ``end * in`` <= where the rows after it start, ``end * in
    * element_size``). The pages past the codes go back to the OS (`memory.release`), then the
    codes are copied out: at most ``w``'s own bytes in use, never ``w`` and its codes side by side."""
    out, n = w.shape
    flat = w.detach().view(torch.int8).view(-1)
    step = max(1, ROUND_SLICE // n)
    for i in range(0, out, step):
        j = min(out, i + step)
        flat[i * n:j * n] = w[i:j].to(torch.int8).reshape(-1)
    memory.release(flat[out * n:])
    return flat[:out * n].view(out, n).clone()


def _unit_bytes(u: Unit) -> int:
    return 4 * (u[2] - u[1]) ** 2


def _float_bytes(gm: fx.GraphModule) -> int:
    """The float parameter and buffer bytes of ``gm`` (each tensor once)."""
    seen: dict[int, int] = {}
    for t in [*gm.parameters(), *gm.buffers()]:
        if t.is_floating_point():
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
