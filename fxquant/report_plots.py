"""The report's PNG plots (matplotlib, Agg backend; the ``report`` extra), each written atomically.

    plot_scores(rows, ...)    bar per linear in graph order (log scale), protected ones coloured by why
    plot_ladder(ladders, ...) relative error vs k, one curve (pooled and worst input) per ladder, knee marked
"""

from __future__ import annotations

import io
from typing import Any

from .artifacts.common import atomic_write
from .errors import MissingDependencyError
from .ladder import Ladder
from .schemes import DecidedBy, SelectionKind


def plot_scores(rows: list[dict[str, Any]], title: str, path: str, field: str = "fragility", value: str = "score") -> None:
    plt = _pyplot()
    scored = [r for r in rows if field in r]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(rows) + 3), 4.0))
    xs = range(len(scored))
    colors = [_color(r.get("selection", {})) for r in scored]
    prot = [c != COLORS["quantized"] for c in colors]
    ax.bar(xs, [max(r[field][value], 1e-12) for r in scored], color=colors)
    ax.set_yscale("log")
    if scored:  # headroom above the tallest bar for its rotated name and the legend
        ax.set_ylim(top=max(r[field][value] for r in scored) * 40)
    ax.set_xlabel("linear (graph order)")
    ax.set_ylabel("fragility score" if field == "fragility" else "output rel. error, this linear alone W8A8")
    ax.set_title(title)
    for x, r, p in zip(xs, scored, prot):
        if p:
            ax.annotate(r["name"], (x, r[field][value]), rotation=90, fontsize=6, ha="center", va="bottom")
    used = [k for k, c in COLORS.items() if c in colors]
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in used], labels=used,
              loc="upper left", fontsize=7)
    _save_png(fig, path)


COLORS = {"protected: top-k": "tab:red", "protected: rule": "tab:orange", "protected: budget": "tab:purple",
          "skipped": "tab:gray", "quantized": "tab:blue"}


def _color(sel: dict[str, Any]) -> str:
    kind = sel.get("kind", SelectionKind.QUANTIZE)
    if kind == SelectionKind.QUANTIZE:
        return COLORS["quantized"]
    if kind == SelectionKind.SKIPPED:
        return COLORS["skipped"]
    return COLORS[{DecidedBy.TOP_K: "protected: top-k", DecidedBy.BUDGET: "protected: budget"}.get(sel.get("by"), "protected: rule")]


def plot_ladder(ladders: list[Ladder], title: str, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for ladder, color in zip(ladders, ("tab:blue", "tab:green", "tab:purple", "tab:brown")):
        ks = [p.k for p in ladder.points]
        ax.plot(ks, [p.rel_error for p in ladder.points], "o-", color=color, label=f"by {ladder.by}: pooled")
        ax.plot(ks, [p.max_rel_error for p in ladder.points], "x--", color=color, alpha=0.5, label=f"by {ladder.by}: worst input")
        knee = ladder.knee()
        if knee is not None:
            e = next(p.rel_error for p in ladder.points if p.k == knee)
            ax.axvline(knee, color=color, lw=0.8)
            ax.annotate(f"knee k={knee}", (knee, e), color=color, xytext=(5, 10), textcoords="offset points")
    ax.set_xlabel("k (top-ranked linears kept in float)")
    ax.set_ylabel("relative L2 error vs float")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save_png(fig, path)


def _save_png(fig: Any, path: str) -> None:
    """Render into memory, then write atomically (matplotlib would write the file in place)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue(), "report")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("report: the PNG plots need matplotlib; install fxquant[report] "
                                     "(pip install matplotlib)") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
