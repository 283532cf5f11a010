"""Runtime LoRA cost on CPU: one Ideogram 4 block at real widths with rank 16 and rank 64
branches, side by side with the same block without LoRA, in one run.

    .venv/bin/python bench/bench_lora.py                  # 1024 tokens, 1 thread, CPU-time clock
    .venv/bin/python bench/bench_lora.py --threads 2 --clock wall --bf16 --seq 256 1024

What is timed: `Ideogram4Transformer2DModel` with one block at Ideogram 4's real widths (hidden
4608, SwiGLU 12288, adaLN 512; embedders and final layer included, LLM feature width cut to 512
as in bench_w8a8.py), bf16, batch 1. Variants:

    bf16 eager               the float model (with --bf16)
    w8a8                     fxquant.compile(bf16 model, "w8a8-naive")
    w8a8 + LoRA r16 / r64    the same module with `fxquant.apply_lora` on every linear of the
                             block (q, k, v, out, w1, w2, w3, adaLN modulation: 8 branches)

Calls are interleaved round-robin so load from other processes falls on all variants alike;
the table shows best and median over ``--reps`` rounds and the overhead of each LoRA variant
against the module without it (best round). By default one thread and this process's CPU time
(``time.process_time``): on a machine shared with other processes, wall time mostly measures the
neighbours (a first wall-clock run at load average 15 had the LoRA variants faster than the
module without LoRA). It also times `apply_lora` itself (reading nothing
from disk: a state dict in memory) and `remove_lora`. The load average at start and end is
recorded: the machine is shared with other processes. Before the block, each linear shape of the
block is timed alone: the W8A8 op and the branch op (`fxquant::lora`) at rank 16 and 64, whose
ratio is the branch's share without the whole block's noise. Writes bench/results/lora_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fxquant
from fxquant.artifacts.common import atomic_write

sys.path.insert(0, str(Path(__file__).parent))
from bench_w8a8 import build_model, inputs, sample  # noqa: E402


def block_lora(model: torch.nn.Module, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA on every linear of block 0, B at a tenth of the weights' spread."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("layers.0."):
            std = float(mod.weight.detach().float().std())
            out[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, mod.in_features, generator=g)
                                                        / mod.in_features ** 0.5).to(torch.bfloat16)
            out[f"transformer.{name}.lora_B.weight"] = (torch.randn(mod.out_features, rank, generator=g)
                                                        * 0.1 * std).to(torch.bfloat16)
    return out


# q/k/v/out, w1/w3, w2. The adaLN modulation (512 -> 18432) runs on one row per sample (the
# timestep conditioning is (B, 1, 512)), so its branch costs next to nothing and is left out here.
LINEARS = ((4608, 4608), (4608, 12288), (12288, 4608))


def per_linear(seq: int, ranks: list[int], reps: int, clock) -> list[dict]:
    """One linear at each block shape: the W8A8 op alone and its `fxquant::lora` branch alone
    (bf16, best of ``reps``), so the branch's share is read without the whole block's noise."""
    from fxquant.ops.w8a8 import quantize_weight_per_channel

    rows = []
    for k, n in LINEARS:
        x = torch.randn(seq, k, dtype=torch.bfloat16)
        wq, ws = quantize_weight_per_channel(torch.randn(n, k) / k ** 0.5)
        y = torch.ops.fxquant.linear_w8a8(x, wq, ws, None, None)
        scale = torch.tensor(1.0)
        fns = {"w8a8": lambda: torch.ops.fxquant.linear_w8a8(x, wq, ws, None, None)}
        for r in ranks:
            down, up = torch.randn(r, k, dtype=torch.bfloat16), torch.randn(n, r, dtype=torch.bfloat16)
            fns[f"lora r{r}"] = (lambda d=down, u=up: torch.ops.fxquant.lora(y, x, d, u, scale, 1.0))
        best = {name: float("inf") for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t = clock()
                fn()
                best[name] = min(best[name], clock() - t)
        rows.append(dict(tokens=seq, in_features=k, out_features=n, **{f"{name}_ms": 1e3 * v for name, v in best.items()}))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--warmup", type=int, default=0, help="rounds not timed (one untimed call per variant always runs)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="also time the bf16 float model")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "lora_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load0 = os.getloadavg()
    machine = dict(clock=args.clock, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                   cpu_capability=torch.backends.cpu.get_cpu_capability(), python=platform.python_version(),
                   loadavg_start=load0, shared_machine=True)
    print(f"machine: {machine}", flush=True)
    model = build_model(1, torch.bfloat16)
    ex0 = inputs(args.seq[0], torch.bfloat16)
    t = time.perf_counter()
    base = fxquant.compile(model, "w8a8-naive", calibration=[ex0])
    compile_s = time.perf_counter() - t
    variants = {"bf16 eager": model, "w8a8": base} if args.bf16 else {"w8a8": base}
    apply_ms, remove_ms = {}, {}
    for r in args.ranks:
        lora = block_lora(model, r)
        gm = copy.deepcopy(base)
        t = time.perf_counter()
        fxquant.apply_lora(gm, lora, name="bench")
        apply_ms[r] = 1e3 * (time.perf_counter() - t)
        probe = copy.deepcopy(gm)
        t = time.perf_counter()
        fxquant.remove_lora(probe, "bench")
        remove_ms[r] = 1e3 * (time.perf_counter() - t)
        variants[f"w8a8 + LoRA r{r}"] = gm
    print(f"compile w8a8: {compile_s:.1f} s; apply_lora: " + ", ".join(f"r{r} {v:.0f} ms" for r, v in apply_ms.items())
          + "; remove_lora: " + ", ".join(f"r{r} {v:.0f} ms" for r, v in remove_ms.items()), flush=True)

    linears = []
    for seq in args.seq:
        linears += per_linear(seq, args.ranks, 2 * args.reps, clock)
    print(f"\none linear, bf16, best of {2 * args.reps} (ms): the W8A8 op and the LoRA branch op alone")
    print(f"  {'tokens x in -> out':24}{'w8a8':>10}" + "".join(f"{'lora r' + str(r):>10}{'share':>8}" for r in args.ranks))
    for row in linears:
        cells = "".join(f"{row[f'lora r{r}_ms']:10.2f}{row[f'lora r{r}_ms'] / row['w8a8_ms']:8.3f}" for r in args.ranks)
        print(f"  {row['tokens']:5d} x {row['in_features']:5d} -> {row['out_features']:5d}  {row['w8a8_ms']:10.2f}{cells}",
              flush=True)

    results = []
    for seq in args.seq:
        ex = inputs(seq, torch.bfloat16)
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.no_grad():
            outs = {k: sample(m(**ex)).float() for k, m in variants.items()}
            for i in range(args.warmup + args.reps):
                for name, m in variants.items():
                    t = clock()
                    m(**ex)
                    if i >= args.warmup:
                        times[name].append(clock() - t)
        best = {k: min(v) for k, v in times.items()}
        print(f"\n{seq} tokens ({args.reps} rounds, best / median ms; overhead vs w8a8 from the best round):")
        print(f"  {'variant':20}{'best':>10}{'median':>10}{'vs w8a8':>10}{'median vs':>10}{'change vs w8a8 out':>20}")
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            change = float((outs[k] - outs["w8a8"]).norm() / outs["w8a8"].norm())
            print(f"  {k:20}{1e3 * best[k]:10.1f}{1e3 * med[k]:10.1f}{best[k] / best['w8a8']:10.3f}"
                  f"{med[k] / med['w8a8']:10.3f}{change:20.4f}", flush=True)
        results.append(dict(tokens=seq, times_s=times, best_s=best,
                            overhead_vs_w8a8={k: best[k] / best["w8a8"] for k in best},
                            median_overhead_vs_w8a8={k: med[k] / med["w8a8"] for k in med}))
    machine["loadavg_end"] = os.getloadavg()
    print(f"\nload average start {load0}, end {machine['loadavg_end']} (shared machine: other processes ran too)")
    out = dict(machine=machine, compile_s=compile_s, apply_lora_ms=apply_ms, remove_lora_ms=remove_ms,
               ranks=args.ranks, per_linear=linears, results=results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, json.dumps(out, indent=1).encode(), "bench_lora")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
