"""Demo: quantize both CFG branches of a built-in reduced Ideogram 4 and compare with float.

    bash scripts/setup.sh && .venv/bin/python examples/demo.py
"""

from __future__ import annotations

import torch

import fxquant
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def main() -> None:
    branches = {"cond": reduced_ideogram4(seed=1), "uncond": reduced_ideogram4(seed=2)}
    # Calibration and evaluation inputs are disjoint (different seeds and timesteps).
    calibration = {name: ideogram4_trajectory(steps=6, seed=10 + i) for i, name in enumerate(branches)}
    # The paper's recipe: SmoothQuant (alpha 0.5) folded into norms / adaLN / linears, plus top-k protection.
    gms = fxquant.compile(branches, "int8-w8a8", calibration=calibration)
    naive = fxquant.compile(branches, "w8a8-naive", calibration=calibration)  # for comparison
    print(fxquant.summary(gms))
    print()
    print("relative L2 error of the output against the float model, on held-out inputs")
    print(f"{'branch':8} {'timestep':>8} {'tokens':>6}  {'int8-w8a8':>9}  {'w8a8-naive':>10}")
    for name, gm in gms.items():
        for t in (0.1, 0.5, 0.9):
            ex = ideogram4_inputs(batch=2, text_len=12, image_hw=(6, 6), timestep=t, seed=99)
            with torch.no_grad():
                ref = branches[name](**ex).sample
                err, err_naive = rel_error(gm(**ex).sample, ref), rel_error(naive[name](**ex).sample, ref)
            print(f"{name:8} {t:8.1f} {ex['hidden_states'].shape[1]:6d}  {err:9.4f}  {err_naive:10.4f}")


if __name__ == "__main__":
    main()
