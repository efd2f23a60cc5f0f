"""Stable Diffusion 3.5: its record, and with random weights the embedded tiny model and the published SD 3.5 Large architecture.

Every component of the real layout: SD3Transformer2DModel (joint-attention MMDiT blocks, 2x2 patches,
RMS-normed QK), three text encoders, each with a tokenizer built from code (no downloads): CLIP-L and
OpenCLIP bigG with projections (their pooled outputs are the pooled prompt embedding; their hidden
states, padded to T5's width, precede T5's tokens) and a T5 encoder; a 16-channel AutoencoderKL
without quant convs; FlowMatchEulerDiscreteScheduler with SD3's shift of 3. Classifier-free guidance,
as in the real pipeline.
"""

from __future__ import annotations

from typing import Any, Dict

from ..spec import ModelFamily
from .common import clip_text_encoder, clip_tokenizer, seeded, t5_encoder, t5_tokenizer
from .family import FLOW_SCHEDULERS, Family
from .flux import FLUX_T5

# stabilityai/stable-diffusion-3.5-large, component configs as published.
SD35_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)
SD35_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
SD35_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# The tiny SD3: two joint blocks of width 32 (2 heads of 16), CLIP encoders of width 32 each (pooled
# 32 + 32 = 64), a T5 of width 64 (the CLIP hidden states, 32 + 32 wide, are padded to it).
TINY_SD3_TRANSFORMER = dict(SD35_TRANSFORMER, sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                            joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                            pos_embed_max_size=16)
TINY_SD3_VAE = dict(SD35_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                    sample_size=64)
TINY_CLIP_L = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
TINY_CLIP_G = dict(TINY_CLIP_L, hidden_act="gelu")
TINY_SD3_T5 = dict(FLUX_T5, vocab_size=None, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)

RANDOM_SD3: Dict[str, Dict[str, Any]] = {
    "tiny-sd3": dict(transformer=TINY_SD3_TRANSFORMER, vae=TINY_SD3_VAE, clip_l=TINY_CLIP_L, clip_g=TINY_CLIP_G,
                     t5=TINY_SD3_T5, scheduler=SD35_SCHEDULER),
    "sd3-arch": dict(transformer=SD35_TRANSFORMER, vae=SD35_VAE, clip_l=SD35_CLIP_L, clip_g=SD35_CLIP_G, t5=FLUX_T5,
                     scheduler=SD35_SCHEDULER),
}


def build_random(name: str):
    """A StableDiffusion3Pipeline with random weights (fixed seeds) from RANDOM_SD3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    cfg = RANDOM_SD3[name]
    clip_tok, vocab = clip_tokenizer()
    tokenizer_3 = t5_tokenizer(256)
    parts = seeded(transformer=(0, lambda: SD3Transformer2DModel(**cfg["transformer"])),
                   vae=(1, lambda: AutoencoderKL(**cfg["vae"])),
                   text_encoder=(2, lambda: clip_text_encoder(CLIPTextModelWithProjection, cfg["clip_l"], vocab)),
                   text_encoder_2=(4, lambda: clip_text_encoder(CLIPTextModelWithProjection, cfg["clip_g"], vocab)),
                   text_encoder_3=(5, lambda: t5_encoder(cfg["t5"], tokenizer_3)))
    return StableDiffusion3Pipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
                                    tokenizer=clip_tok, tokenizer_2=clip_tok, tokenizer_3=tokenizer_3)


# diffusers 0.42: SD3Transformer2DModel has no CacheMixin and StableDiffusion3Pipeline sets no cache context;
# its JointAttnProcessor2_0 calls torch's SDPA directly, not the dispatcher.
FAMILY = Family(ModelFamily.sd3, "StableDiffusion3Pipeline", "transformer",
                ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), FLOW_SCHEDULERS,
                random_models=RANDOM_SD3, build_random=build_random)
