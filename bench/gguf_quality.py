"""Accuracy and size of the GGUF recipes on a reduced Ideogram 4, and agreement of diffusers'
own GGUF loader with fxquant's lowered module.

    .venv/bin/python bench/gguf_quality.py

Seeded random weights (not a trained DiT): read the errors as a check of the machinery, not as a
quality claim. Prints a table and writes ``bench/results/gguf_quality.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

import fxquant
from fxquant.models import ideogram4_inputs, reduced_ideogram4

CFG = dict(attention_head_dim=64, num_attention_heads=4, intermediate_size=512, mrope_section=(12, 10, 10), in_channels=32)
OUT = Path(__file__).parent / "results" / "gguf_quality.json"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    from fxquant.integrations.diffusers import load_gguf

    model = reduced_ideogram4(seed=1, **CFG)
    calib = ideogram4_inputs(in_channels=32, seed=2)
    ex = ideogram4_inputs(in_channels=32, seed=3, text_len=12, image_hw=(6, 6), timestep=0.5)  # held out
    float_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    recipes = {"q4_k": "q4_k", "q4_k+misaligned-q8_0": fxquant.Recipe.preset("q4_k").replace(misaligned="q8_0"),
               "q8_0": "q8_0"}
    rows = []
    with torch.no_grad():
        ref = model(**ex).sample
        for name, recipe in recipes.items():
            gm = fxquant.compile(model, recipe, calibration=[calib])
            path = os.path.join(tempfile.mkdtemp(), f"{name}.gguf")
            report = fxquant.save_gguf(gm, path)
            q = gm(**ex).sample
            d = load_gguf(path)(**ex).sample
            rows.append(dict(recipe=name, file_bytes=report.file_bytes, float32_bytes=float_bytes,
                             tensors_by_type=report.bytes_by_type(), err_vs_float=rel(q, ref), diffusers_vs_fxquant=rel(d, q)))
    print(f"{'recipe':22} {'file bytes':>11} {'float32 bytes':>13} {'err vs float':>12} {'diffusers vs fxquant':>20}")
    for r in rows:
        print(f"{r['recipe']:22} {r['file_bytes']:11d} {r['float32_bytes']:13d} {r['err_vs_float']:12.4f} {r['diffusers_vs_fxquant']:20.2e}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"model": "reduced_ideogram4(seed=1, %s)" % CFG, "rows": rows}, indent=2, default=str))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
