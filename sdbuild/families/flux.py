"""Flux.1: its record, and with random weights the embedded tiny model and the published FLUX.1-dev architecture.

Every component of the real layout: FluxTransformer2DModel (double-stream then single-stream
blocks, guidance embedding, 3-axis RoPE), a CLIP text encoder (pooled prompt embedding) and a T5
encoder (per-token embeddings), each with a tokenizer built from code (no downloads), a
16-channel AutoencoderKL without quant convs, and FlowMatchEulerDiscreteScheduler with FLUX.1-dev's
resolution-dependent shift. Saved as safetensors and loaded back through `from_pretrained`
(sdbuild/models.py), like any real model.
"""

from __future__ import annotations

from typing import Any, Dict

from ..spec import ModelFamily
from .common import clip_text_encoder, clip_tokenizer, seeded, t5_encoder, t5_tokenizer
from .family import FLOW_SCHEDULERS, Family

# FLUX.1-dev (black-forest-labs/FLUX.1-dev), component configs as published.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
FLUX_CLIP = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
FLUX_T5 = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
               feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", relative_attention_num_buckets=32,
               relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)

# The tiny Flux: two double-stream and two single-stream blocks of width 32 (2 heads of 16; RoPE axes
# 4+6+6 = 16), a CLIP and a T5 encoder of width 32, the VAE's 8x downsampling and 16 latent channels.
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_FLUX_VAE = dict(FLUX_VAE, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     sample_size=64, force_upcast=False)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
TINY_T5 = dict(FLUX_T5, vocab_size=None, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=16)

RANDOM_FLUX: Dict[str, Dict[str, Any]] = {
    "tiny-flux": dict(transformer=TINY_FLUX_TRANSFORMER, vae=TINY_FLUX_VAE, clip=TINY_CLIP, t5=TINY_T5,
                      scheduler=FLUX_SCHEDULER),
    "flux-arch": dict(transformer=FLUX_TRANSFORMER, vae=FLUX_VAE, clip=FLUX_CLIP, t5=FLUX_T5, scheduler=FLUX_SCHEDULER),
}


def build_random(name: str):
    """A FluxPipeline with random weights (fixed seeds) from RANDOM_FLUX."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    cfg = RANDOM_FLUX[name]
    clip_tok, vocab = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    parts = seeded(transformer=(0, lambda: FluxTransformer2DModel(**cfg["transformer"])),
                   vae=(1, lambda: AutoencoderKL(**cfg["vae"])),
                   text_encoder=(2, lambda: clip_text_encoder(CLIPTextModel, cfg["clip"], vocab)),
                   text_encoder_2=(4, lambda: t5_encoder(cfg["t5"], tokenizer_2)))
    return FluxPipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]), tokenizer=clip_tok,
                        tokenizer_2=tokenizer_2)


FAMILY = Family(ModelFamily.flux, "FluxPipeline", "transformer", ("transformer", "vae", "text_encoder", "text_encoder_2"),
                FLOW_SCHEDULERS, guidance_distilled=True, packed_latents=True, cache_hooks=True, dispatcher=True,
                context_parallel=True, tensor_parallel=True, text_tokens=512,
                random_models=RANDOM_FLUX, build_random=build_random)
