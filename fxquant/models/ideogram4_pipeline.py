"""A tiny, complete diffusers `Ideogram4Pipeline` with seeded random weights, built locally (nothing
from a hub): a tiny Qwen3-VL text encoder, a one-block Flux2 VAE, both transformers, and a
word-level tokenizer with a chat template. Shapes follow diffusers' own Ideogram 4 test fixture
(tests/lora), widened so that the transformers' linears are multiples of 32 (Q8_0 blocks).
Needs ``transformers`` (``pip install fxquant[diffusers]``).

    pipe = tiny_ideogram4_pipeline()
    image = pipe("a red bicycle", **TINY_CALL).images[0]
"""

from __future__ import annotations

import torch

WORDS = ("a red blue green bicycle dog cat house tree on the in of with small big photo painting "
         "sunny night street river mountain car boat bird flower").split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} "
                 "{% for c in m['content'] %}{{ c['text'] }}{% endfor %} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
TEXT_HIDDEN = 32
TINY_CALL = dict(height=16, width=16, num_inference_steps=4, guidance_scale=4.0, guidance_schedule=None,
            max_sequence_length=32)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + ["user", "assistant", "<unk>"] + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def tiny_components(seed: int = 0) -> dict:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Transformer2DModel
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS
    from transformers import Qwen3VLConfig, Qwen3VLModel

    text = dict(hidden_size=TEXT_HIDDEN, num_hidden_layers=max(QWEN3_VL_ACTIVATION_LAYERS) + 1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=32, head_dim=16, vocab_size=64, max_position_embeddings=256,
                rope_theta=10_000.0)
    vision = dict(hidden_size=8, depth=1, num_heads=2, intermediate_size=16, out_hidden_size=TEXT_HIDDEN, patch_size=14)
    dit = dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4, intermediate_size=128,
               adaln_dim=32, llm_features_dim=len(QWEN3_VL_ACTIVATION_LAYERS) * TEXT_HIDDEN, rope_theta=10_000,
               mrope_section=(4, 2, 2), norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Ideogram4Transformer2DModel(**dit)
        unconditional = Ideogram4Transformer2DModel(**dit)
        vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                 latent_channels=4, norm_num_groups=1, sample_size=32, patch_size=(2, 2),
                                 use_quant_conv=False, use_post_quant_conv=False)
        text_encoder = Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=tiny_tokenizer(), transformer=transformer.eval(), unconditional_transformer=unconditional.eval())


def tiny_ideogram4_pipeline(seed: int = 0):
    from diffusers import Ideogram4Pipeline

    return Ideogram4Pipeline(**tiny_components(seed))
