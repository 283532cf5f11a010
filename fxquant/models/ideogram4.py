"""Built-in models for demos and tests: a reduced Ideogram 4 with seeded random weights, and the
packed text+image inputs its transformer takes. Nothing is downloaded.

The reduced model keeps Ideogram 4's structure (single stream, SwiGLU, adaLN, MRoPE, packed
text/image sequence) at small widths; `IDEOGRAM4_FULL` is the real configuration.
"""

from __future__ import annotations

from typing import Any

import torch

IDEOGRAM4_FULL: dict[str, Any] = dict(
    in_channels=128, num_layers=34, attention_head_dim=256, num_attention_heads=18, intermediate_size=12288,
    adaln_dim=512, llm_features_dim=53248, rope_theta=5_000_000, mrope_section=(24, 20, 20),
)

IDEOGRAM4_REDUCED: dict[str, Any] = dict(
    in_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=4, intermediate_size=384,
    adaln_dim=64, llm_features_dim=96, rope_theta=10_000, mrope_section=(6, 5, 5),
)

# The command line's built-in model: every width but in_channels a multiple of 256, so Q4_K (256-wide
# blocks) quantizes all linears but input_proj, as at Ideogram 4's real widths (IDEOGRAM4_REDUCED's
# 128-wide layers are below one Q4_K block: a q4_k recipe would leave them all float).
IDEOGRAM4_DEMO: dict[str, Any] = dict(
    in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=4, intermediate_size=768,
    adaln_dim=256, llm_features_dim=256, rope_theta=10_000, mrope_section=(12, 10, 10),
)

TEXT_INDICATOR, IMAGE_INDICATOR = 3, 2  # diffusers' LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR


def reduced_ideogram4(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A small `Ideogram4Transformer2DModel` with seeded random weights (eval mode).

    Weights get a larger spread than the default init and RMSNorm gains away from 1, so that the
    activations have the channel structure quantization sees in trained DiTs.
    """
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4Transformer2DModel

    cfg = {**IDEOGRAM4_REDUCED, **overrides}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Ideogram4Transformer2DModel(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight"):
                continue
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen).abs())
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.to(dtype).eval()


def ideogram4_inputs(
    batch: int = 2, text_len: int = 8, image_hw: tuple[int, int] = (4, 4), timestep: float | None = None,
    seed: int = 0, in_channels: int = 16, llm_features_dim: int = 96, dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Keyword inputs for one transformer call on a packed [text | image] sequence.

    Sequence length is ``text_len + h * w``. Text positions carry LLM features, image positions
    noisy latents; ``timestep`` in [0, 1] (random per sample if None).
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = image_hw
    seq = text_len + h * w
    indicator = torch.full((batch, seq), IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text_len] = TEXT_INDICATOR
    pos = torch.zeros(batch, seq, 3, dtype=torch.long)
    pos[:, :text_len, 0] = torch.arange(text_len)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos[:, text_len:, 0] = text_len
    pos[:, text_len:, 1] = 65536 + ys.flatten()
    pos[:, text_len:, 2] = 65536 + xs.flatten()
    t = torch.rand(batch, generator=gen) if timestep is None else torch.full((batch,), float(timestep))
    return dict(
        hidden_states=torch.randn(batch, seq, in_channels, generator=gen).to(dtype),
        timestep=t.to(dtype),
        encoder_hidden_states=torch.randn(batch, seq, llm_features_dim, generator=gen).to(dtype),
        position_ids=pos,
        segment_ids=torch.zeros(batch, seq, dtype=torch.long),
        indicator=indicator,
    )


def ideogram4_trajectory(steps: int = 4, seed: int = 0, **kw: Any) -> list[dict[str, torch.Tensor]]:
    """Inputs at ``steps`` timesteps of a flow-matching trajectory (t from 0 = noise to 1 = data)."""
    ts = torch.linspace(0.0, 1.0, steps + 2)[1:-1].tolist()
    return [ideogram4_inputs(timestep=t, seed=seed * 1000 + i, **kw) for i, t in enumerate(ts)]
