"""round_gptq: GPTQ rounding for the weights ``lower_w8a8`` and ``lower_gguf`` will quantize
(new weight constants only).

    before:  y = aten.linear(x, get_attr[l.weight])     W, float
    after:   y = aten.linear(x, get_attr[l.weight])     W' = q * s (w8a8) or step * q - offset (q4_k, q8_0)

``s`` is the per-output-channel scale the lowering computes anyway (``max_k |W[o, k]| / 127``,
`fxquant.ops.w8a8.quantize_weight_per_channel`); only the rounding changes. The codes ``q`` come
from GPTQ (Frantar et al., 2023): columns in decreasing order of the calibration Hessian's
diagonal ("act order"), each column rounded and its error spread over the columns not yet
rounded through the inverse Hessian ``H = X^T X + damp * mean(diag H) * I`` of the linear's input
``X`` on the calibration inputs (after smoothing: the pass runs after ``fold_smoothing``).

How the codes reach the lowering exactly: the lowering stays the only rewriter into
``fxquant::linear_w8a8`` and re-quantizes ``W'`` with round-to-nearest. Each row's scale is pinned
by its largest element: the code at the row's max-|W| position is forced to its RTN code (+-127;
GPTQ compensates that choice like any other), and every element with code +-127 is stored as the
row's original max |W| itself, so ``max_k |W'[o, k]|`` and therefore ``s`` are bit-identical to the
RTN scale. Every other element is ``fl(q * s)`` with ``|q| <= 126``, whose relative rounding error
(at most 2^-8 in bfloat16) moves ``q`` by less than 0.5: RTN gives back exactly ``q``. The pass
checks it per weight (``PassError`` otherwise).

GGUF (``q4_k``, ``q8_0``): the grid is the block headers llama.cpp's reference encoder computes
from ``W`` (`fxquant.codecs.grid`: Q8_0's fp16 ``d`` per 32 weights; Q4_K's ``d``, ``dmin`` and
6-bit scales and mins per 256), fixed; a code q of weight (o, k) stands for ``step * q - offset``
(`fxquant.codecs.grid_values`), and GPTQ chooses q in the encoder's range (-127..127, 0..15) the
same way. ``W'`` is those values in W's dtype, and the record's ``rounding`` carries the grid to
``lower_gguf``, which encodes ``W'`` on it (`fxquant.codecs.quantize_on_grid`, nearest code); the
pass checks per weight that those bytes decode to GPTQ's float32 values bit for bit. In bfloat16, storing a value moves it by at most 2^-9 of its magnitude, less than half
a step for any value within 256 steps of 0: every Q8_0 value (|q| <= 127), and Q4_K values unless a
sub-block's min lies hundreds of its own steps below zero (a tight cluster of same-signed weights),
the one case where they do not survive: that weight keeps round-to-nearest (logged, its record
says ``rounding: rtn``), the others are rounded as usual. The bytes are valid GGUF blocks: the headers are the reference encoder's,
only the codes differ. A linear already rounded (``rounding`` set) is declined.

Memory: one Hessian per distinct input (q/k/v share one), ``in_features^2`` float32 each
(12288^2 = 600 MB for Ideogram 4's w2). Inputs are processed in chunks whose Hessians fit
``hessian_bytes``; each chunk costs one forward pass per calibration input, and its Hessians are
freed before the next chunk. A weight whose own Hessian exceeds ``hessian_bytes`` is not rounded
by GPTQ: it keeps the lowering's round-to-nearest, its record says ``rounding: rtn`` and the pass
logs it (Ideogram 4's ``llm_cond_proj``, 53248 inputs: an 11.3 GB Hessian, about 45 GB while
rounded, would not fit the 24 GB machine a branch otherwise compiles on).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from .. import codecs, graph, meta
from ..errors import CalibrationError, PassError
from ..ops.w8a8 import INT8_MAX, quantize_weight_per_channel
from ..schemes import Scheme
from .base import FxquantPass, PassResult, require_records

log = logging.getLogger("fxquant")


def act_order(h: torch.Tensor) -> torch.Tensor:
    """The column order GPTQ rounds in: decreasing Hessian diagonal (a dead input counts 1)."""
    d = torch.diagonal(h.detach().float())
    return torch.argsort(torch.where(d > 0, d, 1.0), descending=True, stable=True)


def _gptq(w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor, damp: float, block: int,
          round_col: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """GPTQ's loop over ``w`` [out, in] in the column order ``perm``; ``round_col(column, i)`` rounds
    the i-th column *of that order* and returns (codes, their values). Returns codes in that order."""
    # Memory: at most two in^2 float32 matrices at a time besides the caller's (604 MB each for a
    # 12288-wide input): each step frees the one before it.
    h = h.detach().float().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    wp, hp = w[:, perm].clone(), h.index_select(0, perm)
    del h
    hp = hp.index_select(1, perm)
    torch.diagonal(hp).add_(damp * torch.diagonal(hp).mean())
    hinv = torch.linalg.cholesky(hp)
    del hp
    hinv = torch.cholesky_inverse(hinv)
    hinv = torch.linalg.cholesky(hinv, upper=True)
    codes = torch.zeros_like(wp)
    n = wp.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err = wp[:, i1:i2].clone(), torch.zeros(wp.shape[0], i2 - i1, device=w.device)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q, value = round_col(col, i1 + i)
            codes[:, i1 + i] = q
            e = (col - value) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        wp[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes


def gptq_codes(w: torch.Tensor, h: torch.Tensor, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """int8 codes of ``w`` [out, in] on the RTN per-row scale, GPTQ-rounded against Hessian ``h`` [in, in].

    The code at each row's max-|w| position is its RTN code (pins the scale, see module doc).
    """
    w = w.detach().float()
    q_rtn, scale = quantize_weight_per_channel(w)
    perm = act_order(h)
    inv = torch.argsort(perm)
    pin_col = inv[w.abs().argmax(1)]  # each row's max-|w| column, in act order
    pin_code = q_rtn.gather(1, w.abs().argmax(1, keepdim=True)).squeeze(1).float()

    def round_col(col: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(col / scale).clamp(-INT8_MAX, INT8_MAX)
        pinned = pin_col == i
        q[pinned] = pin_code[pinned]
        return q, q * scale

    return _gptq(w, h, perm, damp, block, round_col)[:, inv].to(torch.int8)


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
    w = w.detach().float()
    perm = act_order(h)
    sp, op = step[:, perm].float(), offset[:, perm].float()
    lo, hi = codes

    def round_col(col: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, o = sp[:, i], op[:, i]
        q = torch.where(s != 0, torch.round((col + o) / torch.where(s != 0, s, 1.0)), 0.0).clamp(lo, hi)
        return q, s * q - o

    return _gptq(w, h, perm, damp, block, round_col)[:, torch.argsort(perm)]


def pinned_weight(w: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``codes * s`` in ``w``'s dtype, with code +-127 stored as the row's max |w| (see module doc)."""
    wf = w.detach().float()
    _, scale = quantize_weight_per_channel(wf)
    amax = w.detach().abs().amax(1, keepdim=True).float()
    c = codes.float()
    return torch.where(c.abs() == INT8_MAX, torch.sign(c) * amax, c * scale[:, None]).to(w.dtype)


class _NotRepresentable(PassError):
    """GPTQ's values for one weight do not survive storage in its dtype (module doc): that weight
    keeps round-to-nearest."""


def _keep_rtn(nodes: list[fx.Node]) -> None:
    for n in nodes:
        meta.update(n, rounding=meta.Rounding("rtn", 0.0))


class RoundGPTQ(FxquantPass):
    """Replace the float weight of every linear selected W8A8, Q4_K or Q8_0 by its GPTQ weight (module doc).

    Args:
        calibration: the example inputs (as given to ``compile``).
        damp: Hessian damping, a fraction of the mean diagonal (> 0).
        hessian_bytes: memory for the Hessians held at once (float32 ``in^2`` per distinct input); a
            weight whose own Hessian is larger keeps round-to-nearest (``rounding: rtn``).

    Raises:
        PassError: no ``selection`` (run select_schemes first), the new weight does not give back
            the GPTQ codes, or one weight is read by linears of different schemes. Linears already
            lowered or rounded are declined (a second run changes nothing).
        CalibrationError: no calibration inputs.
    """

    name = "round_gptq"

    def __init__(self, calibration: Optional[Sequence[Any]], damp: float = 0.01, hessian_bytes: int = 2 << 30) -> None:
        if not calibration:
            raise CalibrationError(f"{self.name}: needs at least one calibration input, got {calibration!r}")
        if not damp > 0:
            raise PassError(f"{self.name}: damp must be > 0, got {damp!r}")
        self.calibration, self.damp, self.hessian_bytes = calibration, float(damp), int(hessian_bytes)
        self.forwards, self.seconds = 0, 0.0

    def requires(self, gm: fx.GraphModule) -> None:
        require_records(gm, self.name, "selection", before="select_schemes")

    def call(self, gm: fx.GraphModule) -> PassResult:
        t0 = time.perf_counter()
        users: dict[str, list[fx.Node]] = {}  # weight target -> the quantized linear nodes reading it
        for node, rec in meta.records(gm):
            if graph.is_linear(node) and self._owns(rec):  # lowered nodes are declined
                users.setdefault(str(graph.param_root(node.args[1]).target), []).append(node)
        modified = self._too_wide(users)
        if not users:
            return PassResult(gm, modified)
        self.forwards = 0
        for chunk in self._chunks(users):
            hess = self._hessians(gm, {x for t in chunk for n in users[t] for x in [n.args[0]]})
            for target in chunk:
                nodes = users[target]
                schemes = {meta.get(n).selection.scheme for n in nodes}
                if len(schemes) > 1:
                    raise PassError(f"{self.name}: {target}: one weight, read by linears selected "
                                    f"{sorted(s.value for s in schemes)}; GPTQ rounds a weight for one scheme")
                w = graph.weight(gm, nodes[0])  # with fold_smoothing's column scaling
                h = (hess[nodes[0].args[0]] if len(nodes) == 1 else sum(hess[n.args[0]] for n in nodes)).to(w.device)
                scheme = schemes.pop()
                try:
                    new, rounding = (self._int8(target, w, h), None) if scheme is Scheme.W8A8 else \
                        self._on_grid(target, w, h, scheme.value)
                except _NotRepresentable as e:
                    _keep_rtn(nodes)
                    log.warning("%s: %s keeps round-to-nearest: %s", self.name, target, e)
                    modified = True
                    continue
                if not torch.equal(new, w):  # W8A8: a second run finds the codes already there
                    for n in nodes:
                        graph.set_weight(gm, n, new)
                    modified = True
                if rounding is not None:
                    for n in nodes:
                        meta.update(n, rounding=rounding)
                    modified = True
            del hess
        self.seconds = time.perf_counter() - t0
        log.info("%s: %d weights, %d forward passes in %.1f s", self.name, len(users), self.forwards, self.seconds)
        return PassResult(gm, modified)

    @staticmethod
    def _owns(rec: meta.LinearRecord) -> bool:
        """W8A8 linears; GGUF ones whose width fits the block (lower_gguf refuses the others); none
        with a rounding record (already rounded, or left to round-to-nearest)."""
        scheme = rec.selection.scheme
        if rec.rounding is not None:
            return False
        if scheme is Scheme.W8A8:
            return True
        return scheme.value in codecs.BLOCKS and rec.in_features % codecs.BLOCKS[scheme.value][0] == 0

    def _too_wide(self, users: dict[str, list[fx.Node]]) -> bool:
        """Leave the weights whose own Hessian exceeds ``hessian_bytes`` to round-to-nearest
        (removed from ``users``, recorded as ``rounding: rtn``); True if there were any."""
        def need(nodes: list[fx.Node]) -> int:  # one Hessian per distinct input of the weight's readers
            return sum(4 * meta.get(n).in_features ** 2 for n in {n.args[0]: n for n in nodes}.values())

        sizes = {t: need(nodes) for t, nodes in users.items()}
        wide = {t: nbytes for t, nbytes in sizes.items() if nbytes > self.hessian_bytes}
        for target, nbytes in wide.items():
            _keep_rtn(users.pop(target))
            log.warning("%s: %s keeps round-to-nearest: its Hessian (%.2f GB float32) is over hessian_bytes=%d "
                        "(recipe.gptq_hessian_bytes)", self.name, target, nbytes / 1e9, self.hessian_bytes)
        return bool(wide)

    def _int8(self, target: str, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        codes = gptq_codes(w, h, self.damp)
        new = pinned_weight(w, codes)
        got, _ = quantize_weight_per_channel(new)
        if not torch.equal(got, codes):
            raise PassError(f"{self.name}: {target}: the pinned weight does not give back the GPTQ codes")
        return new

    def _on_grid(self, target: str, w: torch.Tensor, h: torch.Tensor, qtype: str) -> tuple[torch.Tensor, meta.Rounding]:
        """GPTQ's values on the grid the reference encoder computes from ``w`` (module doc)."""
        g = codecs.grid(codecs.quantize(w.detach().float().cpu(), qtype), qtype)
        step, offset = (torch.from_numpy(a).to(w.device) for a in codecs.grid_values(g, qtype, w.shape[1]))
        codes = gptq_grid_codes(w, h, step, offset, codecs.code_range(qtype), self.damp)
        values = step * codes - offset  # float32, rounded once: what the decoder computes
        new = values.to(w.dtype)
        got = codecs.dequantize(codecs.quantize_on_grid(new.float().cpu(), g, qtype), qtype).to(w.device)
        if not torch.equal(got, values):
            bad = int((got != values).sum())
            raise _NotRepresentable(f"{self.name}: {target}: {bad} of the {qtype} GPTQ values stored as {w.dtype} do not "
                            f"encode back to their codes on the fixed grid")
        return new, meta.Rounding("gptq", self.damp, torch.from_numpy(g))

    def _chunks(self, users: dict[str, list[fx.Node]]) -> list[list[str]]:
        """Weight targets grouped so that the Hessians of their distinct inputs fit ``hessian_bytes``
        (a weight whose own inputs exceed it gets a chunk alone)."""
        width = {n.args[0]: meta.get(n).in_features for nodes in users.values() for n in nodes}
        chunks: list[list[str]] = [[]]
        held: set[fx.Node] = set()
        for target, nodes in users.items():
            xs = {n.args[0] for n in nodes}
            if chunks[-1] and sum(4 * width[x] ** 2 for x in held | xs) > self.hessian_bytes:
                chunks.append([])
                held = set()
            chunks[-1].append(target)
            held |= xs
        return chunks

    def _hessians(self, gm: fx.GraphModule, inputs: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        """X^T X of each input node over every calibration input (one forward each)."""
        hess: dict[fx.Node, torch.Tensor] = {}

        def add(x_node: fx.Node, x: torch.Tensor) -> None:
            x2d = x.detach().reshape(-1, x.shape[-1]).float()
            if x_node in hess:
                hess[x_node].addmm_(x2d.T, x2d)  # in place: no second in^2 matrix per call
            else:
                hess[x_node] = x2d.T @ x2d

        watch = graph.Watch(gm, inputs, add)
        for i, ex in enumerate(self.calibration):
            with torch.no_grad():
                watch.run(*graph.graph_inputs(gm, ex, f"calibration[{i}]", self.name))
            self.forwards += 1
        return hess

