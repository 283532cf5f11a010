"""Measured-sensitivity protection and GPTQ rounding against the paper's recipe and torchao, on planted
reduced Ideogram 4 models, both CFG branches, per step and over an 8-step CFG trajectory.

    .venv/bin/python bench/sensitivity_ablation.py                  # 3 cases x 3 seeds, ~25 min on the shared machine
    .venv/bin/python bench/sensitivity_ablation.py --cases moving --seeds 1
    # one process per case, then: --merge bench/results/sensitivity_{channel,massive,moving}.json

Models: per seed, a conditional and an unconditional reduced Ideogram 4 (4 layers; the
unconditional one has other seeded weights and reads a fixed "empty prompt"), each planted with
`quality_ablation.plant_outliers` and, for the third case, outliers that move with the timestep:

* ``channel``: channel-consistent outliers x20 (SmoothQuant's case), exact reparametrisations.
* ``massive``: massive activations x300 (protection's case), pairs cancelling in float.
* ``moving``: both of the above, plus in every block four channels of the SwiGLU input whose adaLN
  scale ``1 + scale_mlp`` grows to ``1 + 20`` over the trajectory (two grow with t, two shrink):
  rows of ``adaln_modulation`` set to 20 x a linear read-out of t from the adaLN input (fitted on
  33 timesteps), the ``w1``/``w3`` columns divided by 11. Not a reparametrisation: the planted
  model is the reference.

Calibration: each branch's inputs along a 6-step float CFG run (noise seed 500 + seed, timesteps
(k + 0.5)/6). Evaluation, from another noise (seed 900 + seed), 8 Euler steps of flow matching
(t = i/8, guidance 4, v = v_u + 4 (v_c - v_u)), image tokens only:

* per-step error: relative L2 of each branch's velocity against the float branch on the float
  trajectory's inputs, mean over steps, branches (and seeds in the table);
* trajectory PSNR: the 8-step CFG trajectory run entirely by the variant, final latents against the
  float trajectory's, ``20 log10((max - min) / rmse)`` with max/min of the float latents.

Variants: bf16 autocast (the float model under ``torch.autocast("cpu", bfloat16)``), fxquant naive
W8A8, torchao int8 dynamic (``Int8DynamicActivationInt8WeightConfig`` on every linear), torchao's own
SmoothQuant (``torchao.prototype.smoothquant.SmoothQuantConfig`` over that config, alpha 0.5,
calibrated on the same inputs) alone and with the paper recipe's protected set left in float, the
paper's recipe (SmoothQuant + fragility top-k, as in ``quality_ablation``), SmoothQuant + measured
sensitivity under a 5 % float budget, SmoothQuant + GPTQ, and both. Float fraction: bytes of linear
weights left in float over all linear weight bytes (mean of the branches); ``full`` is the same
linears' share of the full-size Ideogram 4 (34 layers, meta device). Compile time: both branches,
the recipe's passes (`fxquant.pipeline.build`, what ``fxquant.compile`` runs) on a copy of the
branch traced once (the trace, ~same for every recipe, is recorded apart as ``trace_s``); for
torchao, ``quantize_`` plus its calibration pass. Writes
``bench/results/sensitivity.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fxquant
from fxquant import meta, pipeline
from fxquant.trace import trace
from fxquant.models import IDEOGRAM4_FULL, IMAGE_INDICATOR, ideogram4_inputs, reduced_ideogram4
from quality_ablation import massive_blocks, plant_outliers

CASES = {"channel": (20.0, 0.0, False), "massive": (1.0, 300.0, False), "moving": (20.0, 300.0, True)}
LAYERS, STEPS, CALIB_STEPS, GUIDANCE, MOVE = 4, 8, 6, 4.0, 20.0
PAPER = fxquant.Recipe.preset("int8-w8a8-paper").replace(
    name="paper", protect_top_k=len(massive_blocks(LAYERS)) + 1, protect_reference_linears=0)
SQ = PAPER.replace(name="sq", protect_top_k=0, protect=())
SENS = SQ.replace(name="sq+sensitivity", protect_by="sensitivity", protect_budget=0.05)
FXQ = {"fxquant naive W8A8": fxquant.Recipe(name="naive"), "paper (SQ + fragility top-k)": PAPER,
       "SQ + sensitivity 5%": SENS, "SQ + GPTQ": SQ.replace(name="sq+gptq", gptq=True),
       "SQ + sensitivity 5% + GPTQ": SENS.replace(name="sq+sensitivity+gptq", gptq=True)}


def plant_moving(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Four SwiGLU-input channels per block whose adaLN scale moves with t (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    hook = model.layers[0].adaln_modulation.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    ts = torch.linspace(0, 1, 33)
    with torch.no_grad():
        model(**ideogram4_inputs(batch=33, text_len=2, image_hw=(1, 1), timestep=0.0) | {"timestep": ts})
    hook.remove()
    c = seen[0].reshape(33, -1)
    a = torch.cat([c, torch.ones(33, 1)], 1)
    coef = torch.linalg.solve(a.T @ a + 1e-3 * torch.eye(a.shape[1]), a.T @ ts)  # t ~ c @ w + b (ridge)
    w, b = coef[:-1], coef[-1]
    with torch.no_grad():
        for block in model.layers:
            hidden = block.ffn_norm1.weight.numel()
            idx = torch.randperm(hidden, generator=g)[:4]
            for k, j in enumerate(idx.tolist()):
                row = 2 * hidden + j  # scale_mlp is chunk 2 of 4
                up = k % 2 == 0  # 1 + m = 1 + MOVE * t, or 1 + MOVE * (1 - t)
                block.adaln_modulation.weight[row] = MOVE * (w if up else -w)
                block.adaln_modulation.bias[row] = MOVE * (b if up else 1 - b)
            for lin in (block.feed_forward.w1, block.feed_forward.w3):
                lin.weight[:, idx] /= 1 + MOVE / 2
    return model


def branch_models(seed: int, case: str) -> dict[str, torch.nn.Module]:
    factor, massive, moving = CASES[case]
    out = {}
    for name, s in (("cond", seed), ("uncond", seed + 50)):
        m = plant_outliers(reduced_ideogram4(seed=s, num_layers=LAYERS), 4, factor, massive, s)
        out[name] = plant_moving(m, s) if moving else m
    return out


def cfg_run(fns: dict[str, Callable], noise_seed: int, ts: list[float], record: bool = False):
    """Euler flow-matching CFG from noise; returns (final latents, per-step inputs per branch)."""
    base = ideogram4_inputs(batch=2, text_len=8, image_hw=(6, 6), timestep=0.0, seed=noise_seed)
    empty = ideogram4_inputs(batch=2, text_len=8, image_hw=(6, 6), timestep=0.0, seed=7)["encoder_hidden_states"]
    img = (base["indicator"] == IMAGE_INDICATOR).unsqueeze(-1)
    x, steps = base["hidden_states"].clone(), []
    for i, t in enumerate(ts):
        dt = (ts[i + 1] if i + 1 < len(ts) else 1.0) - t
        ex = {**base, "hidden_states": x.clone(), "timestep": torch.full((2,), t)}
        exs = {"cond": ex, "uncond": {**ex, "encoder_hidden_states": empty}}
        with torch.no_grad():
            v = {k: fns[k](**exs[k]).sample for k in ("cond", "uncond")}
        steps.append(exs)
        x = torch.where(img, x + dt * (v["uncond"] + GUIDANCE * (v["cond"] - v["uncond"])), x)
    return x[img.expand_as(x)], steps


def rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.unsqueeze(-1)
    return float(((a - b) * m).double().norm() / (b * m).double().norm())


def compile_traced(gm: torch.fx.GraphModule, recipe: fxquant.Recipe, calib: list, branch: str) -> torch.fx.GraphModule:
    """``fxquant.compile``'s passes (`fxquant.pipeline.build`) on a copy of an already traced branch."""
    gm = copy.deepcopy(gm)
    meta.set_graph_record(gm, meta.GraphRecord(recipe=recipe.to_dict(), branch=branch))
    with torch.no_grad():
        return pipeline.run(gm, pipeline.build(recipe, calib, branch))


def torchao_variant(models, calib, protect: set[str] | None, smooth: bool):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.prototype.smoothquant import SmoothQuantConfig
    from torchao.quantization.quantize_.common.quantization_step import QuantizationStep

    out = {}
    for k, model in models.items():
        m = copy.deepcopy(model)
        keep = protect.get(k, set()) if protect else set()
        pick = lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn not in keep  # noqa: E731
        if not smooth:
            quantize_(m, Int8DynamicActivationInt8WeightConfig(), filter_fn=pick)
        else:
            quantize_(m, SmoothQuantConfig(Int8DynamicActivationInt8WeightConfig(), step=QuantizationStep.PREPARE), filter_fn=pick)
            with torch.no_grad():
                for ex in calib[k]:
                    m(**ex)
            quantize_(m, SmoothQuantConfig(Int8DynamicActivationInt8WeightConfig(), step=QuantizationStep.CONVERT),
                      filter_fn=lambda mod, fqn: type(mod).__name__ == "SmoothQuantObservedLinear")
        out[k] = (m, sorted(keep))
    return out


def full_size_bytes() -> dict[str, int]:
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4Transformer2DModel
    with torch.device("meta"):
        full = Ideogram4Transformer2DModel(**IDEOGRAM4_FULL)
    return {n: m.weight.numel() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}


def run_case(case: str, seed: int, full: dict[str, int]) -> dict[str, Any]:
    models = branch_models(seed, case)
    calib_ts = [(k + 0.5) / CALIB_STEPS for k in range(CALIB_STEPS)]
    _, cal_steps = cfg_run(models, 500 + seed, calib_ts)
    calib = {k: [s[k] for s in cal_steps] for k in models}
    ts = [i / STEPS for i in range(STEPS)]
    ref_final, ref_steps = cfg_run(models, 900 + seed, ts)
    with torch.no_grad():
        ref_v = [{k: models[k](**s[k]).sample for k in models} for s in ref_steps]
    lin_bytes = {k: {n: mm.weight.numel() * mm.weight.element_size() for n, mm in m.named_modules()
                     if isinstance(mm, torch.nn.Linear)} for k, m in models.items()}
    variants: dict[str, tuple[dict[str, Callable], list[str] | dict, float]] = {}

    def autocast(m):
        def f(**kw):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(**kw)
        return f
    variants["bf16 autocast"] = ({k: autocast(m) for k, m in models.items()}, {k: [] for k in models}, 0.0)
    protected_paper = {}
    traced, trace_s = {}, {}
    for k, m in models.items():  # traced once per branch; every recipe's passes run on a copy
        t0 = time.perf_counter()
        traced[k] = trace(m, calib[k][0])
        trace_s[k] = time.perf_counter() - t0
    for name, recipe in FXQ.items():
        t0 = time.perf_counter()
        gms = {k: compile_traced(traced[k], recipe, calib[k], k) for k in models}
        dt = time.perf_counter() - t0
        kept = {k: [r.name for r in fxquant.summary(g).rows if r.scheme != "w8a8"] for k, g in gms.items()}
        variants[name] = (gms, kept, dt)
        if recipe is PAPER:
            protected_paper = {k: set(v) for k, v in kept.items()}
    for ao_name, prot, smooth in (("torchao int8 dynamic", False, False), ("torchao SmoothQuant", False, True),
                                  ("torchao SmoothQuant + protection", True, True)):
        t0 = time.perf_counter()
        res = torchao_variant(models, calib, protected_paper if prot else None, smooth)
        variants[ao_name] = ({k: v[0] for k, v in res.items()}, {k: v[1] for k, v in res.items()}, time.perf_counter() - t0)

    rows = {}
    for name, (fns, kept, secs) in variants.items():
        per_step = []
        for s, rv in zip(ref_steps, ref_v):
            with torch.no_grad():
                per_step.append({k: rel(fns[k](**s[k]).sample, rv[k], s[k]["indicator"] == IMAGE_INDICATOR) for k in models})
        final, _ = cfg_run(fns, 900 + seed, ts)
        rmse = float((final - ref_final).double().pow(2).mean().sqrt())
        peak = float(ref_final.max() - ref_final.min())
        frac = sum(sum(lin_bytes[k][n] for n in kept[k]) / sum(lin_bytes[k].values()) for k in models) / len(models)
        full_frac = sum(full.get(n, 0) for n in kept["cond"]) / sum(full.values())
        rows[name] = {"per_step": per_step, "mean": sum(v for d in per_step for v in d.values()) / (2 * len(per_step)),
                      "psnr": 20 * math.log10(peak / rmse) if rmse > 0 else math.inf, "float_fraction": frac,
                      "full_size_fraction": full_frac, "kept_float": kept, "compile_s": secs}
    return {"case": case, "seed": seed, "variants": rows, "trace_s": trace_s,
            "analysis": analysis(models["cond"], calib["cond"])}


def analysis(model, calib) -> dict[str, Any]:
    """Both rankings on the cond branch (SmoothQuant simulated) and their agreement."""
    from fxquant import meta
    from fxquant.passes.collect_stats import CollectStats
    from fxquant.passes.find_linears import FindLinears
    from fxquant.passes.score_fragility import ScoreFragility, spearman
    from fxquant.passes.score_sensitivity import ScoreSensitivity
    from fxquant.trace import trace

    gm = trace(model, calib[0])
    meta.set_graph_record(gm, meta.GraphRecord(recipe={}))
    sens = ScoreSensitivity(calib, 2, 0.5)
    for p in (FindLinears(), CollectStats(calib), ScoreFragility(), sens):
        p(gm)
    recs = [r for _, r in meta.records(gm)]
    err, frag, local = ([r.sensitivity.error for r in recs], [r.fragility.score for r in recs],
                        [r.sensitivity.local for r in recs])
    return {"spearman_sensitivity_fragility": spearman(err, frag), "spearman_sensitivity_local": spearman(err, local),
            "sensitivity_forwards": sens.forwards, "sensitivity_seconds": sens.seconds,
            "by_sensitivity": [r.key for r in sorted(recs, key=lambda r: r.sensitivity.rank)][:8],
            "by_fragility": [r.key for r in sorted(recs, key=lambda r: r.fragility.rank)][:8]}


def tables(runs: list[dict[str, Any]], cases: list[str]) -> dict[str, Any]:
    """Print one table per case (means over seeds); return the summary."""
    names = list(runs[0]["variants"])
    summary: dict[str, Any] = {}
    for case in cases:
        rs = [r for r in runs if r["case"] == case]
        print(f"\ncase {case} ({len(rs)} seeds): rel. L2 per step (mean over 8 steps, 2 branches, seeds), 8-step CFG PSNR")
        print(f"{'variant':34} {'mean rel L2':>11} {'per seed':>26} {'PSNR dB':>8} {'float %':>8} {'full %':>7} {'compile s':>9}")
        summary[case] = {}
        for n in names:
            v = [r["variants"][n] for r in rs]
            row = {k: sum(x[k] for x in v) / len(v) for k in ("mean", "psnr", "float_fraction", "full_size_fraction", "compile_s")}
            summary[case][n] = row
            seeds = " ".join(f"{x['mean']:.5f}" for x in v)
            print(f"{n:34} {row['mean']:11.5f} {seeds:>26} {row['psnr']:8.2f} "
                  f"{100 * row['float_fraction']:8.2f} {100 * row['full_size_fraction']:7.2f} {row['compile_s']:9.1f}")
        for r in rs:
            a = r["analysis"]
            print(f"seed {r['seed']}: Spearman(sensitivity, fragility) {a['spearman_sensitivity_fragility']:.3f}, "
                  f"(sensitivity, local proxy) {a['spearman_sensitivity_local']:.3f}; top by sensitivity {a['by_sensitivity'][:5]}")
    return summary


def write(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--merge", type=Path, nargs="+", help="combine the JSON of earlier runs (e.g. one per case) into --out")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sensitivity.json")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        runs = [r for p in parts for r in p["runs"]]
        cases = list(dict.fromkeys(r["case"] for r in runs))
        result = {**parts[0], "command": " + ".join(p["command"] for p in parts), "runs": runs,
                  "seconds": sum(p["seconds"] for p in parts), "summary": tables(runs, cases),
                  "loadavg_start": [p["loadavg_start"] for p in parts], "loadavg_end": [p["loadavg_end"] for p in parts]}
        write(args.out, result)
        print(f"wrote {args.out}")
        return
    t0, load0 = time.perf_counter(), os.getloadavg()
    full = full_size_bytes()
    runs = [run_case(c, s, full) for c in args.cases for s in args.seeds]
    result = {"command": "bench/sensitivity_ablation.py --cases " + " ".join(args.cases) + " --seeds " + " ".join(map(str, args.seeds)),
              "summary": tables(runs, args.cases), "runs": runs, "seconds": round(time.perf_counter() - t0, 1),
              "loadavg_start": load0, "loadavg_end": os.getloadavg(), "torch": torch.__version__,
              "recipes": {k: r.to_dict() for k, r in FXQ.items()}}
    write(args.out, result)
    print(f"wrote {args.out} in {result['seconds']} s, load average {load0} -> {result['loadavg_end']}")


if __name__ == "__main__":
    main()
