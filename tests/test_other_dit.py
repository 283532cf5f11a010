"""Nothing in the frontend or passes knows Ideogram 4: a tiny Flux transformer compiles too."""

import pytest
import torch

import fxquant

from .conftest import rel_err

W8A8 = torch.ops.fxquant.linear_w8a8.default


def flux_inputs(batch, img_len, txt_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, img_len, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, 24, generator=g),
        pooled_projections=torch.randn(batch, 12, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.zeros(img_len, 3),
        txt_ids=torch.zeros(txt_len, 3),
    )


@pytest.fixture(scope="module")
def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()


def test_flux_compiles_and_tracks_float(flux):
    gm = fxquant.compile(flux, fxquant.Recipe(name="flux", protect=("proj_out",)), calibration=[flux_inputs(2, 16, 8)])
    rows = {r.name: (r.scheme, r.kind) for r in fxquant.summary(gm).rows}
    assert rows["proj_out"] == ("float", "protected") and rows["transformer_blocks.0.attn.to_q"] == ("w8a8", "quantize")
    assert sum(1 for n in gm.graph.nodes if n.target is W8A8) == len(rows) - 1
    ex = flux_inputs(3, 20, 6, seed=1)  # other batch, image and text lengths than traced
    with torch.no_grad():
        ref, out = flux(**ex).sample, gm(**ex).sample
    assert rel_err(out, ref) < 0.03


def test_ideogram_names_in_recipe_do_not_break_other_models(flux):
    # The paper preset's protect rule names an Ideogram 4 layer; it is optional, so Flux still compiles.
    r = fxquant.Recipe.preset("int8-w8a8-paper").replace(smoothquant=False, protect_top_k=0)
    gm = fxquant.compile(flux, r, calibration=[flux_inputs(2, 16, 8)])
    assert "protected" not in fxquant.summary(gm).counts("kind")
