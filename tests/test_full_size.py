"""The real Ideogram 4 configuration (9.3 B parameters), traced under FakeTensorMode: no memory,
no weights, a few seconds. Checks the frontend and find_linears at full size."""

import collections

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxquant import meta
from fxquant.models import IDEOGRAM4_FULL, ideogram4_inputs
from fxquant.passes.find_linears import FindLinears
from fxquant.passes.select_schemes import effective_top_k
from fxquant.trace import trace


def test_full_size_graph_has_279_linears_named_by_module():
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4Transformer2DModel

    example = ideogram4_inputs(batch=2, text_len=8, image_hw=(4, 4), in_channels=128, llm_features_dim=53248)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = Ideogram4Transformer2DModel(**IDEOGRAM4_FULL)
        gm = trace(model, {k: mode.from_tensor(v) for k, v in example.items()})
    FindLinears()(gm)
    recs = [r for _, r in meta.records(gm)]
    assert len(recs) == 279
    kinds = collections.Counter(r.name.split(".")[-1] if r.name.startswith("layers.") else r.name for r in recs)
    assert kinds["w2"] == 34 and kinds["to_q"] == 34 and kinds["adaln_modulation"] == 34
    assert {"input_proj", "t_embedding.mlp_out", "final_layer.linear", "llm_cond_proj"} <= set(kinds)
    w2 = next(r for r in recs if r.name == "layers.0.feed_forward.w2")
    assert (w2.in_features, w2.out_features) == (12288, 4608)
    assert round(sum(r.in_features * r.out_features for r in recs) / 1e9, 2) == 9.28  # 9.3 B in linears
    assert effective_top_k(17, len(recs), 279) == 17  # the paper's k, unscaled at full size
