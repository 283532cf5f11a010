"""Cost of score_sensitivity and round_gptq on real-width Ideogram 4 layers (bf16, CPU), extrapolated to 34 layers.

    .venv/bin/python bench/sensitivity_cost.py          # 1 and 2 real-width layers, ~10 min on the shared machine

The model is `IDEOGRAM4_FULL` (hidden 4608, SwiGLU 12288, adaLN 512, LLM features 53248) with 1
and 2 layers, seeded random bf16 weights; inputs: batch 1, 16 text + 8x8 image tokens, a 2-step
calibration trajectory. Measured per depth N: one float forward through the traced graph
(``fx.Interpreter``), ``score_sensitivity`` with 2 samples (one batch of 2: ``1 + L`` forwards for
L = 8N + 7 linears), and ``round_gptq`` on every block linear (``llm_cond_proj``, whose Hessian is
53248^2 float32 = 11.3 GB, is left out here and noted). Extrapolation: forward time ``a + bN`` fitted
on N = 1, 2; sensitivity ``(1 + 8N + 7) x`` the batch-2 forward; GPTQ linear in the number of blocks.
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
from fxquant.passes.round_gptq import RoundGPTQ
from fxquant.passes.score_sensitivity import ScoreSensitivity, batched
from fxquant.passes.select_protected import SelectOptions, SelectProtected
from fxquant.recipe import LayerRule
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


def measure(layers: int, gptq: bool) -> dict:
    model = real_width(layers)
    cal = ideogram4_trajectory(steps=2, seed=1, batch=1, text_len=16, image_hw=(8, 8), in_channels=128,
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
        sens = ScoreSensitivity(cal, samples=2, alpha=0.5)
        sens(gm)
        out.update(linears=len(meta.records(gm)), sensitivity_forwards=sens.forwards, sensitivity_s=sens.seconds)
        if gptq:
            SelectProtected(SelectOptions(protect=(LayerRule("llm_cond_proj"),)))(gm)
            g = RoundGPTQ(cal, hessian_bytes=1 << 30)
            g(gm)
            out.update(gptq_s=g.seconds, gptq_forwards=g.forwards, gptq_weights=len(meta.records(gm)) - 1)
    del gm, model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sensitivity_cost.json")
    ap.add_argument("--no-gptq", action="store_true")
    args = ap.parse_args()
    load0 = os.getloadavg()
    runs = [measure(n, not args.no_gptq and n == 1) for n in (1, 2)]
    f1, f2 = runs[0]["forward_batch2_s"], runs[1]["forward_batch2_s"]
    b = f2 - f1
    a = f1 - b
    fwd34 = a + 34 * b
    pred = {r["layers"]: (1 + 8 * r["layers"] + 7) * (a + b * r["layers"]) for r in runs}
    est = {"forward_batch2_34_layers_s": fwd34, "sensitivity_forwards_34_layers": 1 + 279,
           "sensitivity_34_layers_s": (1 + 279) * fwd34,
           "predicted_vs_measured_sensitivity_s": {n: (pred[n], r["sensitivity_s"]) for n, r in zip(pred, runs)}}
    if "gptq_s" in runs[0]:
        block_gptq = runs[0]["gptq_s"]  # one block + the small non-block linears: an upper bound per block
        est["gptq_34_layers_s_upper"] = 34 * block_gptq
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
