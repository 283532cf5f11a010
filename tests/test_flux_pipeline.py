"""A real single-transformer diffusers pipeline: a tiny `FluxPipeline` (tiny CLIP and T5 text
encoders, tiny VAE, word-level tokenizers built here; nothing from a hub), quantized in place by
`fxquant.quantize_pipeline`, run, saved and loaded back without its float transformer.

Flux pipelines wrap every transformer call in ``transformer.cache_context("cond")`` and call it
with ``guidance``, ``joint_attention_kwargs`` and ``return_dict=False``: the drop-in module must
take all of it. Measured here: 62.7 dB PSNR of the quantized pipeline's image against the float
pipeline's (int8-w8a8-paper); the bound below leaves room for other CPUs' kernels.
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


def tiny_flux_pipeline():
    """Shapes of diffusers' own Flux pipeline test fixture, text encoders built from local configs."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=64,
                                        hidden_act="gelu", projection_dim=32))
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8))
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
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
    assert out.shape == ref.shape and _psnr(out, ref) > 45
    with pytest.raises(fxquant.FxquantError, match="enable_cache"):
        pipe.transformer.enable_cache(object())

    fxquant.save_pipeline(pipe, tmp_path / "q")
    loaded = fxquant.load_pipeline(tmp_path / "float", tmp_path / "q")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "FluxPipeline" and isinstance(loaded.transformer, fxquant.QuantizedModule)
    torch.testing.assert_close(_image(loaded), out, rtol=0, atol=0)
