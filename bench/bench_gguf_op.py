"""``fxquant::linear_gguf`` on CPU next to a bf16 linear, one real-width layer at a time.

    PYTHONPATH=. .venv/bin/python bench/bench_gguf_op.py             # all shapes, 256 and 1024 tokens
    PYTHONPATH=. .venv/bin/python bench/bench_gguf_op.py --quick     # 4608 x 4608 only

For each (in, out) width of Ideogram 4's linears, each token count and Q4_K / Q8_0, three
things are timed side by side, round-robin in the same run, one intra-op thread:

    bf16       F.linear(x, w_bf16)                          the weight kept decoded (2 bytes/weight)
    torch op   gguf_cpu.linear_gguf(..., native=False)      tiles decoded by torch passes (the fallback)
    C op       torch.ops.fxquant.linear_gguf                tiles decoded by gguf_native's C loop

The weights are random GGUF blocks (finite random fp16 scales, random codes): the decode's cost
does not depend on the values, and llama.cpp-style encoding of 57M weights would dominate the run.
Each row first checks that both tile decoders equal ``codecs.dequantize(...).to(bfloat16)`` bit for
bit on the benchmarked weight. The run stops if the C decoder did not build.

The machine is shared with other jobs: the table reports the best of ``--repeats`` rounds of
CPU time of this process (``time.process_time``; steadier than wall time under load, since it
does not count time other processes held the core), the ratios of those bests, and the median
of each round's own ratio; the JSON adds wall times and the load average before and after.
Compare ratios within one run. Writes ``bench/results/gguf_op.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fxquant  # noqa: F401  (registers fxquant::linear_gguf)
from fxquant import codecs
from fxquant.artifacts.common import atomic_write
from fxquant.ops import gguf_cpu, gguf_native

SHAPES = [(3072, 3072), (4608, 4608), (4608, 12288), (12288, 4608)]  # (in_features, out_features)
TOKENS = [256, 1024]
OUT = Path(__file__).parent / "results" / "gguf_op.json"


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Valid GGUF bytes: random codes and scale bytes, finite fp16 d (and dmin) around 1e-3."""
    g = np.random.default_rng(seed)
    elems, nbytes = codecs.BLOCKS[qtype]
    b = g.integers(0, 256, size=(rows * cols // elems, nbytes), dtype=np.uint8)
    n_scales = 2 if qtype == "q4_k" else 1
    scales = np.abs(g.standard_normal((b.shape[0], n_scales)) * 1e-3).astype(np.float16)
    b[:, : 2 * n_scales] = scales.view(np.uint8).reshape(b.shape[0], 2 * n_scales)
    return torch.from_numpy(b.reshape(rows, -1))


def _once(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def bench_case(qtype: str, k: int, n: int, tokens: int, repeats: int) -> dict:
    qweight = random_blocks(qtype, n, k)
    w_bf16 = codecs.dequantize(qweight, qtype).to(torch.bfloat16)
    exact = all(bool(torch.equal(gguf_cpu.dequantize(qweight, qtype, k, torch.bfloat16, native=native), w_bf16))
                for native in (False, True))
    x = torch.randn(tokens, k, dtype=torch.bfloat16)
    fns = {
        "bf16": lambda: F.linear(x, w_bf16),
        "torch_op": lambda: gguf_cpu.linear_gguf(x, qweight, qtype, k, None, native=False),
        "c_op": lambda: torch.ops.fxquant.linear_gguf(x, qweight, qtype, k, None),
    }
    y_op, y_bf = fns["c_op"](), fns["bf16"]()
    max_rel = float(((y_op.float() - y_bf.float()).abs() / y_bf.float().abs().clamp(min=1e-3)).max())
    best = {name: [float("inf"), float("inf")] for name in fns}
    rounds = []  # CPU times of each round, for the per-round ratios
    for _ in range(repeats):  # round-robin: a burst of load hits all three alike
        rounds.append({})
        for name, fn in fns.items():
            wall, cpu = _once(fn)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            rounds[-1][name] = cpu
    row = {"qtype": qtype, "in": k, "out": n, "tokens": tokens, "decode_bit_exact": exact,
           "op_vs_bf16_max_rel_diff": max_rel}
    for name, (wall, cpu) in best.items():
        row[f"{name}_wall_ms"], row[f"{name}_cpu_ms"] = wall * 1e3, cpu * 1e3
    for name in ("torch_op", "c_op"):
        row[f"{name}_over_bf16_cpu"] = best[name][1] / best["bf16"][1]
        row[f"{name}_over_bf16_wall"] = best[name][0] / best["bf16"][0]
        # the median of the rounds' own ratios: steadier than a ratio of bests when one lucky
        # round of bf16 (or of the op) sets a best the other never had a chance at
        row[f"{name}_over_bf16_cpu_median"] = float(np.median([r[name] / r["bf16"] for r in rounds]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only 4608 x 4608")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if gguf_native.library() is None:
        raise SystemExit("the C decoder did not build (see the warning above); nothing to compare")
    torch.set_num_threads(args.threads)
    shapes = [(4608, 4608)] if args.quick else SHAPES
    load_before = os.getloadavg()
    rows = []
    print(f"{'qtype':5} {'in':>6} {'out':>6} {'tok':>5} | {'bf16':>7} {'torch':>7} {'C':>7} best ms (CPU) | "
          f"{'torch/bf16':>10} {'C/bf16':>7} best (CPU) | {'C/bf16':>7} median (CPU) | exact")
    for k, n in shapes:
        for qtype in ("q4_k", "q8_0"):
            for tokens in TOKENS:
                r = bench_case(qtype, k, n, tokens, args.repeats)
                rows.append(r)
                print(f"{qtype:5} {k:>6} {n:>6} {tokens:>5} | {r['bf16_cpu_ms']:7.1f} {r['torch_op_cpu_ms']:7.1f} "
                      f"{r['c_op_cpu_ms']:7.1f}         | {r['torch_op_over_bf16_cpu']:10.2f} {r['c_op_over_bf16_cpu']:7.2f}"
                      f"            | {r['c_op_over_bf16_cpu_median']:7.2f}              | {r['decode_bit_exact']}",
                      flush=True)
    load_after = os.getloadavg()
    print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} CPUs "
          f"(shared machine: other jobs ran alongside)")
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "tile_elems": gguf_cpu.TILE_ELEMS, "c_decoder": str(gguf_native.library()._name),
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": load_after, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=1).encode(), "bench_gguf_op")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
