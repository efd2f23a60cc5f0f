"""Stable Diffusion 1.x: its record, the published SD 1.5 architecture and the embedded tiny model
(random weights, built from code), and the builder of either as a StableDiffusionPipeline.

The tiny model keeps the SD 1.x layout (cross-attention and plain blocks, a VAE that downsamples 8x,
a CLIP text encoder) at dimensions that run 50 steps in seconds on a CPU. Saved as safetensors and
loaded back through `from_pretrained` (sdbuild/models.py), like any real model.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from ..spec import ModelFamily
from .common import clip_text_encoder, clip_tokenizer, seeded
from .family import UNET_SCHEDULERS, Family

# Published Stable Diffusion 1.5 component configs (runwayml/stable-diffusion-v1-5).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    act_fn="silu",
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14 text tower
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# The embedded tiny model: the SD 1.x layout (cross-attention and plain blocks, a VAE that
# downsamples 8x, a CLIP text encoder) at dimensions that run 50 steps in seconds on a CPU.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
)

RANDOM_MODELS: Dict[str, Dict[str, Any]] = {
    "tiny-sd15": dict(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, scheduler=SD15_SCHEDULER),
    "sd15-arch": dict(unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT, scheduler=SD15_SCHEDULER),
}


def unet_parts(cfg: Mapping[str, Any]):
    """The seeded components a UNet pipeline shares (UNet, VAE, first CLIP text encoder), its
    tokenizer and vocabulary, and its DDIM scheduler: what SD 1.x and SDXL build alike."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer, vocab = clip_tokenizer()
    parts = seeded(unet=(0, lambda: UNet2DConditionModel(**cfg["unet"])), vae=(1, lambda: AutoencoderKL(**cfg["vae"])),
                   text_encoder=(2, lambda: clip_text_encoder(CLIPTextModel, cfg["text"], vocab)))
    return parts, tokenizer, vocab, DDIMScheduler(**cfg["scheduler"])


def build_random(name: str):
    """A StableDiffusionPipeline with random weights (fixed seeds) from RANDOM_MODELS."""
    from diffusers import StableDiffusionPipeline

    parts, tokenizer, _, scheduler = unet_parts(RANDOM_MODELS[name])
    return StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


FAMILY = Family(ModelFamily.sd15, "StableDiffusionPipeline", "unet", ("unet", "vae", "text_encoder"), UNET_SCHEDULERS,
                load_kwargs=(("safety_checker", None), ("requires_safety_checker", False)),
                random_models=RANDOM_MODELS, build_random=build_random)
