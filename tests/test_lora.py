"""Runtime LoRA on compiled modules (`fxquant.apply_lora`): branches on every lowered kind,
SmoothQuant accounted for exactly, stacking, scales, exact removal, CFG branches, save / load
and ``.pt2`` round trips, merge-before-quantize. The reference is always the float model with
the LoRA merged into its weights (`fxquant.merge_lora`, checked against PEFT in test_lora_files)."""

import copy
import types

import pytest
import torch

import fxquant
from fxquant import meta, pipeline
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4
from fxquant.passes.fold_smoothing import FoldSmoothing
from fxquant.trace import trace

from .conftest import rel_err
from .test_other_dit import flux_inputs

LORA = torch.ops.fxquant.lora.default
W8A8 = torch.ops.fxquant.linear_w8a8.default
GGUF = torch.ops.fxquant.linear_gguf.default
LINEAR = torch.ops.aten.linear.default


SQ_ONLY = fxquant.Recipe.preset("int8-w8a8").replace(name="sq", protect_top_k=0, protect=(), protect_budget=0.0, gptq=False)


def folded(model, calibration, recipe=SQ_ONLY):
    """The pipeline of ``recipe`` up to and including fold_smoothing (no lowering): a float graph
    with every fold in place, on which a LoRA branch must reproduce the merged float model."""
    passes = pipeline.build(recipe, calibration).passes
    cut = next(i for i, p in enumerate(passes) if isinstance(p, FoldSmoothing)) + 1
    gm = trace(model, calibration[0])
    meta.set_graph_record(gm, meta.GraphRecord(recipe=recipe.to_dict()))
    with torch.no_grad():
        return pipeline.run(gm, passes[:cut])


def random_lora(model, rank=4, magnitude=0.5, prefix="transformer.", seed=1, only=None):
    """A diffusers-layout LoRA on every nn.Linear (or those whose name contains ``only``):
    A ~ N(0, 1/in), B scaled to ``magnitude`` times the layer's weight std."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (only is None or only in name):
            sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5
            sd[f"{prefix}{name}.lora_B.weight"] = (torch.randn(mod.out_features, rank, generator=g)
                                                   * magnitude * float(mod.weight.detach().std()))
    return sd


def branch_count(gm):
    return sum(1 for n in gm.graph.nodes if n.target is LORA)


def run(gm, ex):
    with torch.no_grad():
        return gm(**ex)[0]


@pytest.fixture(scope="module")
def model():
    return reduced_ideogram4(seed=3, num_layers=2)


@pytest.fixture(scope="module")
def calib():
    return ideogram4_trajectory(steps=2, seed=4)


@pytest.fixture(scope="module")
def ex():
    return ideogram4_inputs(batch=2, text_len=5, image_hw=(3, 4), timestep=0.3, seed=11)


@pytest.fixture(scope="module")
def w8a8(model, calib):
    return fxquant.compile(model, "int8-w8a8", calibration=calib)


def test_smoothed_graph_with_branches_equals_merged_float(model, calib, ex):
    """Every fold kind (norm, adaln, linear rows, fused) on a float graph: exact up to float rounding."""
    gm = folded(model, calib)
    kinds = {r.smoothing.target for _, r in meta.records(gm)}
    assert {"norm", "adaln", "linear", "fused"} <= kinds
    assert any(r.smoothing.scaled_rows for _, r in meta.records(gm))
    lora = random_lora(model, magnitude=1.0)
    ref = run(fxquant.merge_lora(model, lora), ex)
    assert rel_err(ref, run(model, ex)) > 0.05  # the LoRA changes the output a lot
    fxquant.apply_lora(gm, lora)
    assert branch_count(gm) == len(meta.records(gm))
    torch.testing.assert_close(run(gm, ex), ref, rtol=1e-4, atol=1e-5)


def test_without_smoothing_accounting_the_branch_would_be_wrong(model, calib, ex):
    """The test above can fail: the same branches without rescaling A and B miss the reference."""
    gm = folded(model, calib)
    for node, rec in meta.records(gm):
        if rec.smoothing.target != "fused":
            meta.update(node, smoothing=meta.Smoothing("none"))
    lora = random_lora(model, magnitude=1.0)
    fxquant.apply_lora(gm, lora)
    assert rel_err(run(gm, ex), run(fxquant.merge_lora(model, lora), ex)) > 1e-2


@pytest.mark.slow
def test_flux_adaln_rows_at_an_offset():
    """Flux folds into chunks of AdaLayerNormZero's linear (rows at an offset): still exact."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    gm = folded(flux, [flux_inputs(2, 16, 8, seed=s) for s in range(2)])
    starts = {s for _, r in meta.records(gm) for _, s in r.smoothing.scaled_rows}
    assert any(s > 0 for s in starts)
    lora = random_lora(flux, magnitude=1.0)
    fxquant.apply_lora(gm, lora)
    ex = flux_inputs(2, 16, 8, seed=9)
    torch.testing.assert_close(run(gm, ex), run(fxquant.merge_lora(flux, lora), ex), rtol=1e-4, atol=1e-5)


def _check_quantized(gm, model, lora, ex, kinds):
    targets = {n.target for n, _ in meta.records(gm)}
    assert kinds <= targets, targets
    base, fl, ref = run(gm, ex), run(model, ex), run(fxquant.merge_lora(model, lora), ex)
    fxquant.apply_lora(gm, lora, name="style")
    adapted = {n.args[0].target for n in gm.graph.nodes if n.target is LORA}
    assert kinds <= adapted
    out = run(gm, ex)
    # The branch's effect matches the float LoRA's effect up to the quantization noise around it.
    assert rel_err(out - base, ref - fl) < 0.15
    assert rel_err(out, ref) < 1.5 * rel_err(base, fl) + 1e-4
    return out


def test_w8a8_with_protected_float_linears(w8a8, model, ex):
    gm = copy.deepcopy(w8a8)
    _check_quantized(gm, model, random_lora(model), ex, {W8A8, LINEAR})


@pytest.mark.slow
def test_gguf_q4_k_and_q8_0_mixed(calib):
    wide = reduced_ideogram4(seed=5, num_layers=1, attention_head_dim=64, intermediate_size=512)
    recipe = fxquant.Recipe.preset("q4_k").replace(name="q4_k+q8_0", misaligned="q8_0")
    cal = ideogram4_trajectory(steps=1, seed=4)
    gm = fxquant.compile(wide, recipe, calibration=cal)
    assert {r.lowering.scheme for _, r in meta.records(gm)} >= {"q4_k", "q8_0"}
    ex = ideogram4_inputs(batch=2, text_len=5, image_hw=(3, 4), timestep=0.3, seed=11)
    _check_quantized(gm, wide, random_lora(wide), ex, {GGUF})


def test_stack_scale_and_exact_removal(w8a8, model, ex):
    gm = copy.deepcopy(w8a8)
    code0, state0, base = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, run(gm, ex)
    a, b = random_lora(model, seed=1), random_lora(model, seed=2, only="feed_forward")
    fxquant.apply_lora(gm, a, name="a")
    code_a, out_a = gm.code, run(gm, ex)
    fxquant.apply_lora(gm, b, name="b", scale=0.5)
    assert fxquant.lora_adapters(gm) == {"a": 1.0, "b": 0.5}
    assert branch_count(gm) == len(meta.records(gm)) + 6  # b: w1, w2, w3 of two layers
    out_ab = run(gm, ex)
    fxquant.set_lora_scale(gm, "b", 0.0)
    torch.testing.assert_close(run(gm, ex), out_a, rtol=0, atol=0)  # scale 0: exactly the module without b
    fxquant.set_lora_scale(gm, "b", 0.5)
    torch.testing.assert_close(run(gm, ex), out_ab, rtol=0, atol=0)
    fxquant.remove_lora(gm, "b")  # last in, first out: exactly the previous module
    assert gm.code == code_a
    torch.testing.assert_close(run(gm, ex), out_a, rtol=0, atol=0)
    fxquant.apply_lora(gm, b, name="b", scale=0.5)
    fxquant.remove_lora(gm, "a")  # out of order: the module with b alone
    only_b = fxquant.apply_lora(copy.deepcopy(w8a8), b, name="b", scale=0.5)
    torch.testing.assert_close(run(gm, ex), run(only_b, ex), rtol=1e-5, atol=1e-6)
    fxquant.remove_lora(gm, "b")
    assert gm.code == code0 and not hasattr(gm, "fxquant_lora")
    assert gm.state_dict().keys() == state0.keys()
    assert all(torch.equal(v, state0[k]) for k, v in gm.state_dict().items())
    torch.testing.assert_close(run(gm, ex), base, rtol=0, atol=0)


def test_scale_changes_only_a_buffer(w8a8, model, ex):
    gm = copy.deepcopy(w8a8)
    lora = random_lora(model)
    fxquant.apply_lora(gm, lora, name="s", scale=1.0)
    code, out1 = gm.code, run(gm, ex)
    fxquant.set_lora_scale(gm, "s", 2.0)
    assert gm.code == code
    out2, quant_err = run(gm, ex), rel_err(run(w8a8, ex), run(model, ex))
    assert rel_err(out2, out1) > 0.05
    assert rel_err(out2, run(fxquant.merge_lora(model, lora, 2.0), ex)) < 1.5 * quant_err
    assert "torch.ops.fxquant.lora.default(" in gm.code


def test_cfg_branches_take_their_own_keys(ideogram_pair, ex):
    calib = {k: ideogram4_trajectory(steps=1, seed=i) for i, k in enumerate(ideogram_pair)}
    gms = fxquant.compile(ideogram_pair, "w8a8-naive", calibration=calib)
    cond_only = random_lora(ideogram_pair["cond"])
    fxquant.apply_lora(gms, cond_only, name="c")
    assert branch_count(gms["cond"]) > 0 and branch_count(gms["uncond"]) == 0
    uncond_keys = random_lora(ideogram_pair["uncond"], magnitude=2.0, seed=4, prefix="unconditional_transformer.",
                              only="layers.1")
    fxquant.apply_lora(gms, {**random_lora(ideogram_pair["cond"], seed=3), **uncond_keys}, name="both")
    assert fxquant.lora_adapters(gms["cond"]) == {"c": 1.0, "both": 1.0}
    assert fxquant.lora_adapters(gms["uncond"]) == {"both": 1.0}
    refs = {"cond": fxquant.merge_lora(fxquant.merge_lora(ideogram_pair["cond"], cond_only),
                                       random_lora(ideogram_pair["cond"], seed=3)),
            "uncond": fxquant.merge_lora(ideogram_pair["uncond"], uncond_keys, prefixes="unconditional_transformer")}
    for k in gms:
        fl, ref = run(ideogram_pair[k], ex), run(refs[k], ex)
        assert rel_err(ref, fl) > 0.01
        assert rel_err(run(gms[k], ex), ref) < 1.5 * rel_err(run(gms[k], ex), fl)
    fxquant.remove_lora(gms, "both")
    assert fxquant.lora_adapters(gms["uncond"]) == {}
    # A pipeline holding compiled transformers: each attribute's name is its key prefix.
    pipe = types.SimpleNamespace(transformer=gms["cond"], unconditional_transformer=gms["uncond"])
    fxquant.apply_lora(pipe, uncond_keys, name="u")
    assert fxquant.lora_adapters(gms["uncond"]) == {"u": 1.0} and "u" not in fxquant.lora_adapters(gms["cond"])
    fxquant.set_lora_scale(pipe, "u", 0.5)
    fxquant.remove_lora(pipe, "u")
    with pytest.raises(fxquant.LoraError, match="branch 'a' has no key prefix"):
        fxquant.apply_lora({"a": gms["cond"]}, cond_only)
    with pytest.raises(fxquant.LoraError, match="text_encoder.x.lora_A.weight.*component 'text_encoder'"):
        fxquant.apply_lora(gms, {"text_encoder.x.lora_A.weight": torch.zeros(2, 4),
                                 "text_encoder.x.lora_B.weight": torch.zeros(4, 2)})


def test_save_load_and_pt2_round_trip(w8a8, model, ex, tmp_path):
    gm = copy.deepcopy(w8a8)
    fxquant.apply_lora(gm, random_lora(model), name="style", scale=0.7)
    fxquant.apply_lora(gm, random_lora(model, seed=5, only="attention"), name="detail")
    out = run(gm, ex)
    fxquant.save(gm, tmp_path / "m.safetensors")
    back = fxquant.load(tmp_path / "m.safetensors")
    torch.testing.assert_close(run(back, ex), out, rtol=0, atol=0)
    assert fxquant.lora_adapters(back) == pytest.approx({"style": 0.7, "detail": 1.0})
    fxquant.save_pt2(gm, tmp_path / "m.pt2")
    ep = torch.export.load(tmp_path / "m.pt2").module()
    torch.testing.assert_close(run(ep, ex), out, rtol=0, atol=0)
    assert "torch.ops.fxquant.lora.default(" in ep.code
    # The reloaded module stays adjustable: scale, remove, and apply on a loaded artifact.
    fxquant.set_lora_scale(back, "style", 0.0)
    fxquant.remove_lora(back, "detail")
    torch.testing.assert_close(run(back, ex), run(w8a8, ex), rtol=0, atol=0)
    fxquant.save(w8a8, tmp_path / "plain.safetensors")
    plain = fxquant.load(tmp_path / "plain.safetensors")
    lora = random_lora(model)
    fxquant.apply_lora(plain, lora)
    assert rel_err(run(plain, ex), run(fxquant.merge_lora(model, lora), ex)) < 1.5 * rel_err(run(w8a8, ex), run(model, ex))


def test_bad_input_is_a_lora_error_naming_it(w8a8, model):
    gm = copy.deepcopy(w8a8)
    lora = random_lora(model)
    with pytest.raises(fxquant.LoraError, match="transformer.layers.9.x.lora_A.weight.*matches no linear"):
        fxquant.apply_lora(gm, {**lora, "transformer.layers.9.x.lora_A.weight": torch.zeros(2, 3),
                                "transformer.layers.9.x.lora_B.weight": torch.zeros(3, 2)})
    key = "transformer.layers.0.attention.to_q.lora_A.weight"
    bad = dict(lora)
    bad[key] = torch.zeros(4, 7)
    with pytest.raises(fxquant.LoraError, match="to_q.lora_A.weight.*do not fit linear 'layers.0.attention.to_q'"):
        fxquant.apply_lora(gm, bad)
    assert branch_count(gm) == 0 and not hasattr(gm, "fxquant_lora")  # nothing half-applied
    with pytest.raises(fxquant.LoraError, match="has no LoRA layers"):
        fxquant.apply_lora(gm, {})
    with pytest.raises(fxquant.LoraError, match="adapter name 'a-b'"):
        fxquant.apply_lora(gm, lora, name="a-b")
    fxquant.apply_lora(gm, lora, name="x")
    with pytest.raises(fxquant.LoraError, match="already has an adapter named 'x'"):
        fxquant.apply_lora(gm, lora, name="x")
    with pytest.raises(fxquant.LoraError, match="no adapter named 'y'.*applied: \\['x'\\]"):
        fxquant.remove_lora(gm, "y")
    with pytest.raises(fxquant.LoraError, match="scale must be a finite number"):
        fxquant.set_lora_scale(gm, "x", float("nan"))
    with pytest.raises(fxquant.LoraError, match="expected a compiled GraphModule.*got Ideogram4Transformer2DModel"):
        fxquant.apply_lora(model, lora)


def test_artifact_without_smoothing_vectors_is_refused(w8a8, model):
    gm = copy.deepcopy(w8a8)
    for node, rec in meta.records(gm):  # as written before the vector was recorded
        meta.update(node, smoothing=meta.Smoothing(rec.smoothing.target, rec.smoothing.target_name))
    with pytest.raises(fxquant.LoraError, match="holds no smoothing vector"):
        fxquant.apply_lora(gm, random_lora(model))


def test_compile_with_lora_merges_before_quantizing(model, calib, ex):
    lora = random_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxquant.compile(model, "w8a8-naive", calibration=calib, lora=lora, lora_scale=0.8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    ref = fxquant.compile(fxquant.merge_lora(model, lora, 0.8), "w8a8-naive", calibration=calib)
    torch.testing.assert_close(run(gm, ex), run(ref, ex), rtol=0, atol=0)
    assert branch_count(gm) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_op_against_plain_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 12, generator=g).to(dtype), torch.randn(2, 5, 7, generator=g).to(dtype)
    down, up = torch.randn(3, 12, generator=g).to(dtype), torch.randn(7, 3, generator=g).to(dtype)
    scale = torch.tensor(0.7)
    out = LORA(y, x, down, up, scale, 0.5)
    ref = y.double() + 0.35 * (x.double() @ down.double().T) @ up.double().T
    assert out.dtype == dtype and out.shape == y.shape
    torch.testing.assert_close(out.double(), ref, rtol=2e-2 if dtype is torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype is torch.bfloat16 else 1e-5)
    torch.library.opcheck(LORA, (y, x, down, up, scale, 0.5))
