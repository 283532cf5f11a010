"""The tiny `Ideogram4Pipeline` of `fxquant.models.ideogram4_pipeline` (built locally, nothing from
a hub) and the helpers the end-to-end tests use on it."""

from __future__ import annotations

import torch

from fxquant.models.ideogram4_pipeline import TINY_CALL as CALL
from fxquant.models.ideogram4_pipeline import tiny_ideogram4_pipeline as pipeline

__all__ = ["CALL", "pipeline", "image", "psnr"]


def image(pipe, prompt: str = "a red bicycle on the street", seed: int = 0) -> torch.Tensor:
    """One image as a float32 tensor in [0, 1] (``output_type="pt"``), seeded."""
    with torch.no_grad():
        out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **CALL)
    return out.images.float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
