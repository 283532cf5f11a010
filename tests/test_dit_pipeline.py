"""fxquant on a real diffusers pipeline: DiT (class-conditional, CFG by batch concatenation), tiny
and seeded. Its timestep embedder is called twice per forward (blocks and final layer)."""

import pytest
import torch

import fxquant

from .conftest import rel_err


@pytest.fixture(scope="module")
def recorded():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, Transformer2DModel

    torch.manual_seed(0)
    tr = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
                            sample_size=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
                            norm_num_groups=32).eval()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    pipe = DiTPipeline(transformer=tr, vae=vae, scheduler=DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    with fxquant.record_inputs(pipe.transformer, max_items=8) as rec:
        pipe(class_labels=[1], num_inference_steps=4, output_type="np", guidance_scale=4.0,
             generator=torch.Generator().manual_seed(0))
    return pipe, rec


def test_record_inputs_sees_the_pipeline_calls(recorded):
    _, rec = recorded
    assert len(rec) == 4 and rec.calls == 4
    assert rec.timesteps == [750.0, 500.0, 250.0, 0.0]  # the scheduler's trajectory, in denoising order
    assert rec[0]["hidden_states"].shape == (2, 4, 8, 8)  # CFG: conditional and null-class halves


@pytest.mark.parametrize("recipe, scheme, bound", [("int8-w8a8-paper", "w8a8", 0.03), ("q8_0", "q8_0", 0.01)])
def test_compile_on_recorded_inputs(recorded, recipe, scheme, bound):
    pipe, rec = recorded
    gm = fxquant.compile(pipe.transformer, recipe, calibration=list(rec)[:3])
    rows = fxquant.summary(gm).rows
    names = [r.name for r in rows]
    emb = "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"
    assert emb in names and emb + "#1" in names  # one row per call of the embedder
    lowered = [r for r in rows if r.scheme == scheme]
    assert len(lowered) >= len(rows) - 2, fxquant.summary(gm)  # int8-w8a8-paper protects one or two
    with torch.no_grad():
        ref, out = pipe.transformer(**rec[3]).sample, gm(**rec[3]).sample  # a held-out step
    assert rel_err(out, ref) < bound


def test_save_and_load_with_a_module_called_twice(recorded, tmp_path):
    pipe, rec = recorded
    gm = fxquant.compile(pipe.transformer, "int8-w8a8", calibration=list(rec)[:3])
    fxquant.save(gm, tmp_path / "dit.safetensors")
    loaded = fxquant.load(tmp_path / "dit.safetensors")
    assert [r.name for r in fxquant.summary(loaded).rows] == [r.name for r in fxquant.summary(gm).rows]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**rec[3]).sample, gm(**rec[3]).sample, rtol=0, atol=0)


def test_quantize_pipeline_with_one_transformer(recorded):
    """`quantize_pipeline` on a single-transformer pipeline (pipe.transformer), every 2nd step."""
    import copy

    from diffusers import DDIMScheduler, DiTPipeline

    pipe, _ = recorded
    run = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    quant = DiTPipeline(transformer=copy.deepcopy(pipe.transformer), vae=pipe.vae, scheduler=DDIMScheduler(),
                        id2label={0: "cat", 1: "dog"})
    quant.set_progress_bar_config(disable=True)
    q = fxquant.quantize_pipeline(quant, "int8-w8a8", prompts=[[1], [0]], step_stride=2, **run)
    assert list(q) == ["transformer"] and quant.transformer is q["transformer"]
    assert isinstance(quant.transformer, fxquant.QuantizedModule) and quant.transformer.config.num_layers == 1
    assert fxquant.meta.graph_record(q["transformer"]).num_calibration == 4  # steps 0 and 2 of two runs
    ref = pipe([1], generator=torch.Generator().manual_seed(0), **run).images
    out = quant([1], generator=torch.Generator().manual_seed(0), **run).images
    assert rel_err(torch.from_numpy(out), torch.from_numpy(ref)) < 0.05


def test_quantize_pipeline_names_bad_arguments(recorded):
    pipe, _ = recorded
    for kwargs, fragment in ((dict(prompts=[]), "at least one calibration prompt"),
                             (dict(prompts=[[1]], step_stride=0), "step_stride must be an integer >= 1"),
                             (dict(prompts=[[1]], max_items=4), "keep_inputs"),
                             (dict(prompts=[[1]], components=["nope"]), "component 'nope'")):
        with pytest.raises(fxquant.FxquantError, match=fragment):
            fxquant.quantize_pipeline(pipe, "int8-w8a8", **kwargs)
    assert not isinstance(pipe.transformer, fxquant.QuantizedModule)
