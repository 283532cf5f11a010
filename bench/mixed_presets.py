"""Mixed-precision presets against the pure ones on the project's quality benchmark.

    .venv/bin/python bench/mixed_presets.py                     # 3 seeds, 4 layers (~3 min, 2 cores)
    .venv/bin/python bench/mixed_presets.py --seeds 1 --out /tmp/m.json

The model is `bench/quality_ablation.py`'s planted reduced Ideogram 4 (channel-consistent outliers
x20 and paired massive activations x300, seeded random weights), at widths where Q4_K's 256-blocks
fit the attention and FFN linears (heads 4 x 64, FFN 512, 32 latent channels); the narrow linears
(input_proj 32, adaLN 64, llm_cond_proj 96, t-embedding 128) follow each preset's misaligned policy.
Protection uses the quality bench's k (one slot per linear fed by a massive activation, unscaled)
for every preset that protects, so the presets differ only in scheme:

    int8-w8a8-paper  w8a8 + SmoothQuant, protected linears float (the paper)
    int8-w8a8-q8  the same, protected linears Q8_0 (weight-only)
    q4_k_m        Q4_K, protected linears Q8_0, misaligned linears Q8_0 where 32 divides them, GPTQ codes
                  (q4_k_m-rtn: the same with llama.cpp's round-to-nearest codes; q8_0-gptq, q4_k-gptq: GPTQ
                  codes on the reference encoder's block scales, docs/gguf.md)

Error: relative L2 of the velocity on image tokens against the float model, mean over held-out
inputs (other seeds and timesteps than the calibration trajectory). Bytes: the linear weights as
stored (`fxquant.summary`), and the fraction of them kept in float. Table on stdout, JSON to
``bench/results/mixed_presets.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fxquant  # noqa: E402
from fxquant.models import ideogram4_inputs, reduced_ideogram4  # noqa: E402
from quality_ablation import HELD_OUT_TIMESTEPS, CALIB_TIMESTEPS, held_out_error, massive_blocks, plant_outliers  # noqa: E402

CFG = dict(attention_head_dim=64, num_attention_heads=4, intermediate_size=512, mrope_section=(12, 10, 10), in_channels=32)
PRESETS = ("w8a8-naive", "int8-w8a8-paper", "int8-w8a8-q8", "q8_0", "q8_0-gptq", "q4_k", "q4_k-gptq", "q4_k_m")


def recipes(layers: int) -> dict[str, fxquant.Recipe]:
    k = len(massive_blocks(layers)) + 1
    out = {}
    for name in PRESETS:
        r = fxquant.Recipe.preset(name)
        out[name] = r.replace(protect_top_k=k, protect_reference_linears=0) if r.protect_top_k else r
    out["q4_k_m-rtn"] = out["q4_k_m"].replace(name="q4_k_m-rtn", gptq=False)  # q4_k_m before it took GPTQ
    return out


def run(seed: int, layers: int) -> dict[str, dict[str, float]]:
    model = plant_outliers(reduced_ideogram4(seed=seed, num_layers=layers, **CFG), 4, 20.0, 300.0, seed)
    ts = torch.linspace(0.0, 1.0, CALIB_TIMESTEPS + 2)[1:-1].tolist()
    calibration = [ideogram4_inputs(timestep=t, seed=seed * 1000 + i, in_channels=32) for i, t in enumerate(ts)]
    held = [ideogram4_inputs(batch=2, text_len=8, image_hw=(6, 6), timestep=t, seed=10_000 + 100 * seed + i, in_channels=32)
            for i, t in enumerate(HELD_OUT_TIMESTEPS)]
    with torch.no_grad():
        refs = [model(**ex).sample for ex in held]
    out = {}
    for name, recipe in recipes(layers).items():
        t0 = time.perf_counter()
        gm = fxquant.compile(model, recipe, calibration=calibration)
        seconds = time.perf_counter() - t0
        s = fxquant.summary(gm)
        total = sum(r.weight_bytes for r in s)
        flt = sum(r.weight_bytes for r in s if r.scheme == "float")
        out[name] = {"error": held_out_error(gm, held, refs), "linear_bytes": total, "float_bytes": flt,
                     "counts": s.counts(), "compile_s": seconds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mixed_presets.json")
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()
    runs = {s: run(s, args.layers) for s in args.seeds}
    float_bytes = None
    print(f"reduced Ideogram 4 ({args.layers} layers, Q4_K-compatible widths), planted outliers x20 / massive x300; "
          f"rel. L2 error vs float on held-out inputs")
    head = f"{'preset':14} " + " ".join(f"seed {s:<4}" for s in args.seeds) + "      mean  linear KiB  in float  schemes (seed 1)"
    print(head)
    print("-" * len(head))
    table = {}
    for name in runs[args.seeds[0]]:
        errs = [runs[s][name]["error"] for s in args.seeds]
        first = runs[args.seeds[0]][name]
        mean = sum(errs) / len(errs)
        frac = first["float_bytes"] / first["linear_bytes"]
        table[name] = {"mean_error": mean, "errors": errs, "linear_bytes": first["linear_bytes"],
                       "float_fraction": frac, "counts": first["counts"],
                       "compile_s": sum(runs[s][name]["compile_s"] for s in args.seeds) / len(args.seeds)}
        print(f"{name:14} " + " ".join(f"{e:9.5f}" for e in errs) + f"  {mean:9.5f}  {first['linear_bytes'] / 1024:10.1f}"
              f"  {frac:7.1%}  {', '.join(f'{v} {k}' for k, v in sorted(first['counts'].items()))}")
    result = {"command": f"bench/mixed_presets.py --seeds {' '.join(map(str, args.seeds))} --layers {args.layers}",
              "metric": "relative L2 error of the velocity on image tokens vs float, mean over held-out inputs",
              "model": {**CFG, "num_layers": args.layers}, "recipes": {k: r.to_dict() for k, r in recipes(args.layers).items()},
              "presets": table, "seconds": round(time.perf_counter() - t0, 1), "loadavg_start": load0,
              "loadavg_end": os.getloadavg(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
