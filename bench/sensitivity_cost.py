"""Cost of score_sensitivity and round_gptq on real-width Ideogram 4 layers (bf16, CPU), extrapolated to 34 layers.

    .venv/bin/python bench/sensitivity_cost.py          # 1 and 2 real-width layers, ~10 min on the shared machine

The model is `IDEOGRAM4_FULL` (hidden 4608, SwiGLU 12288, adaLN 512, LLM features 53248) with 1
and 2 layers, seeded random bf16 weights; inputs: batch 1, 8 text + 4x4 image tokens, a 2-step
calibration trajectory. Measured per depth N: one float forward through the traced graph
(``fx.Interpreter``), ``score_sensitivity`` with 2 samples (one batch of 2: ``1 + L`` forwards for
L = 8N + 7 linears) on N = 1. GPTQ: `gptq_codes` on one 4608 x 4608 weight, scaled by the work
(``in^3 / 3 + out * in^2``) of all 279 linears (``llm_cond_proj``'s Hessian is 53248^2 float32 =
11.3 GB). Extrapolation: forward time ``a + bN`` fitted on N = 1, 2; sensitivity ``(1 + 8N + 7) x``
the batch-2 forward.
Writes ``bench/results/sensitivity_cost.json``; timings are on a shared, loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fxquant import meta
from fxquant.graph import graph_inputs
from fxquant.models import IDEOGRAM4_FULL, ideogram4_trajectory
from fxquant.passes.collect_stats import CollectStats
from fxquant.passes.find_linears import FindLinears
from fxquant.passes.round_gptq import gptq_codes
from fxquant.passes.score_sensitivity import ScoreSensitivity, batched
from fxquant.trace import trace


def real_width(layers: int) -> torch.nn.Module:
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4Transformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        model = Ideogram4Transformer2DModel(**{**IDEOGRAM4_FULL, "num_layers": layers})
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def gptq_timing(out_f: int, in_f: int) -> float:
    """Seconds of `gptq_codes` on one [out_f, in_f] weight with a random full-rank Hessian."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(2 * in_f, in_f, generator=g)
    h = x.T @ x
    t0 = time.perf_counter()
    gptq_codes(w, h)
    return time.perf_counter() - t0


def measure(layers: int, sensitivity: bool) -> dict:
    model = real_width(layers)
    cal = ideogram4_trajectory(steps=2, seed=1, batch=1, text_len=8, image_hw=(4, 4), in_channels=128,
                               llm_features_dim=IDEOGRAM4_FULL["llm_features_dim"], dtype=torch.bfloat16)
    t0 = time.perf_counter()
    gm = trace(model, cal[0])
    out = {"layers": layers, "trace_s": time.perf_counter() - t0}
    meta.set_graph_record(gm, meta.GraphRecord(recipe={}))
    with torch.no_grad():
        FindLinears()(gm)
        t0 = time.perf_counter()
        CollectStats(cal)(gm)
        out["collect_stats_s"] = time.perf_counter() - t0
        flat = batched([graph_inputs(gm, c, "c", "bench") for c in cal])[0]
        interp = torch.fx.Interpreter(gm)
        interp.run(*flat)  # warm-up
        t0 = time.perf_counter()
        interp.run(*flat)
        out["forward_batch2_s"] = time.perf_counter() - t0
        out["linears"] = len(meta.records(gm))
        if sensitivity:
            sens = ScoreSensitivity(cal, samples=2, alpha=0.5)
            sens(gm)
            out.update(sensitivity_forwards=sens.forwards, sensitivity_s=sens.seconds)
    del gm, model
    return out


def full_shapes() -> dict[str, tuple[int, int]]:
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4Transformer2DModel
    with torch.device("meta"):
        full = Ideogram4Transformer2DModel(**IDEOGRAM4_FULL)
    return {n: tuple(m.weight.shape) for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sensitivity_cost.json")
    ap.add_argument("--no-gptq", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()
    runs = [measure(n, n == 1) for n in (1, 2)]
    f1, f2 = runs[0]["forward_batch2_s"], runs[1]["forward_batch2_s"]
    b = f2 - f1
    a = f1 - b
    fwd34 = a + 34 * b
    est = {"forward_batch2_34_layers_s": fwd34, "sensitivity_forwards_34_layers": 1 + 279,
           "sensitivity_34_layers_s": (1 + 279) * fwd34,
           "sensitivity_1_layer_predicted_vs_measured_s": ((1 + 15) * f1, runs[0]["sensitivity_s"])}
    if not args.no_gptq:
        # GPTQ's work is ~ in^3 / 3 (Cholesky) + out * in^2 (updates): time one 4608 x 4608 weight and scale.
        t = gptq_timing(4608, 4608)
        unit = 4608 ** 3 / 3 + 4608 ** 3
        shapes = [(n.split(".")[-1], o, i) for n, (o, i) in full_shapes().items()]
        work = sum(i ** 3 / 3 + o * i * i for _, o, i in shapes)
        est.update(gptq_4608x4608_s=t, gptq_34_layers_s=t * work / unit,
                   gptq_largest_hessian_gb=max(i for _, _, i in shapes) ** 2 * 4 / 1e9)
    result = {"runs": runs, "extrapolation": est, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    for r in runs:
        print(r)
    print(json.dumps(est, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}; load average {load0} -> {result['loadavg_end']}")


if __name__ == "__main__":
    main()
