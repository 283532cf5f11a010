"""torch.compile on a compiled reduced Ideogram 4: graphs, graph breaks and compile time per new shape.

    .venv/bin/python bench/bench_torch_compile.py                         # eager + inductor backends
    .venv/bin/python bench/bench_torch_compile.py --backends eager --layers 4

Side by side, in one run, on the same quantized module (``--recipe``, default int8-w8a8):
  - ``hop``: the module as torch.export leaves it (the ``wrap_with_autocast`` region around MRoPE
    kept as a higher-order op, as fxquant returned it before ``inline_autocast``), compiled
    without fullgraph (with fullgraph it raises at the second length);
  - ``inlined``: what fxquant returns now, ``fullgraph=True``, with ``dynamic=None`` (default)
    and ``dynamic=True``.
Shapes: batch 2 then 3, each at text lengths 8 / 13 / 21 (+16 image tokens). For every shape the
wall time of the first call (which includes any compile) is recorded, and per mode the number of
graphs dynamo produced and its graph-break count.

The machine is shared and loaded; compare within one run. The load average is recorded.
Writes a table to stdout and JSON to ``bench/results/torch_compile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import fxquant
from fxquant.artifacts.export import export_program
from fxquant.artifacts.common import atomic_write
from fxquant.models import ideogram4_inputs, reduced_ideogram4

SHAPES = [(b, t) for b in (2, 3) for t in (8, 13, 21)]


def measure(module, backend: str, fullgraph: bool, dynamic) -> dict:
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(module, backend=counting, fullgraph=fullgraph, dynamic=dynamic)
    firsts, max_err = [], 0.0
    for batch, text_len in SHAPES:
        x = ideogram4_inputs(batch=batch, text_len=text_len, seed=text_len)
        with torch.no_grad():
            t = time.perf_counter()
            out = compiled(**x)[0]
            firsts.append(time.perf_counter() - t)
            max_err = max(max_err, float((out - module(**x)[0]).abs().max()))
    return {"first_call_s": firsts, "graphs": len(graphs), "graph_breaks": sum(counters["graph_break"].values()),
            "total_s": sum(firsts), "max_abs_diff_vs_eager": max_err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="int8-w8a8")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--backends", default="eager,inductor")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "torch_compile.json"))
    args = ap.parse_args()

    model = reduced_ideogram4(seed=0, num_layers=args.layers)
    calibration = [ideogram4_inputs(batch=2, text_len=8, seed=i) for i in range(2)]
    inlined = fxquant.compile(model, args.recipe, calibration=calibration)
    hop = export_program(inlined).module()  # re-export folds the region back into the higher-order op
    assert any(n.target is torch.ops.higher_order.wrap_with_autocast for n in hop.graph.nodes)

    modes = [("hop", hop, False, None), ("inlined", inlined, True, None), ("inlined", inlined, True, True)]
    rows = []
    for backend in args.backends.split(","):
        for name, module, fullgraph, dynamic in modes:
            r = measure(module, backend, fullgraph, dynamic)
            rows.append({"backend": backend, "module": name, "fullgraph": fullgraph, "dynamic": dynamic, **r})
            print(_line(rows[-1]), flush=True)

    result = {"benchmark": "bench/bench_torch_compile.py", "recipe": args.recipe, "layers": args.layers,
              "shapes_batch_textlen": SHAPES, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "loadavg": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1).encode(), "bench_torch_compile")
    print(f"load average {os.getloadavg()}; wrote {args.out}")


def _line(r: dict) -> str:
    firsts = " ".join(f"{t:6.2f}" for t in r["first_call_s"])
    return (f"{r['backend']:9s} {r['module']:8s} fullgraph={str(r['fullgraph']):5s} dynamic={str(r['dynamic']):5s} "
            f"graphs={r['graphs']:2d} breaks={r['graph_breaks']:2d} total={r['total_s']:7.1f}s  first calls [s]: {firsts}  "
            f"max|diff|={r['max_abs_diff_vs_eager']:.2g}")


if __name__ == "__main__":
    main()
