"""The analysis report: why each linear was protected, as JSON, Markdown and PNG plots.

    report(gm, "out/")  ->  out/report.json        every record (stats, fragility, sensitivity, selection, lowering)
                            out/report.md          both rankings, their Spearman, protected set and why, ladder
                            out/fragility.png      score per linear in graph order, kept-float ones coloured
                            out/sensitivity.png    measured sensitivity per linear (when scored)
                            out/ladder.png         error vs k, knee marked (with ``ladder=``; one curve per
                                                   ladder given, e.g. by fragility and by sensitivity)

For a dict of CFG branches every file carries the branch (``fragility_cond.png``, one JSON and
one Markdown). ``fed_by`` names, for each linear, the linears whose outputs reach its input
without passing through another linear (a `networkx` ancestor search on the FX graph with
linear nodes as cut points): the reason a ``feed_forward.w2`` has outlier channels is the
``w1``/``w3`` product feeding it. Plots use matplotlib's Agg backend (the ``report`` extra).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch.fx as fx

from . import meta
from .branches import as_branches
from .artifacts.common import atomic_write, fspath
from .errors import FormatError, FxquantError
from .ladder import Ladder
from .passes.score_fragility import spearman
from .report_plots import plot_ladder, plot_scores
from .schemes import SelectionKind

GraphLike = Union[fx.GraphModule, Mapping[str, fx.GraphModule]]


def fed_by(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Linear name -> the nearest upstream linears feeding its activation input (graph order)."""
    import networkx as nx

    linears = {node: rec.name for node, rec in meta.records(gm)}
    g = nx.DiGraph()
    g.add_nodes_from(gm.graph.nodes)
    g.add_edges_from((i, n) for n in gm.graph.nodes for i in n.all_input_nodes if i not in linears)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = {}
    for node, name in linears.items():
        x = node.args[0]
        if not isinstance(x, fx.Node):
            out[name] = []
            continue
        up = nx.ancestors(g, x) | {x}
        # an ancestor that is a linear has no in-edges in the cut graph: it is a frontier linear
        feeders = [n for n in up if n in linears] + [p for n in up for p in n.all_input_nodes if p in linears]
        out[name] = [linears[n] for n in sorted(set(feeders), key=order.__getitem__)]
    return out


def _rows(gm: fx.GraphModule) -> list[dict[str, Any]]:
    feeders = fed_by(gm)
    rows = []
    for _, r in meta.records(gm):
        row = r.to_json()
        if r.stats is not None and r.stats.per_step:
            row["mean_kurtosis"] = sum(s[3] for s in r.stats.per_step) / len(r.stats.per_step)
        row["fed_by"] = feeders[r.name]
        rows.append(row)
    return rows


def _markdown(section: str, g: Optional[meta.GraphRecord], rows: list[dict[str, Any]], png: Optional[str]) -> list[str]:
    lines = [f"## {section}", ""]
    if g is not None:
        lines.append(f"- recipe: `{g.recipe.get('name', '?')}`; calibration inputs: {g.num_calibration}; "
                     f"timesteps (denoising order): {', '.join(f'{t:g}' for t in g.timesteps) or '-'}")
        rho = "-" if g.spearman_rho is None else f"{g.spearman_rho:.3f}"
        lines.append(f"- ranking stability, Spearman rho of early vs late half of the trajectory: {rho}")
    both = [r for r in rows if "sensitivity" in r and "fragility" in r]
    if len(both) >= 2:
        rho2 = spearman([r["sensitivity"]["error"] for r in both], [r["fragility"]["score"] for r in both])
        lines.append(f"- agreement of the two rankings, Spearman rho of measured sensitivity vs fragility score: "
                     f"{'-' if rho2 is None else f'{rho2:.3f}'}")
    schemes: dict[str, int] = {}
    for r in rows:
        sc = r.get("lowering", {}).get("scheme", "float")
        schemes[sc] = schemes.get(sc, 0) + 1
    protected = sum(1 for r in rows if r.get("selection", {}).get("kind", SelectionKind.QUANTIZE) != SelectionKind.QUANTIZE)
    size = _float_sizes(rows)
    kept_bytes = sum(size[r["name"]] for r in rows if r.get("lowering", {}).get("scheme") == "float")
    total = sum(size.values())
    lines += [f"- schemes: {', '.join(f'{k} {v}' for k, v in sorted(schemes.items()))} of {len(rows)} linears; "
              f"kept in float: {schemes.get('float', 0)}; protected or skipped by the recipe: {protected}",
              f"- bytes kept in float: {kept_bytes / 2**20:.3f} MiB of {total / 2**20:.3f} MiB of linear weights "
              f"in float ({100 * kept_bytes / max(total, 1):.2f} %)", "",
              f"![fragility]({png})" if png else "No fragility scores: the recipe does not rank layers (protect_top_k = 0).", "",
              "| rank | linear | score | sens. rank | sensitivity | mean kurtosis | max abs | early/late rank | scheme | why | fed by |",
              "|---:|---|---:|---:|---:|---:|---:|---|---|---|---|"]

    def key(r: dict[str, Any]) -> tuple:
        return (r["fragility"]["rank"] if "fragility" in r else 1 << 30, r["name"])

    for r in sorted(rows, key=key):
        f, s, sel = r.get("fragility", {}), r.get("stats", {}), r.get("selection", {})
        scheme = r.get("lowering", {}).get("scheme", "-")
        if sel.get("kind", SelectionKind.QUANTIZE) != SelectionKind.QUANTIZE:
            scheme = f"{scheme} ({sel['kind']})"
        el = f"{f.get('early_rank') or '-'}/{f.get('late_rank') or '-'}" if f else "-"
        sv = r.get("sensitivity", {})
        lines.append("| " + " | ".join([
            str(f.get("rank", "-")), f"`{r['name']}`", _num(f.get("score")), str(sv.get("rank", "-")),
            _num(sv.get("error")), _num(r.get("mean_kurtosis")),
            _num(s.get("max_abs")), el, str(scheme), sel.get("reason", "") or "-",
            _feeders(r["fed_by"])]) + " |")
    return lines + [""]


def _float_sizes(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Each linear's weight bytes in float: in x out at the float dtype's width (read from a linear left
    in float; 32 bits when none is)."""
    bits = next((r["lowering"]["bits_per_weight"] for r in rows if r.get("lowering", {}).get("scheme") == "float"), 32.0)
    return {r["name"]: int(r["in_features"] * r["out_features"] * bits) // 8 for r in rows}


def _feeders(names: list[str]) -> str:
    # A residual-stream input is fed by every earlier block: a count says more than a list.
    if not names:
        return "-"
    return ", ".join(f"`{n}`" for n in names) if len(names) <= 3 else f"{len(names)} linears (see JSON)"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _ladder_md(ladders: list[Ladder], png: str, section: str) -> list[str]:
    lines = [f"## Protection ladder{section}", "", f"![ladder]({png})", ""]
    for ladder in ladders:
        knee = ladder.knee()
        rho = "-" if ladder.spearman_rankings is None else f"{ladder.spearman_rankings:.3f}"
        lines += [f"### By {ladder.by}", "",
                  f"Recipe `{ladder.recipe}`, {ladder.num_linears} linears, {ladder.num_evaluation} held-out inputs; "
                  f"knee: {'-' if knee is None else f'k = {knee}'}; Spearman rho of sensitivity vs fragility: {rho}.",
                  f"Top by fragility: {', '.join(f'`{n}`' for n in ladder.ranking[:5])}.",
                  f"Top by sensitivity: {', '.join(f'`{n}`' for n in ladder.ranking_sensitivity[:5]) or '-'}.", "",
                  "| k | kept in float | float MiB | float % of linear weights | relative error | worst input | linear weights (MiB) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for p in ladder.points:
            lines.append(f"| {p.k} | {len(p.protected)} | {p.float_bytes / 2**20:.3f} | {100 * p.float_fraction:.2f} | "
                         f"{p.rel_error:.5g} | {p.max_rel_error:.5g} | {p.weight_bytes / 2**20:.3f} |")
        lines.append("")
    return lines


def report(gm: GraphLike, path: Union[str, "os.PathLike[str]"],
           ladder: Union[Ladder, Sequence[Ladder], Mapping[str, Union[Ladder, Sequence[Ladder]]], None] = None
           ) -> dict[str, str]:
    """Write the analysis report of a compiled module (or dict of branches) into directory ``path``.

    Args:
        gm: the output of `fxquant.compile` (or `Ladder.analysed`): any GraphModule with records.
        path: a directory, created if missing; existing report files in it are overwritten.
        ladder: a `fxquant.protection_ladder` result, or a list of them (e.g. one climbing the
            fragility ranking and one the sensitivity ranking: drawn together), or a dict of either,
            keyed like ``gm``.

    Returns:
        ``{"json": ..., "markdown": ..., "fragility_png"[_branch]: ..., "ladder_png"[_branch]: ...}`` paths.

    Raises:
        FxquantError: ``gm`` has no records.
        MissingDependencyError: matplotlib is missing.
        FormatError: ``path`` is a file, or a file cannot be written (naming it; every file is
            written to a temp file and renamed, so an old report file survives a failure).

    Example:
        >>> fxquant.report(gm, "report/", ladder=fxquant.protection_ladder(model, [0, 2, 4], cal, held))  # doctest: +SKIP
    """
    branches, is_dict = as_branches(gm, "report")
    ladders = _ladders(ladder, branches, is_dict)
    path = _folder(path)
    written: dict[str, str] = {}
    doc: dict[str, Any] = {"branches": {}}
    md = ["# fxquant analysis report", ""]
    for name, g in branches.items():
        doc["branches"][name], lines = _branch(path, name, g, ladders, written)
        md += lines
    written["json"] = os.path.join(path, "report.json")
    atomic_write(written["json"], json.dumps(doc, indent=2, default=_json_default).encode(), "report")
    written["markdown"] = os.path.join(path, "report.md")
    atomic_write(written["markdown"], "\n".join(md).encode(), "report")
    return written


def _ladders(ladder: Any, branches: dict[str, fx.GraphModule], is_dict: bool) -> dict[str, Any]:
    """Branch name -> its ladder(s), checked against the branches of ``gm``."""
    ladders = dict(ladder) if isinstance(ladder, Mapping) else ({"": ladder} if ladder is not None else {})
    if is_dict and ladder is not None and not isinstance(ladder, Mapping):
        raise FxquantError("report: gm is a dict of branches; give ladder as a dict with the same keys")
    if set(ladders) - set(branches):
        raise FxquantError(f"report: ladder keys {sorted(ladders)} are not branches of gm ({sorted(branches)})")
    return ladders


def _folder(path: Union[str, "os.PathLike[str]"]) -> str:
    """The report folder, created if missing (a file there is an error)."""
    path = fspath(path, "report")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FormatError(f"report: cannot write the report into {path}: it is a file; give a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise FormatError(f"report: cannot create the folder {path}: {e.strerror or e}") from None
    return path


def _branch(path: str, name: str, g: fx.GraphModule, ladders: dict[str, Any], written: dict[str, str]
            ) -> tuple[dict[str, Any], list[str]]:
    """One branch's plots (added to ``written``); returns its JSON section and its Markdown lines."""
    if not meta.records(g):
        raise FxquantError(f"report: branch {name!r} has no fxquant records; was it produced by fxquant.compile?"
                           if name else "report: this module has no fxquant records; was it produced by fxquant.compile?")
    suffix, label = (f"_{name}", f" ({name})") if name else ("", "")
    rows, grec = _rows(g), meta.graph_record(g)
    png: Optional[str] = None
    if any("fragility" in r for r in rows):  # a recipe without calibration has nothing to plot
        png = f"fragility{suffix}.png"
        plot_scores(rows, f"fragility per linear{label}", os.path.join(path, png))
        written[f"fragility_png{suffix}"] = os.path.join(path, png)
    md = _markdown(f"Branch `{name}`" if name else "Linears by fragility", grec, rows, png)
    doc: dict[str, Any] = {"graph": grec.to_json() if grec is not None else None, "linears": rows}
    if any("sensitivity" in r for r in rows):
        sp = f"sensitivity{suffix}.png"
        plot_scores(rows, f"measured sensitivity per linear{label}", os.path.join(path, sp), "sensitivity", "error")
        written[f"sensitivity_png{suffix}"] = os.path.join(path, sp)
        md += [f"![sensitivity]({sp})", ""]
    if name in ladders:
        lads = [ladders[name]] if isinstance(ladders[name], Ladder) else list(ladders[name])
        lp = f"ladder{suffix}.png"
        plot_ladder(lads, f"protection ladder{label}", os.path.join(path, lp))
        written[f"ladder_png{suffix}"] = os.path.join(path, lp)
        md += _ladder_md(lads, lp, f" (`{name}`)" if name else "")
        doc["ladder"] = lads[0].to_json() if len(lads) == 1 else [x.to_json() for x in lads]
    return doc, md


def _json_default(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"report: cannot write {type(v).__name__} to JSON")
