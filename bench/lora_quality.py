"""Runtime LoRA vs merge-then-quantize on the reduced Ideogram 4: error against the float model
with the LoRA merged, and the time each takes to put a LoRA in place.

    .venv/bin/python bench/lora_quality.py                 # int8-w8a8 and q8_0, 3 LoRA seeds
    .venv/bin/python bench/lora_quality.py --recipes int8-w8a8 --seeds 0 1 2 3 4

Per recipe and LoRA seed:

    reference          float model with the LoRA merged (`fxquant.merge_lora`)
    quantized, no LoRA the compiled module as it is (how far from the reference without the LoRA)
    runtime LoRA       `fxquant.apply_lora` on the compiled module (int8 / GGUF weights unchanged)
    merged, quantized  `fxquant.compile(model, recipe, lora=...)`: merge, calibrate, quantize again

Error: relative L2 of the output (``sample``) against the reference, mean over held-out inputs
(other seeds and timesteps than calibration). Time to apply: `apply_lora` for the runtime path;
merge + calibration + compile for the merged path (the compiled module without LoRA exists
already in both cases). The LoRA is random, rank 16 on every linear of the blocks, scaled so
that each layer's ||scale * B A||_F is ``--delta`` times ||W||_F (0.1 by default; the
resulting change of the float output is printed). Writes bench/results/lora_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import fxquant
from fxquant.artifacts.common import atomic_write
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4


def realistic_lora(model: torch.nn.Module, rank: int, delta: float, seed: int) -> dict[str, torch.Tensor]:
    """Rank-``rank`` LoRA on every block linear with ||B A||_F = delta * ||W||_F per layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("layers."):
            a = torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5
            b = torch.randn(mod.out_features, rank, generator=g)
            b *= delta * float(mod.weight.detach().norm()) / float((b @ a).norm())
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = a, b
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def err(m, ref_outs, tests) -> float:
    with torch.no_grad():
        return statistics.mean(rel(m(**x).sample, r) for x, r in zip(tests, ref_outs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["int8-w8a8", "q8_0"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "lora_quality.json"))
    args = p.parse_args()
    load0 = os.getloadavg()
    model = reduced_ideogram4(seed=0)
    calib = ideogram4_trajectory(steps=4, seed=0)
    tests = [ideogram4_inputs(batch=2, text_len=8, image_hw=(4, 4), timestep=t, seed=100 + i)
             for i, t in enumerate((0.1, 0.4, 0.7, 0.9))]
    rows = []
    for recipe in args.recipes:
        gm = fxquant.compile(model, recipe, calibration=calib)
        for seed in args.seeds:
            lora = realistic_lora(model, args.rank, args.delta, seed)
            merged = fxquant.merge_lora(model, lora)
            with torch.no_grad():
                ref = [merged(**x).sample for x in tests]
                lora_effect = statistics.mean(rel(model(**x).sample, r) for x, r in zip(tests, ref))
            t = time.perf_counter()
            fxquant.apply_lora(gm, lora, name="lora")
            apply_s = time.perf_counter() - t
            runtime = err(gm, ref, tests)
            fxquant.remove_lora(gm, "lora")
            no_lora = err(gm, ref, tests)
            t = time.perf_counter()
            mq = fxquant.compile(model, recipe, calibration=calib, lora=lora)
            merge_s = time.perf_counter() - t
            merged_q = err(mq, ref, tests)
            row = dict(recipe=recipe, seed=seed, lora_effect=lora_effect, no_lora=no_lora, runtime=runtime,
                       merged_quantized=merged_q, runtime_apply_s=apply_s, merge_compile_s=merge_s)
            rows.append(row)
            print(f"{recipe:10} seed {seed}: LoRA changes float output by {lora_effect:.4f}; error vs reference: "
                  f"no LoRA {no_lora:.4f}, runtime {runtime:.4f}, merged+quantized {merged_q:.4f}; "
                  f"apply {1e3 * apply_s:.0f} ms vs merge+compile {merge_s:.1f} s", flush=True)
    print("\n| recipe | LoRA's effect on float output | quantized, no LoRA | runtime LoRA | merged, then quantized "
          "| time: apply_lora | time: merge + calibrate + compile |")
    print("|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        rs = [r for r in rows if r["recipe"] == recipe]

        def m(key: str) -> float:
            return statistics.mean(r[key] for r in rs)

        def span(key: str, fmt: str = "{:.4f}") -> str:
            vals = [r[key] for r in rs]
            return f"{fmt.format(m(key))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"

        print(f"| {recipe} | {span('lora_effect')} | {span('no_lora')} | {span('runtime')} | {span('merged_quantized')} "
              f"| {1e3 * m('runtime_apply_s'):.0f} ms | {m('merge_compile_s'):.1f} s |")
    out = dict(rows=rows, rank=args.rank, delta=args.delta, loadavg_start=load0, loadavg_end=os.getloadavg(),
               torch=torch.__version__, threads=torch.get_num_threads())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, json.dumps(out, indent=1).encode(), "lora_quality")
    print(f"\nload average start {load0}, end {out['loadavg_end']} (shared machine); wrote {args.json}")


if __name__ == "__main__":
    main()
