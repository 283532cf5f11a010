"""Quality ablation: naive W8A8, SmoothQuant alone, top-k protection alone, and both, on a reduced
Ideogram 4 with planted activation outliers (the SmoothQuant + mixed-precision ablation of the paper).

    .venv/bin/python bench/quality_ablation.py                    # 3 model seeds, 4 layers, massive 1e5 and 1e3
    .venv/bin/python bench/quality_ablation.py --per-group        # + where SmoothQuant's remaining error comes from
    .venv/bin/python bench/quality_ablation.py --seeds 1 --massive 1e5 --out /tmp/q.json

Outliers: seeded random weights give activations without the few huge, token-consistent channels
trained DiTs have. We plant them by scaling a few channels of each block's ``attention_norm1`` and
``ffn_norm1`` weights (inputs of q/k/v and w1/w3), a few rows of ``to_v`` and ``w3`` (inputs of
``to_out`` and ``w2``) and of ``llm_cond_norm`` by ``--factor``, and the adaLN scale ``1 + b`` of a few
channels of the final layer (whose norm has no affine weight). These are channel-consistent:
SmoothQuant's job. In every other block one input channel of ``w2`` is made ``--massive`` times
larger and its weight column as much smaller (a massive activation on a near-zero weight, as in
trained transformers; the float function does not change). SmoothQuant at alpha = 0.5 would undo
such a channel exactly (s_j grows with the gain), but its vector is clamped to [1e-4, 1e4]
(`fxquant.smoothing.MAX_SCALE`): at gain 1e5 a residual ~10x outlier stays, which is what top-k
protection is for; at gain 1e3 SmoothQuant absorbs it entirely. Both gains are run. The planted
model is the float reference; nothing is fitted to it.

Each variant is compiled with ``fxquant.compile`` on a calibration trajectory and evaluated on
held-out inputs (other noise seeds, other timesteps). Error: relative L2 error of the velocity on
image tokens against the float model, averaged over the held-out inputs. Writes a table to stdout
and JSON to ``bench/results/quality.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

import fxquant
from fxquant.models import IMAGE_INDICATOR, ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4

PRESET = fxquant.Recipe.preset("int8-w8a8")
VARIANTS: dict[str, fxquant.Recipe] = {
    "naive W8A8": fxquant.Recipe(name="naive"),
    "SmoothQuant": PRESET.replace(name="smoothquant", protect_top_k=0, protect=()),
    "protection": PRESET.replace(name="protection", smoothquant=False),
    "SmoothQuant + protection": PRESET,
}
CALIB_TIMESTEPS = 6
HELD_OUT_TIMESTEPS = (0.05, 0.35, 0.65, 0.95)  # none of them is a calibration timestep (k/7)


def plant_outliers(model: torch.nn.Module, channels: int = 4, factor: float = 20.0, massive: float = 1e5,
                   seed: int = 0) -> torch.nn.Module:
    """A copy of a reduced Ideogram 4 whose linears see a few large, token-consistent input channels,
    and every other block's ``w2`` one massive channel on a tiny weight column."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)

    def bump(p: torch.Tensor) -> None:
        idx = torch.randperm(p.shape[0], generator=g)[:channels]
        p[idx] *= factor

    with torch.no_grad():
        bump(model.llm_cond_norm.weight)
        for i, block in enumerate(model.layers):
            bump(block.attention_norm1.weight)
            bump(block.ffn_norm1.weight)
            bump(block.attention.to_v.weight)
            bump(block.feed_forward.w3.weight)
            if i % 2 == 1 and massive > 1:
                # A massive activation on a near-zero weight column, as in trained transformers: the
                # float function is unchanged, but one input channel of w2 is `massive` times larger.
                j = int(torch.randint(block.feed_forward.w3.weight.shape[0], (1,), generator=g))
                block.feed_forward.w3.weight[j] *= massive
                block.feed_forward.w2.weight[:, j] /= massive
        # The final layer's norm has no affine: its outliers come from the adaLN scale, 1 + b.
        b = model.final_layer.adaln_modulation.bias
        idx = torch.randperm(b.shape[0], generator=g)[:channels]
        b[idx] = (1 + b[idx]) * factor - 1
    return model


def held_out_inputs(seed: int) -> list[dict[str, torch.Tensor]]:
    return [ideogram4_inputs(batch=2, text_len=8, image_hw=(6, 6), timestep=t, seed=10_000 + 100 * seed + i)
            for i, t in enumerate(HELD_OUT_TIMESTEPS)]


def image_error(out: torch.Tensor, ref: torch.Tensor, indicator: torch.Tensor) -> float:
    mask = (indicator == IMAGE_INDICATOR).unsqueeze(-1)
    d, r = (out - ref).float() * mask, ref.float() * mask
    return float(d.norm() / r.norm())


def ablation(seed: int = 1, layers: int = 4, channels: int = 4, factor: float = 20.0, massive: float = 1e5) -> dict[str, Any]:
    """Errors of every variant on one planted model. Calibration and held-out inputs are disjoint."""
    model = plant_outliers(reduced_ideogram4(seed=seed, num_layers=layers), channels, factor, massive, seed)
    calibration = ideogram4_trajectory(steps=CALIB_TIMESTEPS, seed=seed)
    held = held_out_inputs(seed)
    with torch.no_grad():
        refs = [model(**ex).sample for ex in held]
    errors: dict[str, float] = {}
    smoothing: dict[str, int] = {}
    protected: list[str] = []
    for name, recipe in VARIANTS.items():
        gm = fxquant.compile(model, recipe, calibration=calibration)
        with torch.no_grad():
            errs = [image_error(gm(**ex).sample, ref, ex["indicator"]) for ex, ref in zip(held, refs)]
        errors[name] = sum(errs) / len(errs)
        if recipe is PRESET:
            for row in fxquant.summary(gm).rows:
                smoothing[row.smoothing] = smoothing.get(row.smoothing, 0) + 1
                if row.scheme == "protected":
                    protected.append(row.name)
    return {"seed": seed, "layers": layers, "errors": errors, "smoothing_targets": smoothing, "protected": protected}


GROUPS = ("input_proj", "llm_cond_proj", "t_embedding.*", "adaln_proj", "layers.*.adaln_modulation",
          "layers.*.attention.to_[qkv]", "layers.*.attention.to_out.0", "layers.*.feed_forward.w[13]",
          "layers.*.feed_forward.w2", "final_layer.*")


def per_group(seed: int = 1, layers: int = 4, channels: int = 4, factor: float = 20.0, massive: float = 1e5) -> dict[str, float]:
    """Where the SmoothQuant-only error comes from: each group of linears quantized alone, the rest skipped."""
    model = plant_outliers(reduced_ideogram4(seed=seed, num_layers=layers), channels, factor, massive, seed)
    calibration, held = ideogram4_trajectory(steps=CALIB_TIMESTEPS, seed=seed), held_out_inputs(seed)
    with torch.no_grad():
        refs = [model(**ex).sample for ex in held]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    out = {}
    for pattern in GROUPS:
        rule = fxquant.LayerRule(pattern)
        skip = tuple(n for n in names if not rule.matches(n))
        gm = fxquant.compile(model, VARIANTS["SmoothQuant"].replace(name="one-group", skip=skip), calibration=calibration)
        with torch.no_grad():
            errs = [image_error(gm(**ex).sample, ref, ex["indicator"]) for ex, ref in zip(held, refs)]
        out[pattern] = sum(errs) / len(errs)
    return out


def ordered(errors: dict[str, float]) -> bool:
    """The paper's ablation order: naive worst, each technique alone better, both together best."""
    naive, sq, prot, both = (errors[k] for k in VARIANTS)
    return naive > sq and naive > prot and both < sq and both < prot


def table(runs: list[dict[str, Any]], title: str) -> dict[str, float]:
    """Print one configuration's table; return the mean error per variant."""
    mean = {k: sum(r["errors"][k] for r in runs) / len(runs) for k in VARIANTS}
    print(title)
    head = f"{'variant':26} " + " ".join(f"seed {r['seed']:<4}" for r in runs) + "      mean   vs naive"
    print(head)
    print("-" * len(head))
    for k in VARIANTS:
        cells = " ".join(f"{r['errors'][k]:9.5f}" for r in runs)
        print(f"{k:26} {cells}  {mean[k]:9.5f}   {mean[k] / mean['naive W8A8']:6.3f}")
    print(f"paper's ordering (naive > each alone > both) holds on every seed: {all(ordered(r['errors']) for r in runs)}")
    print(f"protected (int8-w8a8, seed {runs[0]['seed']}): {', '.join(runs[0]['protected'])}")
    print(f"smoothing targets (int8-w8a8, seed {runs[0]['seed']}): {runs[0]['smoothing_targets']}\n")
    return mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--channels", type=int, default=4, help="planted outlier channels per tensor")
    ap.add_argument("--factor", type=float, default=20.0, help="outlier channel gain")
    ap.add_argument("--massive", type=float, nargs="+", default=[1e5, 1e3],
                    help="gain(s) of one w2 input channel (its weight column divided by the gain) in every other block")
    ap.add_argument("--per-group", action="store_true",
                    help="also: SmoothQuant error with one group of linears quantized at a time (first seed, each gain)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    configs = []
    for m in args.massive:
        runs = [ablation(s, args.layers, args.channels, args.factor, m) for s in args.seeds]
        title = (f"reduced Ideogram 4, {args.layers} layers, {args.channels} outlier channels x{args.factor:g}, "
                 f"massive x{m:g}; rel. L2 error of the velocity on image tokens vs float, held-out inputs")
        mean = table(runs, title)
        configs.append({"massive": m, "runs": runs, "mean": mean,
                        "ordering_holds": all(ordered(r["errors"]) for r in runs)})
        if args.per_group:
            groups = per_group(args.seeds[0], args.layers, args.channels, args.factor, m)
            print(f"SmoothQuant, one group quantized at a time (seed {args.seeds[0]}, massive x{m:g}):")
            for k, v in groups.items():
                print(f"  {k:32} {v:.5f}")
            print()
            configs[-1]["per_group_smoothquant"] = groups
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "bench/quality_ablation.py " + " ".join(
            [f"--seeds {' '.join(map(str, args.seeds))}", f"--layers {args.layers}", f"--channels {args.channels}",
             f"--factor {args.factor:g}", f"--massive {' '.join(f'{m:g}' for m in args.massive)}"]
            + (["--per-group"] if args.per_group else [])),
        "metric": "relative L2 error of the velocity on image tokens vs the float model, mean over held-out inputs",
        "held_out_timesteps": list(HELD_OUT_TIMESTEPS), "calibration_timesteps": CALIB_TIMESTEPS,
        "recipes": {k: r.to_dict() for k, r in VARIANTS.items()},
        "configs": configs, "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
