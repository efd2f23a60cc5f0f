"""Stable Diffusion XL: its record, the published SDXL base 1.0 architecture and the embedded tiny
SDXL (random weights, built from code): two text encoders, added time/text conditioning, linear
projections, multi-layer transformer blocks, at CPU-test dimensions for the tiny one."""

from __future__ import annotations

from typing import Any, Dict

from ..spec import ModelFamily
from .common import clip_text_encoder, seeded
from .family import UNET_SCHEDULERS, Family
from .sd15 import SD15_SCHEDULER, SD15_TEXT, SD15_VAE, TINY_TEXT, TINY_VAE, unet_parts

# Published Stable Diffusion XL base 1.0 component configs (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT_2 = dict(  # OpenCLIP ViT-bigG/14 text tower, with projection
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="gelu",
    projection_dim=1280,
)

# The tiny SDXL: SDXL's layout (two text encoders, added time/text conditioning, linear
# projections, multi-layer transformer blocks) at CPU-test dimensions.
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,  # the two text encoders' hidden states, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
    norm_num_groups=16,
)
TINY_SDXL_TEXT_2 = dict(TINY_TEXT, hidden_act="gelu")

RANDOM_MODELS: Dict[str, Dict[str, Any]] = {
    "tiny-sdxl": dict(unet=TINY_SDXL_UNET, vae=TINY_VAE, text=TINY_TEXT, text_2=TINY_SDXL_TEXT_2,
                      scheduler=SD15_SCHEDULER),
    "sdxl-arch": dict(unet=SDXL_UNET, vae=SDXL_VAE, text=SD15_TEXT, text_2=SDXL_TEXT_2, scheduler=SD15_SCHEDULER),
}


def build_random(name: str):
    """A StableDiffusionXLPipeline with random weights (fixed seeds) from RANDOM_MODELS."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    cfg = RANDOM_MODELS[name]
    parts, tokenizer, vocab, scheduler = unet_parts(cfg)
    parts.update(seeded(text_encoder_2=(4, lambda: clip_text_encoder(CLIPTextModelWithProjection, cfg["text_2"], vocab))))
    return StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)


FAMILY = Family(ModelFamily.sdxl, "StableDiffusionXLPipeline", "unet", ("unet", "vae", "text_encoder", "text_encoder_2"),
                UNET_SCHEDULERS, random_models=RANDOM_MODELS, build_random=build_random)
