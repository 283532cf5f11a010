"""The public entry points: `compile` and `summary`.

    gm  = fxquant.compile(transformer, "int8-w8a8", calibration=examples)
    gms = fxquant.compile({"cond": t_c, "uncond": t_u}, recipe, calibration={"cond": ex_c, "uncond": ex_u})
    print(fxquant.summary(gm))
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx

from . import dtypes, meta, module, pipeline
from .errors import CalibrationError, FxquantError, TraceError
from .module import QuantizedModule
from .signature import CallSpec
from .recipe import Recipe, resolve
from .schemes import Scheme, SelectionKind
from .artifacts.export import describe_inputs
from .observe import Observed
from .ownership import own_tensors, take_ownership
from .branches import as_branches, unless_dict
from .trace import check_calibration, trace

RecipeLike = Union[Recipe, str, "os.PathLike[str]"]


# Over 60 lines only for its signature and documented arguments; the body is 20 lines.
def compile(
    model: Union[torch.nn.Module, Mapping[str, torch.nn.Module]],
    recipe: RecipeLike,
    calibration: Union[Sequence[Any], Mapping[str, Sequence[Any]], None] = None,
    consume: bool = False,
    dump_dir: Union[str, "os.PathLike[str]", None] = None,
    *,
    lora: Any = None,
    lora_scale: float = 1.0,
) -> Union[QuantizedModule, dict[str, QuantizedModule]]:
    """Quantize a diffusion transformer into a lowered GraphModule (one per CFG branch).

    Args:
        model: an ``nn.Module``, or a dict of branch name -> module (e.g. ``{"cond": ..., "uncond": ...}``).
        recipe: a `Recipe`, a preset name (``"int8-w8a8"``, ``"int8-w8a8-paper"``, ``"w8a8-naive"``, ``"q4_k"``, ``"q8_0"``)
            or a path to a recipe JSON file.
        calibration: a sequence of example inputs (each a dict of keyword arguments or a tuple of
            positional ones); the first is the tracing example. Or what `fxquant.observe` gathered
            while the model ran (streamed statistics, nothing re-run). For a dict of branches, a
            dict with the same keys, so each branch is calibrated on the inputs it really sees.
        consume: take the model's weights instead of sharing them: each float weight is freed
            as soon as it is lowered, so the peak stays near the float model's size (see
            docs/memory.md). The model is left as an empty shell (meta tensors); do not use it
            afterwards. Default False: the model is untouched and the compiled module clones
            what stays float (biases, norms, protected linears), so later in-place changes to
            the model never reach it.
        dump_dir: if set, ``gm.code`` after every pass is written there (a sub-folder per branch).
            Progress goes to the ``fxquant`` logger.
        lora: merge-before-quantize: a LoRA (file, folder, state dict or `LoraWeights`) merged
            into the float weights (``W + lora_scale * factor * B @ A``, `fxquant.merge_lora`)
            before calibration and quantization. For runtime LoRA on the quantized module use
            `fxquant.apply_lora` instead.
        lora_scale: the merged LoRA's strength.

    Returns:
        A `QuantizedModule` (a ``torch.fx.GraphModule``) with the module's call signature, output
        type, ``.config``, ``.dtype``, ``.device`` and ``.to()`` (or a dict of them). It shares no
        tensor with the input modules, which are not modified (unless ``consume``).

    Raises:
        RecipeError, CalibrationError, TraceError, PassError, LoraError (``lora``: as `fxquant.merge_lora`).

    Example:
        >>> gm = fxquant.compile(model, "w8a8-naive", calibration=[inputs])  # doctest: +SKIP
    """
    recipe = resolve(recipe)
    if lora is not None:  # a merged copy; the caller's model is not written
        from .lora.merge import merge_lora

        model = merge_lora(model, lora, lora_scale)
    models, is_dict = as_branches(model, "compile")
    if is_dict and not isinstance(calibration, Mapping):
        raise CalibrationError("compile: a dict of branches needs a dict of calibration inputs with the same keys")
    if not is_dict and isinstance(calibration, Mapping):
        raise CalibrationError(
            "compile: calibration is a dict but model is a single module; pass a sequence of example inputs "
            "(or a dict of branches as the model)"
        )
    if is_dict and set(calibration) != set(models):
        raise CalibrationError(f"compile: calibration keys {sorted(calibration)} do not match branch keys {sorted(models)}")
    out = {name: _compile_one(m, recipe, calibration[name] if is_dict else calibration, name, dump_dir, consume)
           for name, m in models.items()}
    return unless_dict(out, is_dict)


def _compile_one(model: torch.nn.Module, recipe: Recipe, calibration: Any, branch: str, dump_dir: Any,
                 consume: bool = False) -> QuantizedModule:
    where = f"calibration[{branch!r}]" if branch else "calibration"
    if isinstance(calibration, Observed) and not len(calibration):
        raise CalibrationError(f"{where}: fxquant.observe saw no call of the module; run the model inside the with-block")
    examples = check_calibration(calibration, where)
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    call = CallSpec.record(model, examples[0])
    if call is not None:  # every item as the graph's keyword inputs; non-tensor arguments checked
        examples = [call.canonical(x, f"{where}[{i}]") for i, x in enumerate(examples)]
    if dump_dir is not None and branch:
        dump_dir = os.path.join(os.fspath(dump_dir), branch)
    # Statistics streamed by fxquant.observe go to the passes as they are (nothing is re-run); the
    # calls it kept are re-run by some passes, in the graph's canonical form like any other input.
    if isinstance(calibration, Observed):
        examples = calibration.with_inputs(examples)
    passes = pipeline.build(recipe, examples, branch, dump_dir, owns_weights=consume)
    gm = trace(model, examples[0])
    marked = dtypes.mark(gm, model, examples[0])
    meta.set_graph_record(gm, meta.GraphRecord(
        recipe=recipe.to_dict(), branch=branch, **_model_facts(model), example_inputs=describe_inputs(examples[0]),
        call=call.to_json() if call else None, compute_dtype=str(dtypes.compute_dtype(model)).removeprefix("torch."),
        dtype_marks=marked))
    config = getattr(model, "config", None) if callable(getattr(model, "to_json_string", None)) else None
    if consume:
        take_ownership(model)
    with torch.no_grad():
        gm = passes(gm)
        if not consume:
            own_tensors(gm, model)
    gm = module.adopt(gm)
    module.set_config(gm, config)
    return gm


def _model_facts(model: torch.nn.Module) -> dict[str, Any]:
    """The source model's class and (for a diffusers ``ConfigMixin``) its JSON config, which
    `save_gguf` records so a loader can rebuild the architecture without the original module,
    and `fxquant.load` restores as the module's ``.config``."""
    to_json = getattr(model, "to_json_string", None)
    return {"model_class": type(model).__name__, "model_config": json.loads(to_json()) if callable(to_json) else None}


# ---------------------------------------------------------------- summary

COLUMNS = ("name", "scheme", "kind", "in_features", "out_features", "bits_per_weight", "fragility", "rank", "smoothing",
           "reason")


@dataclass(frozen=True)
class SummaryRow:
    name: str
    scheme: str  # how it is stored: a `Scheme` value ("w8a8", "q4_k", "q8_0", "float")
    kind: str  # why: a `SelectionKind` value ("quantize", "protected", "skipped")
    in_features: int
    out_features: int
    bits_per_weight: Optional[float]
    weight_bytes: Optional[int]
    fragility: Optional[float]
    rank: Optional[int]
    smoothing: str
    reason: str
    branch: str = ""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class Summary:
    """A table of every linear of a lowered module; ``.rows`` holds the same data."""

    def __init__(self, rows: list[SummaryRow], header: str, notes: Sequence[str] = ()) -> None:
        self.rows = rows
        self.header = header
        self.notes = list(notes)  # facts about linears that have no row (e.g. computed weights)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self, by: str = "scheme") -> dict[str, int]:
        """Linears per scheme (``by="scheme"``) or per selection kind (``by="kind"``)."""
        if by not in ("scheme", "kind"):
            raise FxquantError(f"Summary.counts: by must be 'scheme' or 'kind', got {by!r}")
        out: dict[str, int] = {}
        for r in self.rows:
            key = getattr(r, by)
            out[key] = out.get(key, 0) + 1
        return out

    @property
    def quantized(self) -> int:
        """How many linears are stored in a quantized scheme (anything but float)."""
        return sum(1 for r in self.rows if r.scheme != Scheme.FLOAT.value)

    def __str__(self) -> str:
        def cell(r: SummaryRow, c: str) -> str:
            v = getattr(r, c)
            if v is None:
                return "-"
            if isinstance(v, float):
                return f"{v:.3g}" if c == "fragility" else f"{v:.2f}"
            return str(v)

        cols = (("branch",) if any(r.branch for r in self.rows) else ()) + COLUMNS
        table = [list(cols)] + [[cell(r, c) for c in cols] for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        lines = [self.header]
        for i, row in enumerate(table):
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        total_bytes = sum(r.weight_bytes or 0 for r in self.rows)
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.counts("kind").items()) if k != SelectionKind.QUANTIZE.value)
        lines.append(f"{len(self.rows)} linears: {counts}" + (f" ({kinds})" if kinds else "")
                     + f"; linear weights {total_bytes / 2**20:.2f} MiB")
        if self.rows and not self.quantized:
            lines.append("warning: no linear is quantized: every linear stays float")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def summary(gm: Union[fx.GraphModule, Mapping[str, fx.GraphModule]]) -> Summary:
    """Per-linear table of a compiled module (or dict of branches): scheme, shape, bits, fragility,
    smoothing target and the reason for protection.

    Raises:
        FxquantError: if ``gm`` was not produced by `fxquant.compile` (no records).
    """
    branches, is_dict = as_branches(gm, "summary")
    if is_dict:
        parts = {name: summary(g) for name, g in branches.items()}
        rows = [dataclasses.replace(r, branch=name) for name, p in parts.items() for r in p.rows]
        notes = [f"{name}: {n}" for name, p in parts.items() for n in p.notes]
        return Summary(rows, f"fxquant summary: {len(gm)} branches ({', '.join(gm)})", notes)
    if not isinstance(gm, fx.GraphModule):
        raise FxquantError(f"summary: expected a GraphModule from fxquant.compile or fxquant.load, got {type(gm).__name__}")
    recs = meta.records(gm)
    if not recs:
        raise FxquantError("summary: this module has no fxquant records; was it produced by fxquant.compile?")
    g = meta.graph_record(gm)
    rows = []
    for _, r in recs:
        low, sel = r.lowering, r.selection
        scheme = low.scheme.value if low is not None else Scheme.FLOAT.value
        reason = sel.reason if sel is not None else ""
        if low is not None and low.note and low.note not in reason:
            reason = f"{reason}; {low.note}" if reason else low.note
        rows.append(SummaryRow(
            name=r.key, scheme=scheme, kind=sel.kind.value if sel is not None else "-",
            in_features=r.in_features, out_features=r.out_features,
            bits_per_weight=low.bits_per_weight if low else None, weight_bytes=low.weight_bytes if low else None,
            fragility=r.fragility.score if r.fragility else None, rank=r.fragility.rank if r.fragility else None,
            smoothing=r.smoothing.target.value if r.smoothing else "-", reason=reason,
        ))
    header = "fxquant summary"
    if g is not None:
        header += f": recipe {g.recipe.get('name')!r}"
        if g.branch:
            header += f", branch {g.branch!r}"
        if g.spearman_rho is not None:
            header += f", fragility rank stability (Spearman rho early vs late) {g.spearman_rho:.3f}"
    computed = g.computed_weight_linears if g is not None else ()
    notes = [f"{len(computed)} linear op(s) with computed weights left in float: {', '.join(computed)}"] if computed else []
    return Summary(rows, header, notes)
