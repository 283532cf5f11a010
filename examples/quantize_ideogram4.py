"""Quantize both CFG branches of Ideogram 4 end to end, the way a deployment would.

    float cond/uncond transformers --(sample once, record what each branch sees)--> calibration
        --fxquant.compile(int8-w8a8)--> two lowered GraphModules --fxquant.save--> one file
        --fxquant.load--> sample again: compare with the float sampler

The model is the built-in reduced Ideogram 4 (seeded random weights; nothing is downloaded):

    .venv/bin/python examples/quantize_ideogram4.py [--layers 4] [--steps 8] [--out ideogram4-w8a8.safetensors]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import fxquant
from fxquant.models import ideogram4_inputs, reduced_ideogram4


def sample(cond, uncond, base, noise, steps, guidance=4.0):
    """Euler flow matching with classifier-free guidance over the image tokens (t: 0 noise -> 1 data)."""
    text_len = int((base["indicator"][0] == 3).sum())
    x = noise.clone()
    ts = torch.linspace(0.0, 1.0, steps + 1)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        inputs = dict(base, hidden_states=x, timestep=torch.full((x.shape[0],), float(t0)))
        empty = dict(inputs, encoder_hidden_states=torch.zeros_like(base["encoder_hidden_states"]))
        with torch.no_grad():
            v_c, v_u = cond(**inputs).sample, uncond(**empty).sample
        v = v_u + guidance * (v_c - v_u)
        x = x.clone()
        x[:, text_len:] = x[:, text_len:] + (t1 - t0) * v[:, text_len:]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ideogram4-w8a8.safetensors"))
    args = ap.parse_args()

    # Ideogram 4 ships two transformers with separate weights: one per CFG branch.
    cond, uncond = reduced_ideogram4(seed=1, num_layers=args.layers), reduced_ideogram4(seed=2, num_layers=args.layers)
    base = ideogram4_inputs(batch=1, text_len=12, image_hw=(8, 8), seed=0)
    noise = torch.randn(base["hidden_states"].shape, generator=torch.Generator().manual_seed(1))

    # 1. Calibration from real use: each branch records the inputs it is called with.
    with fxquant.record_inputs(cond, max_items=8) as rec_c, fxquant.record_inputs(uncond, max_items=8) as rec_u:
        reference = sample(cond, uncond, base, noise, args.steps)
    print(f"recorded {len(rec_c)} cond and {len(rec_u)} uncond calibration inputs")

    # 2. Compile both branches with the paper's recipe and look at what it did.
    gms = fxquant.compile({"cond": cond, "uncond": uncond}, "int8-w8a8", calibration={"cond": rec_c, "uncond": rec_u})
    print(fxquant.summary(gms))

    # 3. Sample with the quantized branches from the same noise (prompt and noise unseen in calibration would
    #    be the honest test; here the sampler differs from calibration in every step's latent).
    quantized = sample(gms["cond"], gms["uncond"], base, noise, args.steps)
    err = float((quantized - reference).norm() / reference.norm())
    print(f"\nfinal latent, W8A8 vs float: relative L2 error {err:.4f}")

    # 4. Ship it: one file, reloaded without the original weights or calibration data.
    fxquant.save(gms, args.out)
    loaded = fxquant.load(args.out)
    again = sample(loaded["cond"], loaded["uncond"], base, noise, args.steps)
    print(f"saved {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB); "
          f"reloaded sampler bit-identical: {torch.equal(again, quantized)}")


if __name__ == "__main__":
    main()
