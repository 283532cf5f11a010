"""W8A8 speed on CPU: fxquant's lowered module next to fp32 eager, bf16 eager and torchao, in one run.

    .venv/bin/python bench/bench_w8a8.py                      # default: 1 block, 256 and 1024 tokens
    .venv/bin/python bench/bench_w8a8.py --layers 2 --no-compile
    .venv/bin/python bench/bench_w8a8.py --profile            # + where the time goes (torch.profiler)

What is timed: the whole `Ideogram4Transformer2DModel` (embedders, ``--layers`` blocks, final layer)
at Ideogram 4's real widths (hidden 4608 = 18 heads x 256, SwiGLU 12288, adaLN 512), seeded random
weights, batch 1, a packed sequence of 64 text + image tokens. Only the LLM feature width is cut
(53248 -> 512): that one projection is not part of a block. Variants:

    fp32 eager         the float model
    bf16 eager         the same model cast to bfloat16 (the baseline)
    torchao int8 dyn   quantize_(copy of bf16, Int8DynamicActivationInt8WeightConfig()), eager
    fxquant w8a8       fxquant.compile(bf16 model, "w8a8-naive"), eager
    bf16 + torch.compile           the bf16 model under torch.compile (inductor)   } skip with
    fxquant w8a8 + torch.compile   the lowered module under torch.compile          } --no-compile

Every linear of the model is quantized by both int8 variants (torchao's filter and the recipe both
take all of them). Calls are interleaved round-robin, so load from other processes falls on all
variants alike; the table shows the best and the median time over ``--reps`` rounds after
``--warmup``, and the ratios to bf16 and fp32 eager from the best round. Best, not median: on a
shared machine, quiet and busy phases last several rounds, and the best round is the one that
measured the code rather than the neighbours (the JSON keeps every time and the median ratios).
The same run measures `torch._int_mm` and a bf16 matmul at the block's linear shapes for context,
and one linear stage by stage (quantize, `_int_mm`, rescale) in the op's first, unsliced form next
to the sliced op that ships. Writes a table to stdout and JSON to ``bench/results/w8a8_cpu.json``.
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
from fxquant.models import IDEOGRAM4_FULL, ideogram4_inputs, reduced_ideogram4

TEXT_TOKENS = 64
LLM_DIM = 512
LINEAR_SHAPES = ((4608, 4608), (4608, 12288), (12288, 4608))  # (in, out): q/k/v/out, w1/w3, w2


def build_model(layers: int, dtype: torch.dtype) -> torch.nn.Module:
    cfg = {k: v for k, v in IDEOGRAM4_FULL.items() if k not in ("num_layers", "llm_features_dim")}
    return reduced_ideogram4(seed=0, dtype=dtype, num_layers=layers, llm_features_dim=LLM_DIM, **cfg)


def inputs(seq: int, dtype: torch.dtype) -> dict:
    img = seq - TEXT_TOKENS
    h = max(d for d in range(1, int(img ** 0.5) + 1) if img % d == 0)
    return ideogram4_inputs(batch=1, text_len=TEXT_TOKENS, image_hw=(h, img // h), timestep=0.5, seed=1,
                            in_channels=IDEOGRAM4_FULL["in_channels"], llm_features_dim=LLM_DIM, dtype=dtype)


def sample(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0]


def matmul_context(seqs: list[int], reps: int, clock) -> list[dict]:
    """GOP/s of `torch._int_mm` (int8 x int8 -> int32) and GFLOP/s of a bf16 linear, best of ``reps``."""
    rows = []
    for m in seqs:
        for k, n in LINEAR_SHAPES:
            a8, w8 = torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
            xb, wb = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
            best = {"int_mm": float("inf"), "bf16": float("inf")}
            for _ in range(reps + 1):
                for name, fn in (("int_mm", lambda: torch._int_mm(a8, w8.t())),
                                 ("bf16", lambda: torch.nn.functional.linear(xb, wb))):
                    t = clock()
                    fn()
                    best[name] = min(best[name], clock() - t)
            ops = 2 * m * k * n
            rows.append(dict(tokens=m, in_features=k, out_features=n, int_mm_gops=ops / best["int_mm"] / 1e9,
                             bf16_gflops=ops / best["bf16"] / 1e9))
    return rows


def unsliced_w8a8(x, wq, ws):
    """The op's first form, kept as the baseline of the stage table: every step on whole tensors."""
    xf = x.float()
    xs = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
    xq = torch.round(xf / xs).clamp(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, wq.t())
    return (acc.float() * xs * ws).to(x.dtype), (xq, xs, acc)


def stage_table(seqs: list[int], reps: int, clock) -> list[dict]:
    """Per linear shape: the unsliced op's three stages, the unsliced and sliced op, and bf16, best of ``reps``."""
    from fxquant.ops.w8a8 import quantize_weight_per_channel

    rows = []
    for m in seqs:
        for k, n in LINEAR_SHAPES:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            w = torch.randn(n, k) / k**0.5
            wq, ws = quantize_weight_per_channel(w)
            wb = w.to(torch.bfloat16)
            _, (xq, xs, acc) = unsliced_w8a8(x, wq, ws)

            def quantize():
                xf = x.float()
                scale = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
                return torch.round(xf / scale).clamp(-127, 127).to(torch.int8)

            fns = {
                "quantize": quantize,
                "int_mm": lambda: torch._int_mm(xq, wq.t()),
                "rescale": lambda: (acc.float() * xs * ws).to(x.dtype),
                "unsliced op": lambda: unsliced_w8a8(x, wq, ws),
                "fxquant op": lambda: torch.ops.fxquant.linear_w8a8(x, wq, ws, None, None),
                "bf16 linear": lambda: torch.nn.functional.linear(x, wb),
            }
            best = {name: float("inf") for name in fns}
            for _ in range(reps + 1):
                for name, fn in fns.items():
                    t = clock()
                    fn()
                    best[name] = min(best[name], clock() - t)
            rows.append(dict(tokens=m, in_features=k, out_features=n, **{f"{key}_ms": 1e3 * v for key, v in best.items()}))
    return rows


def time_round_robin(variants: dict, warmup: int, reps: int, clock) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for i in range(warmup + reps):
            for name, (fn, ex) in variants.items():
                t = clock()
                fn(**ex)
                dt = clock() - t
                if i >= warmup:
                    times[name].append(dt)
    return times


def profile(fn, ex: dict, rows: int = 14) -> tuple[str, list[dict]]:
    from torch.profiler import ProfilerActivity, profile as tprofile

    with torch.no_grad():
        fn(**ex)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            fn(**ex)
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avgs) or 1
    top = [dict(op=e.key, calls=e.count, self_ms=e.self_cpu_time_total / 1e3,
                share=e.self_cpu_time_total / total) for e in avgs[:rows]]
    text = "\n".join(f"    {r['op'][:44]:44} {r['calls']:5d} calls {r['self_ms']:9.1f} ms  {100 * r['share']:5.1f}%"
                     for r in top)
    return text, top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--profile", action="store_true", help="also profile bf16, torchao and fxquant eager")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, = cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, steadier on a loaded machine "
                        "(use with --threads 1: with more threads it also counts spin-waiting)")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "w8a8_cpu.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    import torchao
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    machine = dict(clock=args.clock, cpu=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                   cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                   torchao=torchao.__version__, python=platform.python_version(), loadavg_start=load0)
    print(f"machine: {machine}", flush=True)
    print("no CUDA device in this run" if not torch.cuda.is_available() else f"CUDA: {torch.cuda.get_device_name()}")

    context = matmul_context(args.seq, 3, clock)
    print("\nmatmul throughput at the block's linear shapes (best of 3):")
    for r in context:
        print(f"  {r['tokens']:5d} x {r['in_features']:5d} -> {r['out_features']:5d}:  _int_mm {r['int_mm_gops']:6.0f} GOP/s"
              f"   bf16 linear {r['bf16_gflops']:6.0f} GFLOP/s   ratio {r['int_mm_gops'] / r['bf16_gflops']:.2f}", flush=True)

    stages = stage_table(args.seq, 2, clock)
    print("\none linear, ms (best of 2): the unsliced op's stages, the unsliced op, fxquant's sliced op, bf16")
    cols = ("quantize", "int_mm", "rescale", "unsliced op", "fxquant op", "bf16 linear")
    print(f"  {'tokens x in -> out':22}" + "".join(f"{c:>13}" for c in cols))
    for r in stages:
        shape = f"{r['tokens']} x {r['in_features']} -> {r['out_features']}"
        print(f"  {shape:22}" + "".join(f"{r[c + '_ms']:13.1f}" for c in cols), flush=True)

    fp32 = build_model(args.layers, torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ao = copy.deepcopy(bf16)
    quantize_(ao, Int8DynamicActivationInt8WeightConfig())
    t = time.perf_counter()
    lowered = fxquant.compile(bf16, "w8a8-naive", calibration=[inputs(args.seq[0], torch.bfloat16)])
    lower_s = time.perf_counter() - t
    counts = fxquant.summary(lowered).counts()
    sd_mb = sum(v.numel() * v.element_size() for v in lowered.state_dict().values()) / 2**20
    bf16_mb = sum(v.numel() * v.element_size() for v in bf16.state_dict().values()) / 2**20
    print(f"\nfxquant.compile: {lower_s:.1f} s, linears {counts}; state dict {sd_mb:.0f} MiB (bf16 model {bf16_mb:.0f} MiB)")

    variants = {"fp32 eager": fp32, "bf16 eager": bf16, "torchao int8 dyn (eager)": ao, "fxquant w8a8 (eager)": lowered}
    compile_s = None
    if not args.no_compile:
        compile_s = {}
        for name, module in (("bf16 + torch.compile", bf16), ("fxquant w8a8 + torch.compile", lowered)):
            compiled = torch.compile(module, dynamic=False)
            t = time.perf_counter()
            with torch.no_grad():
                for s in args.seq:
                    compiled(**inputs(s, torch.bfloat16))
            compile_s[name] = time.perf_counter() - t
            print(f"{name}: compiled in {compile_s[name]:.0f} s for {len(args.seq)} shapes", flush=True)
            variants[name] = compiled

    results, profiles = [], {}
    for seq in args.seq:
        ex32, ex16 = inputs(seq, torch.float32), inputs(seq, torch.bfloat16)
        calls = {k: (m, ex32 if k.startswith("fp32") else ex16) for k, m in variants.items()}
        with torch.no_grad():
            ref = sample(fp32(**ex32)).double()
            err = {k: float((sample(m(**ex)).double() - ref).norm() / ref.norm()) for k, (m, ex) in calls.items()}
        times = time_round_robin(calls, args.warmup, args.reps, clock)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        for k in variants:
            results.append(dict(variant=k, tokens=seq, layers=args.layers, best_s=best[k], median_s=med[k],
                                times_s=times[k], rel_err_vs_fp32=err[k],
                                speedup_vs_bf16=best["bf16 eager"] / best[k], speedup_vs_fp32=best["fp32 eager"] / best[k],
                                median_speedup_vs_bf16=med["bf16 eager"] / med[k],
                                median_speedup_vs_fp32=med["fp32 eager"] / med[k]))
        if args.profile:
            for k in ("bf16 eager", "torchao int8 dyn (eager)", "fxquant w8a8 (eager)"):
                text, top = profile(variants[k], ex16)
                profiles[f"{k} @ {seq}"] = top
                print(f"\nprofile, {k}, {seq} tokens (self CPU time):\n{text}", flush=True)
        print(f"\n{seq} tokens done ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nIdeogram 4 transformer, {args.layers} block(s) at real widths, batch 1; {args.reps} rounds after "
          f"{args.warmup} warm-up, {torch.get_num_threads()} threads, {args.clock} clock; ratios from the best round")
    print(f"{'variant':30} {'tokens':>6} {'best ms':>8} {'median ms':>10} {'vs bf16':>8} {'vs fp32':>8} "
          f"{'rel err vs fp32':>16}")
    for r in results:
        print(f"{r['variant']:30} {r['tokens']:6d} {1e3 * r['best_s']:8.0f} {1e3 * r['median_s']:10.0f} "
              f"{r['speedup_vs_bf16']:7.2f}x {r['speedup_vs_fp32']:7.2f}x {r['rel_err_vs_fp32']:16.4f}")
    machine["loadavg_end"] = os.getloadavg()
    out = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=machine, layers=args.layers,
               warmup=args.warmup, reps=args.reps, fxquant_compile_s=lower_s, torch_compile_s=compile_s,
               linears=counts, state_dict_mib=dict(fxquant=sd_mb, bf16=bf16_mb), matmul=context, stages=stages,
               results=results, profiles=profiles, wall_s=time.perf_counter() - t0)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json} ({out['wall_s']:.0f} s)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
