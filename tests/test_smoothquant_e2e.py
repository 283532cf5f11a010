"""SmoothQuant end to end: the real statistics pass, fold_smoothing on a reduced Ideogram 4 and a
tiny Flux (float function kept, every fold kind where the architecture allows it), the
``int8-w8a8`` preset through compile / summary / save / load, and the paper's ablation order."""

import importlib.util
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant import meta, pipeline
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4
from fxquant.graph import linear_nodes, module_name, set_parameter
from fxquant.passes.fold_smoothing import FoldSmoothing
from fxquant.passes.materialize_folds import MaterializeFolds
from fxquant.passes.fold_smoothing.fold_targets import FoldFinder
from fxquant.passes.fold_smoothing.smoothing import apply_param_fold
from fxquant.trace import trace

from .conftest import rel_err
from .test_other_dit import flux_inputs

MUL = torch.ops.aten.mul.Tensor
SQ_ONLY = fxquant.Recipe.preset("int8-w8a8-paper").replace(name="sq", protect_top_k=0, protect=())


def folded(model, calibration, recipe=SQ_ONLY):
    """The pipeline of ``recipe`` up to and including fold_smoothing (no lowering): a float graph."""
    passes = pipeline.build(recipe, calibration).passes
    cut = next(i for i, p in enumerate(passes) if isinstance(p, FoldSmoothing)) + 1
    gm = trace(model, calibration[0])
    meta.set_graph_record(gm, meta.GraphRecord(recipe=recipe.to_dict()))
    with torch.no_grad():  # materialize_folds bakes the folds fold_smoothing records as ops
        return pipeline.run(gm, passes[:cut] + [MaterializeFolds()])


def targets(gm):
    return {r.name: (r.smoothing.target, r.smoothing.target_name) for _, r in meta.records(gm)}


@pytest.fixture(scope="module")
def ideogram():
    return reduced_ideogram4(seed=3, num_layers=2)


def test_ideogram4_folds_keep_the_float_function(ideogram):
    gm = folded(ideogram, ideogram4_trajectory(steps=3, seed=4))
    t = targets(gm)
    for i in range(2):
        p = f"layers.{i}"
        for k in ("to_q", "to_k", "to_v"):
            assert t[f"{p}.attention.{k}"] == ("norm", f"{p}.attention_norm1")
        assert t[f"{p}.feed_forward.w1"] == t[f"{p}.feed_forward.w3"] == ("norm", f"{p}.ffn_norm1")
        assert t[f"{p}.attention.to_out.0"] == ("linear", f"{p}.attention.to_v")
        assert t[f"{p}.feed_forward.w2"] == ("linear", f"{p}.feed_forward.w3")
        assert t[f"{p}.adaln_modulation"][0] == "fused"  # reads silu(c): a nonlinearity
    assert t["final_layer.linear"] == ("adaln", "final_layer.adaln_modulation")
    assert t["llm_cond_proj"] == ("norm", "llm_cond_norm")
    assert t["adaln_proj"] == ("linear", "t_embedding.mlp_out")
    n_fused = sum(1 for k, _ in t.values() if k == "fused")
    assert sum(1 for n in gm.graph.nodes if n.target is MUL and str(getattr(n.args[1], "target", "")).endswith(".smooth")) == n_fused
    for seed, t_ in ((50, 0.2), (51, 0.9)):
        ex = ideogram4_inputs(batch=2, text_len=5, image_hw=(3, 5), timestep=t_, seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(gm(**ex).sample, ideogram(**ex).sample, rtol=1e-4, atol=1e-5)


def test_flux_adaln_zero_folds_scale_and_shift_rows():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():  # modulation away from zero, so that the fold is not trivially exact
        for name, p in flux.named_parameters():
            if "norm" in name and name.endswith("linear.bias"):
                p.copy_(torch.randn(p.shape))
    calib = [flux_inputs(2, 16, 8, seed=s) for s in range(2)]
    gm = folded(flux, calib)
    t = targets(gm)
    for k in ("to_q", "to_k", "to_v"):
        assert t[f"transformer_blocks.0.attn.{k}"] == ("adaln", "transformer_blocks.0.norm1.linear")
        assert t[f"single_transformer_blocks.0.attn.{k}"] == ("adaln", "single_transformer_blocks.0.norm.linear")
    assert t["transformer_blocks.0.ff.net.0.proj"] == ("adaln", "transformer_blocks.0.norm1.linear")
    assert t["proj_out"] == ("adaln", "norm_out.linear")
    assert t["transformer_blocks.0.ff.net.2"][0] == "fused"  # behind GELU
    ex = flux_inputs(2, 16, 8, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(gm(**ex).sample, flux(**ex).sample, rtol=1e-4, atol=1e-5)


def test_int8_w8a8_preset_compiles_saves_and_loads(ideogram, tmp_path):
    before = {k: v.clone() for k, v in ideogram.state_dict().items()}
    calib = ideogram4_trajectory(steps=3, seed=5)
    gm = fxquant.compile(ideogram, "int8-w8a8-paper", calibration=calib)
    assert all(torch.equal(before[k], v) for k, v in ideogram.state_dict().items())
    rows = {r.name: r for r in fxquant.summary(gm).rows}
    assert rows["layers.0.attention.to_q"].smoothing == "norm"
    assert rows["final_layer.linear"].smoothing == "adaln"
    assert rows["t_embedding.mlp_out"].kind == "protected" and rows["t_embedding.mlp_out"].smoothing == "none"
    assert {r.smoothing for r in rows.values()} <= {"norm", "adaln", "linear", "fused", "none"}
    assert "smoothing" in str(fxquant.summary(gm)).splitlines()[1]
    # Fused vectors ride inside the W8A8 op; no separate multiply survives lowering.
    assert not any(n.target is MUL and str(getattr(n.args[1], "target", "")).endswith(".smooth") for n in gm.graph.nodes)
    ex = ideogram4_inputs(batch=2, text_len=6, image_hw=(4, 4), timestep=0.4, seed=77)
    with torch.no_grad():
        ref, out = ideogram(**ex).sample, gm(**ex).sample
    assert rel_err(out, ref) < 0.05
    fxquant.save(gm, tmp_path / "m")
    back = fxquant.load(tmp_path / "m")
    assert [r.smoothing for r in fxquant.summary(back).rows] == [r.smoothing for r in fxquant.summary(gm).rows]
    with torch.no_grad():
        torch.testing.assert_close(back(**ex).sample, out, rtol=0, atol=0)


def _quality_ablation():
    path = Path(__file__).resolve().parents[1] / "bench" / "quality_ablation.py"
    spec = importlib.util.spec_from_file_location("quality_ablation", path)
    qa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qa)
    return qa


def test_planted_outliers_keep_the_float_function_and_are_what_they_claim():
    """Channel outliers are exact reparametrisations; the massive pairs cancel in float but are huge
    on a few tokens (w2 inputs) and samples (mlp_out input)."""
    qa = _quality_ablation()
    model = reduced_ideogram4(seed=2, num_layers=2)
    ex = ideogram4_inputs(batch=2, text_len=6, image_hw=(4, 4), timestep=0.5, seed=3)
    channel_only = qa.plant_outliers(model, factor=30.0, massive=0.0, seed=2)
    both = qa.plant_outliers(model, factor=30.0, massive=300.0, seed=2)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in both.named_modules() if n == "layers.1.feed_forward.w2"]
    with torch.no_grad():
        ref = model(**ex).sample
        torch.testing.assert_close(channel_only(**ex).sample, ref, rtol=1e-4, atol=1e-5)
        assert rel_err(both(**ex).sample, ref) < 0.05  # two channels of one FFN and of the t-MLP repurposed
    for h in hooks:
        h.remove()
    assert channel_only.layers[0].attention_norm1.weight.max() > 10 * model.layers[0].attention_norm1.weight.max()
    massive = seen["layers.1.feed_forward.w2"].abs()  # block 1 is planted (every other block)
    j = int(massive.amax(0).argmax())
    assert massive[:, j].max() > 100 * massive.amax(0).median()  # a few channels far above the rest
    assert (massive[:, j] > 0.1 * massive[:, j].max()).float().mean() < 0.3  # on a minority of tokens


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quality_ablation_orders_like_the_paper(seed):
    """naive W8A8 worst, SmoothQuant alone and protection alone better, both together best
    (bench/quality_ablation.py on a 2-layer planted model, held-out inputs), with the protected
    linears chosen by the fragility ranking."""
    qa = _quality_ablation()
    r = qa.ablation(seed=seed, layers=2, factor=20.0, massive=300.0)
    e = r["errors"]
    naive, sq, prot, both = (e[k] for k in qa.VARIANTS)
    assert naive > sq and naive > prot, e
    assert both < sq and both < prot, e
    assert "layers.1.feed_forward.w2" in r["protected"], r["protected"]  # the planted block's, found by ranking


def test_ideogram4_block_adaln_chunk_is_the_fallback_for_qkv(ideogram):
    """With the norm weight unavailable, q/k/v fold into scale_msa: chunk 0 of 4 of the block's
    adaln_modulation, shifted by the +1, broadcast over tokens."""
    ex = ideogram4_inputs(batch=2, text_len=4, image_hw=(2, 3), seed=1)
    gm = trace(ideogram, ex)
    qkv = [n for n in linear_nodes(gm) if module_name(n).startswith("layers.1.attention.to_")][:3]
    x = qkv[0].args[0]
    fold = FoldFinder(gm, frozen={"layers.1.attention_norm1.weight"}).find(x, qkv, 128)
    assert fold is not None and fold.kind == "adaln" and fold.target_name == "layers.1.adaln_modulation"
    assert [(p.target, p.start, p.shift) for p in fold.params] == [
        ("layers.1.adaln_modulation.weight", 0, 0.0), ("layers.1.adaln_modulation.bias", 0, 1.0)]
    s = torch.exp(torch.randn(128))
    for p in fold.params:
        set_parameter(gm, p.target, apply_param_fold(gm.get_parameter(p.target), p, s))
    for n in qkv:
        w = str(n.args[1].target)
        set_parameter(gm, w, gm.get_parameter(w) * s)
    with torch.no_grad():
        torch.testing.assert_close(gm(**ex).sample, ideogram(**ex).sample, rtol=1e-4, atol=1e-5)
    assert FoldFinder(gm, frozen=set()).find(x, qkv, 128).kind == "norm"  # the default choice

