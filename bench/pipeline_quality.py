"""Image quality of a quantized diffusers pipeline against the float one: the tiny seeded
`Ideogram4Pipeline` (fxquant.models.ideogram4_pipeline), both CFG branches quantized in place by
`fxquant.quantize_pipeline`, images compared by PSNR (pixels in [0, 1]).

    python bench/pipeline_quality.py            # prints a table, writes bench/results/pipeline_quality.json

Rows: int8-w8a8 and q8_0 in the quantized pipeline; q8_0 written with `save_gguf` and read back
by diffusers' own GGUF loader; the int8-w8a8 pipeline after ``pipe.to(torch.bfloat16)`` (against
the float32 float pipeline). Random weights, 16x16 pixels, 4 steps: a check of the machinery, not
of a trained model's quality. Timings are not reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import fxquant
from fxquant.integrations.diffusers import load_gguf
from fxquant.models.ideogram4_pipeline import TINY_CALL, tiny_ideogram4_pipeline

PROMPTS = ["a red bicycle", "a small dog in the house"]
EVAL = ["a red bicycle on the street", "a green tree on the mountain", "a blue boat in the river"]


def images(pipe) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([pipe(p, generator=torch.Generator().manual_seed(i), output_type="pt", **TINY_CALL).images.float()
                          for i, p in enumerate(EVAL)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(torch.log10(torch.tensor(1.0 / mse)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pipeline_quality.json")
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()
    ref = images(tiny_ideogram4_pipeline())
    rows = []
    for recipe in ("int8-w8a8", "q8_0"):
        pipe = tiny_ideogram4_pipeline()
        q = fxquant.quantize_pipeline(pipe, recipe, prompts=PROMPTS, **TINY_CALL)
        counts = fxquant.summary(q).counts()
        rows.append({"setting": f"{recipe}, both branches", "psnr_db": psnr(images(pipe), ref), "linears": counts})
        if recipe == "q8_0":
            with tempfile.TemporaryDirectory() as d:
                for name, gm in q.items():
                    fxquant.save_gguf(gm, os.path.join(d, f"{name}.gguf"))
                    setattr(pipe, name, load_gguf(os.path.join(d, f"{name}.gguf")))
                rows.append({"setting": "q8_0 via .gguf and diffusers' GGUF loader", "psnr_db": psnr(images(pipe), ref)})
        else:
            pipe.to(torch.bfloat16)
            rows.append({"setting": "int8-w8a8, then pipe.to(torch.bfloat16)", "psnr_db": psnr(images(pipe), ref)})
    print(f"{'setting':48} {'PSNR vs float (dB)':>18}")
    for r in rows:
        print(f"{r['setting']:48} {r['psnr_db']:18.1f}")
    result = {"rows": rows, "eval_prompts": EVAL, "calibration_prompts": PROMPTS, "call": TINY_CALL,
              "seconds": time.perf_counter() - t0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
