"""Peak memory of one forward of the float model at Ideogram 4's real widths, by sequence length.

    .venv/bin/python bench/bench_activations.py                  # 256, 2048 and 6144 positions
    .venv/bin/python bench/bench_activations.py --positions 256 6144

Every calibration forward `compile` runs (statistics, sensitivity, GPTQ's Hessians) holds at
least what the float model's own eager forward holds, so this is the floor of activation memory
that comes on top of the weights in docs/memory.md. Each length runs in a fresh process: build a
seeded bf16 ``Ideogram4Transformer2DModel`` with ``fxquant.models.IDEOGRAM4_FULL`` widths and
``--layers`` blocks (`bench_memory.build`), make one batch-1 input of ``positions`` positions
(Ideogram 4 packs text and image into one sequence, and its 53248-wide LLM features span every
position), then run the diffusers model under ``torch.no_grad()`` while a thread samples the RSS
every millisecond. ``peak`` is RSS above the process's RSS after the build and the input.

Prints a table and writes ``bench/results/activations.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import Sampler, _rss, build  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "activations.json"


def child(positions: int, layers: int) -> dict:
    import torch

    from fxquant import memory
    from fxquant.models import ideogram4_inputs

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build(layers)
    text = positions // 3  # the rest a square-ish image grid
    side = max(1, int((positions - text) ** 0.5))
    text = positions - side * side
    x = ideogram4_inputs(batch=1, text_len=text, image_hw=(side, side), timestep=0.5, seed=0, in_channels=128,
                         llm_features_dim=53248, dtype=torch.bfloat16)
    input_bytes = sum(t.numel() * t.element_size() for t in x.values())
    memory.trim()
    sampler = Sampler()
    base = _rss()
    sampler.start()
    sampler.enter("forward")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**x, return_dict=False)[0]
    seconds = time.perf_counter() - t0
    sampler.enter("done")
    sampler.stop = True
    sampler.join()
    return dict(positions=positions, text=text, image=side * side, layers=layers, input_bytes=input_bytes,
                peak=sampler.peaks["forward"] - base, seconds=seconds, out_shape=list(out.shape), loadavg=os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, nargs="+", default=[256, 2048, 6144])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers)))
        return
    rows = []
    for n in args.positions:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--layers", str(args.layers)], check=True,
                             capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = f"{'positions':>9} {'text':>5} {'image':>5} {'layers':>6} {'inputs':>7} {'peak':>7} {'seconds':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['positions']:>9} {r['text']:>5} {r['image']:>5} {r['layers']:>6} {r['input_bytes'] / 1e9:>6.2f}G "
              f"{r['peak'] / 1e9:>6.2f}G {r['seconds']:>8.1f}")
    print(f"load average {os.getloadavg()}; peak: RSS above the model and its input; G = 1e9 bytes")
    from fxquant.artifacts.common import atomic_write

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps({"rows": rows, "loadavg": os.getloadavg(), "cpus": os.cpu_count()}, indent=1).encode(),
                 "bench_activations")


if __name__ == "__main__":
    main()
