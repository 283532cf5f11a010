"""Protection ladder on a reduced Ideogram 4: output error vs the number of fragile linears kept float.

    .venv/bin/python bench/ladder.py                       # 4 layers, writes bench/results/ladder.json
    .venv/bin/python bench/ladder.py --layers 2 --out /tmp/ladder.json --report /tmp/ladder_report

Two models, both seeded (nothing downloaded, nothing fitted):

- ``seeded``:  `fxquant.models.reduced_ideogram4` as built.
- ``planted``: the same weights with planted outliers: in every block, rows {3, 11} of
  ``feed_forward.w3`` times ``--gain`` and the matching input columns of ``feed_forward.w2``
  divided by it (exactly function-preserving: w3 enters the SwiGLU product linearly), and the
  same for ``t_embedding.mlp_in`` -> ``mlp_out`` (only roughly so: a SiLU sits between). The
  inputs of the w2s and of the time-embedding output carry a few huge channels: the paper's
  protected set, by construction. The planted model is itself the float reference.

Two recipes: ``protect-only`` (W8A8 with top-k protection, no SmoothQuant) and the
``int8-w8a8-paper`` preset (SmoothQuant, plus ``t_embedding.mlp_out`` by rule at every k). Each
ladder is climbed twice: by the paper's fragility ranking and by the measured sensitivity ranking
(``score_sensitivity``); the table gives Spearman's rho between the two rankings, the knee and the
share of linear weight bytes kept in float at the knee.
Calibration: a 6-step trajectory; evaluation: 3 held-out inputs (other seeds and timesteps).
Error: `fxquant.protection_ladder`'s pooled relative L2 error of every output vs the float model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import fxquant
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4

KW = dict(batch=1, text_len=8, image_hw=(4, 4))
RECIPES = {
    "protect-only": fxquant.Recipe(name="protect-only"),
    "int8-w8a8-paper": fxquant.Recipe.preset("int8-w8a8-paper"),
}


def planted(model: torch.nn.Module, gain: float, rows=(3, 11)) -> torch.nn.Module:
    pairs = [(f"layers.{i}.feed_forward.w3", f"layers.{i}.feed_forward.w2") for i in range(len(model.layers))]
    pairs.append(("t_embedding.mlp_in", "t_embedding.mlp_out"))
    with torch.no_grad():
        for producer, consumer in pairs:
            p, c = model.get_submodule(producer), model.get_submodule(consumer)
            p.weight[list(rows)] *= gain
            if p.bias is not None:
                p.bias[list(rows)] *= gain
            c.weight[:, list(rows)] /= gain
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gain", type=float, default=100.0)
    ap.add_argument("--out", default="bench/results/ladder.json")
    ap.add_argument("--report", default="bench/results/ladder_report", help="directory for fxquant.report")
    ap.add_argument("--models", nargs="+", default=["seeded", "planted"], choices=["seeded", "planted"])
    a = ap.parse_args()

    calib = ideogram4_trajectory(steps=6, seed=10, **KW)
    held_out = [ideogram4_inputs(timestep=t, seed=90 + i, **KW) for i, t in enumerate((0.15, 0.5, 0.85))]
    n = 8 * a.layers + 7
    ks = sorted({0, 1, 2, 3, 4, 5, 6, 8, 12, 16, n // 2, n})
    results, ladders = [], {}
    print(f"reduced Ideogram 4, {a.layers} layers, {n} linears; gain {a.gain:g}; ks {ks}")
    print(f"{'model':8} {'recipe':15} {'by':11} {'rho':>6} {'rho s/f':>7} {'knee':>4} {'float%':>6}  "
          + " ".join(f"k={k:<5}" for k in ks))
    for model_name in a.models:
        for recipe_name, recipe in RECIPES.items():
            for by in ("fragility", "sensitivity"):
                model = reduced_ideogram4(seed=1, num_layers=a.layers)
                if model_name == "planted":
                    planted(model, a.gain)
                t0 = time.perf_counter()
                lad = fxquant.protection_ladder(model, ks, calib, held_out, recipe=recipe, by=by)
                secs = time.perf_counter() - t0
                ladders[(model_name, recipe_name, by)] = lad
                knee = lad.knee()
                frac = next((p.float_fraction for p in lad.points if p.k == knee), None)
                print(f"{model_name:8} {recipe_name:15} {by:11} {lad.spearman_rho:6.3f} {lad.spearman_rankings:7.3f} "
                      f"{'-' if knee is None else knee:>4} {'-' if frac is None else f'{100 * frac:.1f}':>6}  "
                      + " ".join(f"{p.rel_error:.5f}" for p in lad.points))
                results.append({"model": model_name, "recipe": recipe_name, "seconds": round(secs, 1), **lad.to_json()})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"layers": a.layers, "gain": a.gain, "ks": ks, "ladders": results,
                               "loadavg": os.getloadavg()}, indent=2))
    print(f"wrote {out}")
    if a.report and "planted" in a.models:
        # The report of the planted model compiled with a 5 % float budget by sensitivity, both protect-only ladders.
        lads = [ladders[("planted", "protect-only", by)] for by in ("fragility", "sensitivity")]
        model = planted(reduced_ideogram4(seed=1, num_layers=a.layers), a.gain)
        recipe = fxquant.Recipe(name="protect-by-sensitivity", protect_by="sensitivity", protect_budget=0.05)
        gm = fxquant.compile(model, recipe, calibration=calib)
        files = fxquant.report(gm, a.report, ladder=lads)
        print("wrote " + ", ".join(files.values()))


if __name__ == "__main__":
    main()
