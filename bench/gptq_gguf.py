"""GPTQ rounding for the GGUF schemes (Q8_0, Q4_K, Q4_K_M) against llama.cpp's round-to-nearest
encoder, on the sensitivity benchmark's planted reduced Ideogram 4, both CFG branches, per step
and over an 8-step CFG trajectory.

    .venv/bin/python bench/gptq_gguf.py                       # 3 cases x 3 seeds, ~24 min on the shared 2-core machine
    .venv/bin/python bench/gptq_gguf.py --cases moving --seeds 1 --out /tmp/g.json

Models, calibration and evaluation are `bench/sensitivity_ablation.py`'s (its ``cfg_run``,
``plant_moving``, ``rel`` and cases: channel-consistent outliers, massive activations, both plus
outliers that move with t), at widths where Q4_K's 256-blocks fit every linear but
``input_proj`` (16 inputs) and ``llm_cond_proj`` (96): hidden 4 x 64, FFN 768, adaLN 256, 4
layers. Those two follow each preset's misaligned policy (``q4_k``: float; ``q4_k_m``: Q8_0).
``q4_k_m`` protects k = (linears fed by a planted massive activation) + 1 linears as Q8_0, as in
`bench/mixed_presets.py`. Each preset runs as is and with ``gptq=True`` (damp 0.01): same
scales, same bytes per weight, only the codes differ.

Per-step error: relative L2 of each branch's velocity (image tokens) against the float branch on
the float trajectory's inputs, mean over the 8 steps and both branches. Trajectory PSNR: the
8-step CFG run entirely by the variant, final latents against the float run's. Compile time: the
recipe's passes on a copy of the traced branch, both branches. Writes ``bench/results/gptq_gguf.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fxquant  # noqa: E402
from fxquant.models import IMAGE_INDICATOR, reduced_ideogram4  # noqa: E402
from fxquant.trace import trace  # noqa: E402
from quality_ablation import massive_blocks, plant_outliers  # noqa: E402
from sensitivity_ablation import CALIB_STEPS, CASES, LAYERS, STEPS, cfg_run, compile_traced, plant_moving, rel, write  # noqa: E402

CFG = dict(attention_head_dim=64, num_attention_heads=4, intermediate_size=768, adaln_dim=256, mrope_section=(12, 10, 10))
K = len(massive_blocks(LAYERS)) + 1


def presets() -> dict[str, fxquant.Recipe]:
    out = {}
    for name in ("q8_0", "q4_k", "q4_k_m"):
        r = fxquant.Recipe.preset(name)
        r = r.replace(protect_top_k=K, protect_reference_linears=0) if r.protect_top_k else r
        out[name] = r
        out[f"{name} + GPTQ"] = r.replace(name=f"{name}+gptq", gptq=True)
    return out


def branch_models(seed: int, case: str) -> dict[str, torch.nn.Module]:
    factor, massive, moving = CASES[case]
    out = {}
    for name, s in (("cond", seed), ("uncond", seed + 50)):
        m = plant_outliers(reduced_ideogram4(seed=s, num_layers=LAYERS, **CFG), 4, factor, massive, s)
        out[name] = plant_moving(m, s) if moving else m
    return out


def run_case(case: str, seed: int) -> dict[str, Any]:
    models = branch_models(seed, case)
    _, cal_steps = cfg_run(models, 500 + seed, [(k + 0.5) / CALIB_STEPS for k in range(CALIB_STEPS)])
    calib = {k: [s[k] for s in cal_steps] for k in models}
    ts = [i / STEPS for i in range(STEPS)]
    ref_final, ref_steps = cfg_run(models, 900 + seed, ts)
    with torch.no_grad():
        ref_v = [{k: models[k](**s[k]).sample for k in models} for s in ref_steps]
    traced = {k: trace(m, calib[k][0]) for k, m in models.items()}
    rows = {}
    for name, recipe in presets().items():
        t0 = time.perf_counter()
        gms = {k: compile_traced(traced[k], recipe, calib[k], k) for k in models}
        secs = time.perf_counter() - t0
        summ = {k: fxquant.summary(g).rows for k, g in gms.items()}
        per_step = []
        for s, rv in zip(ref_steps, ref_v):
            with torch.no_grad():
                per_step.append({k: rel(gms[k](**s[k]).sample, rv[k], s[k]["indicator"] == IMAGE_INDICATOR) for k in models})
        final, _ = cfg_run(gms, 900 + seed, ts)
        rmse = float((final - ref_final).double().pow(2).mean().sqrt())
        peak = float(ref_final.max() - ref_final.min())
        rows[name] = {"per_step": per_step, "mean": sum(v for d in per_step for v in d.values()) / (2 * len(per_step)),
                      "psnr": 20 * math.log10(peak / rmse) if rmse > 0 else math.inf, "compile_s": secs,
                      "linear_bytes": sum(r.weight_bytes for r in summ["cond"]),
                      "schemes": {sch: sum(r.scheme == sch for r in summ["cond"]) for sch in ("q4_k", "q8_0", "float")}}
    return {"case": case, "seed": seed, "variants": rows}


def tables(runs: list[dict[str, Any]], cases: list[str]) -> dict[str, Any]:
    names = list(runs[0]["variants"])
    summary: dict[str, Any] = {}
    for case in cases:
        rs = [r for r in runs if r["case"] == case]
        print(f"\ncase {case} ({len(rs)} seeds): rel. L2 per step (mean over 8 steps, 2 branches, seeds), 8-step CFG PSNR")
        print(f"{'variant':16} {'mean rel L2':>11} {'per seed':>26} {'GPTQ/RTN':>8} {'PSNR dB':>8} {'linear bytes':>12} {'compile s':>9}")
        summary[case] = {}
        for n in names:
            v = [r["variants"][n] for r in rs]
            row = {k: sum(x[k] for x in v) / len(v) for k in ("mean", "psnr", "compile_s", "linear_bytes")}
            base = n.replace(" + GPTQ", "")
            row["ratio_vs_rtn"] = sum(x["mean"] / r["variants"][base]["mean"] for x, r in zip(v, rs)) / len(v)
            summary[case][n] = row
            seeds = " ".join(f"{x['mean']:.5f}" for x in v)
            print(f"{n:16} {row['mean']:11.5f} {seeds:>26} {row['ratio_vs_rtn']:8.3f} {row['psnr']:8.2f} "
                  f"{row['linear_bytes']:12.0f} {row['compile_s']:9.1f}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gptq_gguf.json")
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()
    runs = [run_case(c, s) for c in args.cases for s in args.seeds]
    result = {"command": "bench/gptq_gguf.py --cases " + " ".join(args.cases) + " --seeds " + " ".join(map(str, args.seeds)),
              "model": f"reduced_ideogram4(num_layers={LAYERS}, {CFG}), planted", "summary": tables(runs, args.cases),
              "runs": runs, "seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load0,
              "loadavg_end": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "recipes": {k: r.to_dict() for k, r in presets().items()}}
    write(args.out, result)
    print(f"\nwrote {args.out} in {result['seconds']} s, load average {load0} -> {result['loadavg_end']}")


if __name__ == "__main__":
    main()
