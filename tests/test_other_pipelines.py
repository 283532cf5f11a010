"""Real single-transformer diffusers pipelines, tiny and built here (CLIP / T5 text encoders from
local configs, word-level tokenizers, tiny VAEs; nothing from a hub), quantized in place by
`fxquant.quantize_pipeline` (``pipe.transformer``) and run: `FluxPipeline` (also saved and loaded
back without its float transformer), `StableDiffusion3Pipeline` and `PixArtSigmaPipeline`.

Flux and SD3 wrap every transformer call in ``transformer.cache_context("cond")`` and pass
``joint_attention_kwargs`` / ``return_dict=False``; PixArt passes ``added_cond_kwargs``: the
drop-in module must take all of it. Measured here (int8-w8a8-paper, image PSNR against the float
pipeline's): Flux 62.7 dB, SD3 51.1 dB, PixArt-Sigma 43.5 dB; the bounds below are ~8 dB lower,
room for other CPUs' kernels.
"""

import pytest
import torch

import fxquant

pytestmark = pytest.mark.slow
CALL = dict(num_inference_steps=2, guidance_scale=5.0, height=8, width=8, max_sequence_length=16)
WORDS = "a red blue bicycle dog cat house on the street painting of squirrel eating burger".split()


def _tokenizer(max_len):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   model_max_length=max_len)


def _t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)).eval()


def _clip(cls_name="CLIPTextModel"):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, pad_token_id=1, vocab_size=64, hidden_act="gelu", projection_dim=32)).eval()


def _vae(latent_channels):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_flux_pipeline():
    """Shapes of diffusers' own Flux pipeline test fixture, text encoders built from local configs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    clip, t5, vae = _clip(), _t5(), _vae(1)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip.eval(),
                        tokenizer=_tokenizer(77), text_encoder_2=t5.eval(), tokenizer_2=_tokenizer(512),
                        transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt="a red bicycle on the street"):
    with torch.no_grad():
        return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **CALL).images


def _psnr(a, b):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def test_flux_pipeline_quantized_saved_and_loaded(tmp_path):
    pipe = tiny_flux_pipeline()
    ref = _image(pipe)
    pipe.save_pretrained(tmp_path / "float")
    q = fxquant.quantize_pipeline(pipe, "int8-w8a8-paper", prompts=["a red bicycle", "a dog on the street"], **CALL)
    assert list(q) == ["transformer"] and pipe.transformer is q["transformer"]
    counts = fxquant.summary(pipe.transformer).counts()
    assert counts.get("w8a8", 0) >= 20, counts
    out = _image(pipe)
    assert out.shape == ref.shape and _psnr(out, ref) > 50, _psnr(out, ref)
    with pytest.raises(fxquant.FxquantError, match="enable_cache"):
        pipe.transformer.enable_cache(object())

    fxquant.save_pipeline(pipe, tmp_path / "q")
    loaded = fxquant.load_pipeline(tmp_path / "float", tmp_path / "q")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "FluxPipeline" and isinstance(loaded.transformer, fxquant.QuantizedModule)
    torch.testing.assert_close(_image(loaded), out, rtol=0, atol=0)


def tiny_sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4), transformer=transformer.eval(),
        text_encoder=_clip("CLIPTextModelWithProjection"), tokenizer=_tokenizer(77),
        text_encoder_2=_clip("CLIPTextModelWithProjection"), tokenizer_2=_tokenizer(77),
        text_encoder_3=_t5(), tokenizer_3=_tokenizer(512))


def tiny_pixart_pipeline():
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtSigmaPipeline(transformer=transformer.eval(), vae=_vae(4), scheduler=DDIMScheduler(),
                               text_encoder=_t5(), tokenizer=_tokenizer(512))


@pytest.mark.parametrize("build, call, bound", [
    (tiny_sd3_pipeline, dict(height=32, width=32), 43),
    (tiny_pixart_pipeline, dict(height=16, width=16, use_resolution_binning=False, clean_caption=False), 35),
], ids=["sd3", "pixart-sigma"])
def test_single_transformer_pipeline_quantized_in_place(build, call, bound):
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, guidance_scale=5.0, max_sequence_length=16, **call)

    def image():
        with torch.no_grad():
            return pipe("a red bicycle", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images

    ref = image()
    q = fxquant.quantize_pipeline(pipe, "int8-w8a8-paper", prompts=["a red bicycle", "a dog on the street"], **call)
    assert list(q) == ["transformer"] and isinstance(pipe.transformer, fxquant.QuantizedModule)
    assert fxquant.summary(pipe.transformer).counts().get("w8a8", 0) >= 10
    out = image()
    assert out.shape == ref.shape and _psnr(out, ref) > bound, _psnr(out, ref)
