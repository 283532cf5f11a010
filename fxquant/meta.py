"""The metadata contract between passes.

Every linear node carries one typed, frozen `LinearRecord` at ``node.meta["fxquant"]``.
Each field is written by exactly one pass (named beside it); passes read what earlier
passes wrote and never call each other. The record's JSON form is mirrored into
``node.meta["custom"]["fxquant"]``, the only node metadata that survives
``torch.export.save`` / ``load`` and re-export.

The GraphModule carries one `GraphRecord` at ``gm.meta["fxquant"]``.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx

from .schemes import DecidedBy, Scheme, SelectionKind, SmoothingTarget

KEY = "fxquant"


class StepStats(NamedTuple):
    """Statistics of one linear's input at one timestep (JSON: a 4-element list, in this order)."""

    timestep: float
    max_abs: float
    std: float
    kurtosis: float


@dataclass(frozen=True)
class ActStats:
    """Input-activation statistics of one linear (written by ``collect_stats``).

    ``per_step`` holds one `StepStats` ``(timestep, max_abs, std, kurtosis)`` per distinct timestep, in
    denoising order (the order the timesteps first appear in the calibration inputs);
    ``std`` is the population std and ``kurtosis`` Pearson's (m4 / m2**2, 3 for a Gaussian).
    ``channel_max_abs`` is the per-input-channel max |x| over all calibration tokens
    (float32, shape [in_features]) that SmoothQuant needs.
    """

    max_abs: float
    std: float
    kurtosis: float
    count: int
    per_step: tuple[StepStats, ...] = ()
    channel_max_abs: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "std": self.std, "kurtosis": self.kurtosis, "count": self.count,
                "per_step": [list(s) for s in self.per_step]}


@dataclass(frozen=True)
class Fragility:
    """Written by ``score_fragility``: the score and its rank (1 = most fragile), and the ranks
    by the early and late halves of the trajectory (None with fewer than two timesteps)."""

    score: float
    rank: int
    early_rank: Optional[int] = None
    late_rank: Optional[int] = None


@dataclass(frozen=True)
class Sensitivity:
    """Written by ``score_sensitivity``: the relative L2 error of the model's output with only this
    linear quantized (``error``), its rank (1 = most sensitive), and the cheap one-forward proxy
    ``local`` (the relative error of this linear's own output)."""

    error: float
    rank: int
    local: float = 0.0


@dataclass(frozen=True)
class Selection:
    """Written by ``select_schemes``: the linear's scheme, whether it is quantized, protected or
    skipped, why (``reason``, shown by `fxquant.summary`) and what decided it."""

    kind: SelectionKind
    scheme: Scheme
    reason: str = ""
    by: DecidedBy = DecidedBy.DEFAULT

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SelectionKind(self.kind))
        object.__setattr__(self, "scheme", Scheme(self.scheme))
        object.__setattr__(self, "by", DecidedBy(self.by))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "scheme": self.scheme.value, "reason": self.reason, "by": self.by.value}


@dataclass(frozen=True)
class Smoothing:
    """Written by ``fold_smoothing``: where the linear's smoothing vector went.

    ``vector`` is s itself (float32 [in_features]) for the folded targets (NORM, ADALN, LINEAR),
    where the linear's graph input already is x / s and its weight W * s: whatever must see the
    unsmoothed x (a LoRA branch, `fxquant.apply_lora`) rescales by it. It is mirrored as base64
    float32 (little-endian), so it survives save / load and ``.pt2`` export. ``scaled_rows``
    names the linears whose output rows ``[start, start + in_features)`` took 1/s (the LINEAR and
    ADALN folds: to_v for to_out, w3 for w2, an adaLN modulation).
    """

    target: SmoothingTarget
    target_name: str = ""
    alpha: float = 0.0
    group: tuple[str, ...] = ()
    vector: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    scaled_rows: tuple[tuple[str, int], ...] = ()  # (linear module name, first row) that took 1/s

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", SmoothingTarget(self.target))
        object.__setattr__(self, "group", tuple(self.group))
        object.__setattr__(self, "scaled_rows", tuple((str(n), int(i)) for n, i in self.scaled_rows))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target.value, "target_name": self.target_name, "alpha": self.alpha,
                               "group": list(self.group)}
        if self.scaled_rows:
            out["scaled_rows"] = [list(r) for r in self.scaled_rows]
        if self.vector is not None:
            raw = self.vector.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
            out["vector"] = base64.b64encode(raw).decode("ascii")
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Smoothing":
        kw = dict(d)
        if "vector" in kw:
            raw = bytearray(base64.b64decode(kw["vector"]))
            kw["vector"] = torch.frombuffer(raw, dtype=torch.float32).clone() if raw else torch.zeros(0)
        return Smoothing(**kw)


@dataclass(frozen=True)
class Rounding:
    """Written by ``round_gptq``: the linear's weight was replaced by GPTQ's codes (int8 on the RTN
    per-row scale for W8A8; GGUF bytes on the reference encoder's block headers for ``q4_k`` /
    ``q8_0``), read through ``fxquant::dequantize_*`` until the lowering takes them as they are.
    ``groups``: the number of column groups GPTQ ran on, each against its own diagonal block of the
    Hessian (1: the whole Hessian; more when it did not fit ``hessian_bytes``). ``method="rtn"``
    appears in records written by earlier versions, for a weight left to round-to-nearest.
    """

    method: str = "gptq"
    damp: float = 0.0
    groups: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "damp": self.damp, "groups": self.groups}


@dataclass(frozen=True)
class Lowering:
    """Written by the lowering pass that owns the linear's scheme (``lower_w8a8``, ``lower_gguf``, ``keep_float``)."""

    scheme: Scheme
    bits_per_weight: float
    weight_bytes: int
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", Scheme(self.scheme))

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme.value, "bits_per_weight": self.bits_per_weight,
                "weight_bytes": self.weight_bytes, "note": self.note}


def float_lowering(w: torch.Tensor, note: str = "") -> Lowering:
    """The lowering record of a linear left in its float dtype (bits and bytes as stored now)."""
    return Lowering(Scheme.FLOAT, float(torch.finfo(w.dtype).bits), w.numel() * w.element_size(), note)


@dataclass(frozen=True)
class LinearRecord:
    """Everything fxquant knows about one linear layer. Written field by field by the passes."""

    name: str  # qualified module name, e.g. "layers.3.feed_forward.w2" (find_linears)
    in_features: int  # (find_linears)
    out_features: int  # (find_linears)
    has_bias: bool  # (find_linears)
    call: int = 0  # which call of the module this node is: 0, or 1, 2, ... for a module called again (find_linears)
    stats: Optional[ActStats] = None  # collect_stats
    fragility: Optional[Fragility] = None  # score_fragility
    sensitivity: Optional[Sensitivity] = None  # score_sensitivity
    selection: Optional[Selection] = None  # select_schemes
    smoothing: Optional[Smoothing] = None  # fold_smoothing
    rounding: Optional[Rounding] = None  # round_gptq
    lowering: Optional[Lowering] = None  # the lowering pass owning selection.scheme

    @property
    def key(self) -> str:
        """Unique per node: the module name, with ``#n`` for the module's n-th extra call."""
        return f"{self.name}#{self.call}" if self.call else self.name

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "in_features": self.in_features,
                               "out_features": self.out_features, "has_bias": self.has_bias}
        if self.call:
            out["call"] = self.call
        for f in ("stats", "fragility", "sensitivity", "selection", "smoothing", "rounding", "lowering"):
            v = getattr(self, f)
            if v is not None:
                out[f] = v.to_json() if hasattr(v, "to_json") else _plain(dataclasses.asdict(v))
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> "LinearRecord":
        kw: dict[str, Any] = {k: d[k] for k in ("name", "in_features", "out_features", "has_bias")}
        kw["call"] = d.get("call", 0)
        if "stats" in d:
            s = d["stats"]
            kw["stats"] = ActStats(s["max_abs"], s["std"], s["kurtosis"], s["count"],
                                   tuple(StepStats(*x) for x in s.get("per_step", ())))
        if "fragility" in d:
            kw["fragility"] = Fragility(**d["fragility"])
        if "sensitivity" in d:
            kw["sensitivity"] = Sensitivity(**d["sensitivity"])
        if "lowering" in d:
            kw["lowering"] = Lowering(**d["lowering"])
        if "selection" in d:
            kw["selection"] = _selection_from_json(d["selection"], kw.get("lowering"))
        if "smoothing" in d:
            kw["smoothing"] = Smoothing.from_json(d["smoothing"])
        if "rounding" in d:
            kw["rounding"] = Rounding(**d["rounding"])
        return LinearRecord(**kw)


@dataclass(frozen=True)
class GraphRecord:
    """Graph-level facts at ``gm.meta["fxquant"]``, each written by the one place named beside it."""

    recipe: dict[str, Any]  # Recipe.to_dict() (compile)
    branch: str = ""  # CFG branch name, "" for a single module (compile)
    spearman_rho: Optional[float] = None  # early vs late ranking stability (score_fragility)
    num_calibration: int = 0  # (collect_stats)
    timesteps: tuple[float, ...] = ()  # distinct calibration timesteps, in denoising order (collect_stats)
    example_inputs: Optional[dict[str, Any]] = None  # shapes/dtypes of the tracing example, export.describe_inputs (compile)
    model_class: str = ""  # the source model's class name (compile)
    model_config: Optional[dict[str, Any]] = None  # its diffusers config as JSON, if it has one (compile)
    computed_weight_linears: tuple[str, ...] = ()  # linear ops whose weight is computed in the graph (find_linears)
    # The drop-in module (fxquant/module.py), all written by compile: the source model's call signature
    # (signature.CallSpec JSON), its compute dtype (".to(dtype)" updates it), and whether dtypes.mark
    # could tell which dtype constants of the graph follow the compute dtype.
    call: Optional[dict[str, Any]] = None
    compute_dtype: str = ""
    dtype_marks: Optional[bool] = None

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["timesteps"], out["computed_weight_linears"] = list(self.timesteps), list(self.computed_weight_linears)
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> "GraphRecord":
        d = dict(d)
        extra = d.pop("extra", None) or {}  # format 1 kept the last three fields in an "extra" object
        if not isinstance(extra, dict):
            raise ValueError(f"'extra' is {extra!r}, expected an object")
        for key in ("model_class", "model_config", "computed_weight_linears"):
            if key in extra:
                d.setdefault(key, extra[key])
        known = {f.name for f in dataclasses.fields(GraphRecord)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}")
        d["timesteps"] = tuple(d.get("timesteps", ()))
        d["computed_weight_linears"] = tuple(d.get("computed_weight_linears", ()))
        return GraphRecord(**d)


def _selection_from_json(d: dict[str, Any], lowering: Optional[Lowering]) -> Selection:
    """Format 1 (fxquant 0.1) wrote no scheme and ``by`` "" for the default; its scheme was the
    lowering's (a protected or skipped linear stayed float)."""
    d = dict(d)
    if "scheme" not in d:
        d["scheme"] = lowering.scheme if lowering is not None else Scheme.FLOAT
    d["by"] = d.get("by") or DecidedBy.DEFAULT
    return Selection(**d)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def get(node: fx.Node) -> Optional[LinearRecord]:
    """The node's record; rebuilt from ``meta["custom"]`` after a save/load or re-export."""
    rec = node.meta.get(KEY)
    if rec is None:
        raw = node.meta.get("custom", {}).get(KEY)
        if raw is not None:
            rec = LinearRecord.from_json(raw)
            node.meta[KEY] = rec
    return rec


def put(node: fx.Node, rec: LinearRecord) -> None:
    """Store the record and its JSON mirror."""
    node.meta[KEY] = rec
    custom = dict(node.meta.get("custom") or {})
    custom[KEY] = rec.to_json()
    node.meta["custom"] = custom


def update(node: fx.Node, **fields: Any) -> LinearRecord:
    rec = get(node)
    if rec is None:
        raise KeyError(f"node {node.name} has no fxquant record")
    rec = dataclasses.replace(rec, **fields)
    put(node, rec)
    return rec


def records(gm: fx.GraphModule) -> list[tuple[fx.Node, LinearRecord]]:
    """All (node, record) pairs in graph order."""
    out = []
    for n in gm.graph.nodes:
        r = get(n)
        if r is not None:
            out.append((n, r))
    return out


def graph_record(gm: fx.GraphModule) -> Optional[GraphRecord]:
    return gm.meta.get(KEY)


def set_graph_record(gm: fx.GraphModule, rec: GraphRecord) -> None:
    gm.meta[KEY] = rec


def update_graph(gm: fx.GraphModule, **fields: Any) -> GraphRecord:
    rec = graph_record(gm)
    if rec is None:
        raise KeyError("GraphModule has no fxquant graph record")
    rec = dataclasses.replace(rec, **fields)
    set_graph_record(gm, rec)
    return rec
