"""Inspect a rewritten graph: what the passes did to one transformer block, and the records they left.

    float graph:     linear(mul(norm(h), w_norm), get_attr[layers.0.attention.to_q.weight])
    lowered graph:   fxquant.linear_w8a8(mul(norm(h), w_norm / s), get_attr[...weight_int8],
                                         get_attr[...weight_scale], bias, smooth)

    .venv/bin/python examples/inspect_graph.py
"""

from __future__ import annotations

import collections

import torch

import fxquant
from fxquant import meta
from fxquant.models import ideogram4_trajectory, reduced_ideogram4
from fxquant.trace import trace


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                               and ("linear" in str(n.target) or "fxquant" in str(n.target)))


def lines_about(gm: torch.fx.GraphModule, needle: str) -> list[str]:
    return [line.strip() for line in gm.code.splitlines() if needle in line]


def main() -> None:
    model = reduced_ideogram4(seed=1, num_layers=1)
    calibration = ideogram4_trajectory(steps=4, seed=3)

    before = trace(model, calibration[0])  # the frontend alone: the float graph the passes start from
    gm = fxquant.compile(model, "int8-w8a8", calibration=calibration)

    print("linear ops before:", dict(op_counts(before)))
    print("linear ops after: ", dict(op_counts(gm)))

    print("\nthe generated code for layers.0.attention (before):")
    print("\n".join(lines_about(before, "layers_0_attention_to_")[:6]))
    print("\nand after (every quantization parameter is an argument of the custom op):")
    print("\n".join(line for line in lines_about(gm, "fxquant.linear_w8a8") if "layers_0_attention" in line))

    print("\nthe record of one linear at node.meta['fxquant'] (one field per pass):")
    for node, rec in meta.records(gm):
        if rec.name == "layers.0.attention.to_q":
            for field in ("name", "in_features", "out_features", "stats", "fragility", "selection", "smoothing", "lowering"):
                value = getattr(rec, field)
                print(f"  {field:12} {value if field != 'stats' else f'max|x| {value.max_abs:.2f}, kurtosis {value.kurtosis:.2f}'}")
            print(f"  op args      {[a.target if isinstance(a, torch.fx.Node) and a.op == 'get_attr' else a for a in node.args[1:]]}")
            print(f"  JSON mirror  node.meta['custom']['fxquant'] keys: {sorted(node.meta['custom']['fxquant'])}")

    g = meta.graph_record(gm)
    print(f"\ngraph record: recipe {g.recipe['name']!r}, {g.num_calibration} calibration inputs, "
          f"timesteps {[round(t, 2) for t in g.timesteps]}, Spearman rho {g.spearman_rho:.3f}")
    print("\nwhat stayed float, and why:")
    for row in fxquant.summary(gm):
        if row.scheme != "w8a8":
            print(f"  {row.name:28} {row.scheme:6} {row.kind:9} {row.reason}")


if __name__ == "__main__":
    main()
