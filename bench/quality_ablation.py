"""Quality ablation: naive W8A8, SmoothQuant alone, top-k protection alone, and both, on a reduced
Ideogram 4 with planted activation outliers of the two kinds trained DiTs have.

    .venv/bin/python bench/quality_ablation.py                  # 3 seeds x 5 settings, 4 layers (~5 min, 2 cores)
    .venv/bin/python bench/quality_ablation.py --per-group      # + where SmoothQuant's remaining error comes from
    .venv/bin/python bench/quality_ablation.py --seeds 1 --settings 20:300 --out /tmp/q.json

Seeded random weights have neither kind of outlier, so `plant_outliers` adds them:

* **Channel-consistent outliers** (SmoothQuant's case): ``channels`` input channels ``factor`` times
  larger for every token, at the inputs of q/k/v (``attention_norm1``), w1/w3 (``ffn_norm1``),
  ``to_out`` (rows of ``to_v``), ``w2`` (rows of ``w3``), ``llm_cond_proj`` (``llm_cond_norm``) and
  the final linear (its adaLN scale ``1 + m``). Each is an exact reparametrisation: the reading
  linears' weight columns are divided by ``factor``, so the float function does not change.
* **Massive activations** (what protection is for): in every other block, two channels of the
  SwiGLU output read by ``w2`` become ``silu(4a) * massive * a`` with ``a = w1_j x``: ~0 where ``a < 0``,
  growing as ``a^2`` where ``a > 0``, so huge on the few tokens where ``a`` is large (token-specific,
  heavy-tailed: 2-43% of the tokens above a tenth of the channel's max in our probes); and two
  hidden channels of the time embedding become ``silu(massive * z)`` (large for the samples where
  ``z > 0``), read by ``t_embedding.mlp_out``. The two channels of each pair are identical and the
  reading weight columns opposite (``W[:, k] = -W[:, j]``, normal-sized), so in float their
  contributions cancel: the planted model computes what the model without those two channels
  computes. A diagonal reparametrisation (a row times g, the reading column divided by g) cannot
  plant a massive activation that SmoothQuant fails on: s_j grows by exactly g and undoes it at any
  alpha. Here the reading columns are normal-sized, so s_j only splits the outlier between the
  activation and the weight (sqrt(massive) each at alpha 0.5), and the int8 rounding of the two
  huge, cancelling terms is the error. Keeping those linears in float removes it.

Which linears are protected is decided by the pipeline (``collect_stats`` -> ``score_fragility`` ->
``select_schemes``), not here: ``protect_top_k`` = one slot per linear fed by a massive
activation (the w2s of the planted blocks + ``t_embedding.mlp_out``: the paper's top-17 of
Ideogram 4 are its 16 massive-activation ``w2``s + ``mlp_out``), without scaling by linear count
(``protect_reference_linears=0``), plus the preset's ``t_embedding.mlp_out`` rule. The bench prints
which linears the ranking picked.

Each variant is compiled with ``fxquant.compile`` on a calibration trajectory and evaluated on
held-out inputs (other noise seeds, other timesteps). Error: relative L2 error of the velocity on
image tokens against the planted float model, averaged over the held-out inputs. Writes a table
to stdout and JSON to ``bench/results/quality.json``.
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

PRESET = fxquant.Recipe.preset("int8-w8a8-paper")
VARIANTS = ("naive W8A8", "SmoothQuant", "protection", "SmoothQuant + protection")
CALIB_TIMESTEPS = 6
HELD_OUT_TIMESTEPS = (0.05, 0.35, 0.65, 0.95)  # none of them is a calibration timestep (k/7)
GATE = 4.0  # sharpens silu(GATE * a): the massive SwiGLU channel is ~0 on the tokens where a < 0


def massive_blocks(num_layers: int) -> list[int]:
    return list(range(1, num_layers, 2))


def recipes(num_layers: int) -> dict[str, fxquant.Recipe]:
    """The four variants; k = the number of linears fed by a planted massive activation."""
    k = len(massive_blocks(num_layers)) + 1
    prot = dict(protect_top_k=k, protect_reference_linears=0)
    return {
        "naive W8A8": fxquant.Recipe(name="naive"),
        "SmoothQuant": PRESET.replace(name="smoothquant", protect_top_k=0, protect=()),
        "protection": PRESET.replace(name="protection", smoothquant=False, **prot),
        "SmoothQuant + protection": PRESET.replace(name="smoothquant+protection", **prot),
    }


def plant_outliers(model: torch.nn.Module, channels: int = 4, factor: float = 20.0, massive: float = 300.0,
                   seed: int = 0) -> torch.nn.Module:
    """A copy of a reduced Ideogram 4 with channel-consistent outliers (exact reparametrisations) and,
    if ``massive > 0``, paired massive activations whose float contributions cancel (module docstring)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)

    def pick(n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=g)[:k]

    def channel(gain: torch.Tensor, readers: list[torch.nn.Linear]) -> None:
        """gain[idx] *= factor (a norm weight), the readers' columns idx /= factor."""
        idx = pick(readers[0].in_features, channels)
        gain[idx] *= factor
        for lin in readers:
            lin.weight[:, idx] /= factor

    def pair(srcs: list[tuple[torch.nn.Linear, dict[str, torch.Tensor]]], reader: torch.nn.Linear) -> None:
        """Output channels j, k of each source set to row j of the given tensors (identical channels);
        the reader's column k = -column j, so the two cancel in float."""
        j, k = pick(reader.in_features, 2).tolist()
        for src, rows in srcs:
            for name, value in rows.items():
                getattr(src, name)[[j, k]] = value[j]
        reader.weight[:, k] = -reader.weight[:, j]

    with torch.no_grad():
        channel(model.llm_cond_norm.weight, [model.llm_cond_proj])
        for i, block in enumerate(model.layers):
            att, ff = block.attention, block.feed_forward
            channel(block.attention_norm1.weight, [att.to_q, att.to_k, att.to_v])
            channel(block.ffn_norm1.weight, [ff.w1, ff.w3])
            idx = pick(att.to_out[0].in_features, channels)
            att.to_v.weight[idx] *= factor
            att.to_out[0].weight[:, idx] /= factor
            idx = pick(ff.w2.in_features, channels)
            ff.w3.weight[idx] *= factor
            ff.w2.weight[:, idx] /= factor
            if massive > 0 and i in massive_blocks(len(model.layers)):
                # w1_j := 4 w1_j, w3_j := massive * w1_j (at w3_j's own norm): the SwiGLU channel becomes
                # silu(4a) * massive * a with a = w1_j x: ~0 for a < 0, growing as a^2 for a > 0.
                w1 = ff.w1.weight
                w3 = massive * w1 * (ff.w3.weight.norm(dim=1, keepdim=True) / w1.norm(dim=1, keepdim=True))
                pair([(ff.w1, {"weight": GATE * w1}), (ff.w3, {"weight": w3})], ff.w2)
        # The final layer's norm has no affine: scale = 1 + m(c); (1 + m_j) * factor is m's row j times
        # factor and its bias (1 + b_j) * factor - 1.
        mod, lin = model.final_layer.adaln_modulation, model.final_layer.linear
        idx = pick(lin.in_features, channels)
        mod.weight[idx] *= factor
        mod.bias[idx] = (1 + mod.bias[idx]) * factor - 1
        lin.weight[:, idx] /= factor
        if massive > 0:
            # A channel z of mlp_in that is positive for some timesteps and not others: silu(massive * z)
            # is then massive for those samples only. (A channel negative everywhere would plant nothing.)
            te = model.t_embedding
            z = _mlp_in_outputs(te)
            mixed = (z > 0).any(0) & (z <= 0).any(0)
            cand = (mixed if bool(mixed.any()) else (z > 0).any(0)).nonzero().flatten()
            j = int(cand[torch.randint(len(cand), (1,), generator=g)])
            k = next(c for c in pick(z.shape[1], 2).tolist() if c != j)
            for t in (te.mlp_in.weight, te.mlp_in.bias):
                t[[j, k]] = massive * t[j]
            te.mlp_out.weight[:, k] = -te.mlp_out.weight[:, j]
    return model


def _mlp_in_outputs(t_embedding: torch.nn.Module) -> torch.Tensor:
    """``t_embedding.mlp_in``'s output over 33 timesteps in [0, 1], shape [33, hidden]."""
    seen: list[torch.Tensor] = []
    hook = t_embedding.mlp_in.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    try:
        t_embedding(torch.linspace(0.0, 1.0, 33))
    finally:
        hook.remove()
    return seen[0]


def held_out_inputs(seed: int) -> list[dict[str, torch.Tensor]]:
    return [ideogram4_inputs(batch=2, text_len=8, image_hw=(6, 6), timestep=t, seed=10_000 + 100 * seed + i)
            for i, t in enumerate(HELD_OUT_TIMESTEPS)]


def image_error(out: torch.Tensor, ref: torch.Tensor, indicator: torch.Tensor) -> float:
    mask = (indicator == IMAGE_INDICATOR).unsqueeze(-1)
    d, r = (out - ref).float() * mask, ref.float() * mask
    return float(d.norm() / r.norm())


def planted(seed: int, layers: int, channels: int, factor: float, massive: float):
    """The planted model, its calibration trajectory, held-out inputs and the float references."""
    model = plant_outliers(reduced_ideogram4(seed=seed, num_layers=layers), channels, factor, massive, seed)
    calibration, held = ideogram4_trajectory(steps=CALIB_TIMESTEPS, seed=seed), held_out_inputs(seed)
    with torch.no_grad():
        refs = [model(**ex).sample for ex in held]
    return model, calibration, held, refs


def held_out_error(gm, held, refs) -> float:
    with torch.no_grad():
        errs = [image_error(gm(**ex).sample, ref, ex["indicator"]) for ex, ref in zip(held, refs)]
    return sum(errs) / len(errs)


def ablation(seed: int = 1, layers: int = 4, channels: int = 4, factor: float = 20.0, massive: float = 300.0) -> dict[str, Any]:
    """Errors of every variant on one planted model. Calibration and held-out inputs are disjoint."""
    model, calibration, held, refs = planted(seed, layers, channels, factor, massive)
    errors: dict[str, float] = {}
    protected: list[str] = []
    for name, recipe in recipes(layers).items():
        gm = fxquant.compile(model, recipe, calibration=calibration)
        errors[name] = held_out_error(gm, held, refs)
        if name == "SmoothQuant + protection":
            protected = [r.name for r in fxquant.summary(gm).rows if r.kind == "protected"]
    return {"seed": seed, "factor": factor, "massive": massive, "errors": errors, "protected": protected}


GROUPS = ("input_proj", "llm_cond_proj", "t_embedding.*", "adaln_proj", "layers.*.adaln_modulation",
          "layers.*.attention.to_[qkv]", "layers.*.attention.to_out.0", "layers.*.feed_forward.w[13]",
          "layers.*.feed_forward.w2", "final_layer.*")


def per_group(seed: int = 1, layers: int = 4, channels: int = 4, factor: float = 20.0, massive: float = 300.0) -> dict[str, float]:
    """Where the SmoothQuant-only error comes from: each group of linears quantized alone, the rest skipped."""
    model, calibration, held, refs = planted(seed, layers, channels, factor, massive)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    out = {}
    for pattern in GROUPS:
        rule = fxquant.LayerRule(pattern)
        skip = tuple(n for n in names if not rule.matches(n))
        recipe = recipes(layers)["SmoothQuant"].replace(name="one-group", skip=skip)
        out[pattern] = held_out_error(fxquant.compile(model, recipe, calibration=calibration), held, refs)
    return out


def ordered(errors: dict[str, float]) -> bool:
    """The paper's ablation order: naive worst, each technique alone better, both together best."""
    naive, sq, prot, both = (errors[k] for k in VARIANTS)
    return naive > sq and naive > prot and both < sq and both < prot


def table(runs: list[dict[str, Any]], title: str) -> dict[str, float]:
    """Print one setting's table; return the mean error per variant."""
    mean = {k: sum(r["errors"][k] for r in runs) / len(runs) for k in VARIANTS}
    print(title)
    head = f"{'variant':26} " + " ".join(f"seed {r['seed']:<4}" for r in runs) + "      mean   vs naive"
    print(head)
    print("-" * len(head))
    for k in VARIANTS:
        cells = " ".join(f"{r['errors'][k]:9.5f}" for r in runs)
        print(f"{k:26} {cells}  {mean[k]:9.5f}   {mean[k] / mean['naive W8A8']:6.3f}")
    print(f"paper's ordering (naive > each alone > both) holds on every seed: {all(ordered(r['errors']) for r in runs)}")
    for r in runs:
        print(f"protected (seed {r['seed']}): {', '.join(r['protected'])}")
    print()
    return mean


def setting(text: str) -> tuple[float, float]:
    factor, _, massive = text.partition(":")
    return float(factor), float(massive)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--channels", type=int, default=4, help="channel-consistent outlier channels per tensor")
    ap.add_argument("--settings", type=setting, nargs="+",
                    default=[(1.0, 300.0), (20.0, 0.0), (10.0, 100.0), (20.0, 300.0), (30.0, 1000.0)],
                    metavar="FACTOR:MASSIVE",
                    help="channel outlier gain : massive activation gain (0 = none), one table each")
    ap.add_argument("--per-group", action="store_true",
                    help="also: SmoothQuant error with one group of linears quantized at a time (first seed, each setting)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    configs = []
    for factor, massive in args.settings:
        runs = [ablation(s, args.layers, args.channels, factor, massive) for s in args.seeds]
        title = (f"reduced Ideogram 4, {args.layers} layers, {args.channels} channel outliers x{factor:g}, "
                 f"massive activations x{massive:g}; rel. L2 error of the velocity on image tokens vs float, held-out inputs")
        mean = table(runs, title)
        configs.append({"factor": factor, "massive": massive, "runs": runs, "mean": mean,
                        "ordering_holds": all(ordered(r["errors"]) for r in runs)})
        if args.per_group:
            groups = per_group(args.seeds[0], args.layers, args.channels, factor, massive)
            print(f"SmoothQuant, one group quantized at a time (seed {args.seeds[0]}, x{factor:g}, massive x{massive:g}):")
            for k, v in groups.items():
                print(f"  {k:32} {v:.5f}")
            print()
            configs[-1]["per_group_smoothquant"] = groups
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "bench/quality_ablation.py " + " ".join(
            [f"--seeds {' '.join(map(str, args.seeds))}", f"--layers {args.layers}", f"--channels {args.channels}",
             "--settings " + " ".join(f"{f:g}:{m:g}" for f, m in args.settings)]
            + (["--per-group"] if args.per_group else [])),
        "metric": "relative L2 error of the velocity on image tokens vs the float model, mean over held-out inputs",
        "held_out_timesteps": list(HELD_OUT_TIMESTEPS), "calibration_timesteps": CALIB_TIMESTEPS,
        "recipes": {k: r.to_dict() for k, r in recipes(args.layers).items()},
        "configs": configs, "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
