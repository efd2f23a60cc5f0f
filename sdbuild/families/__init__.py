"""Model families: what differs between SD 1.x, SDXL, Flux and SD3, one record each.

A family says which diffusers pipeline class loads it, which component denoises (a UNet or a
transformer), which folders must hold weights, which schedulers it is trained for, how its initial
noise is laid out and whether its guidance is distilled. The builder (sdbuild/builder.py) asks the family and
never tests model names. The random-weight layouts of the transformer families live beside them (`flux.py`, `sd3.py`); SD 1.x and
SDXL's are in sdbuild/models.py.
Nothing here imports torch or diffusers at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ..spec import ModelFamily, SchedulerKind, Spec

UNET_SCHEDULERS = (SchedulerKind.ddim, SchedulerKind.dpmpp_2m, SchedulerKind.euler, SchedulerKind.pndm)
FLOW_SCHEDULERS = (SchedulerKind.flow_euler,)


@dataclass(frozen=True)
class Family:
    family: ModelFamily
    pipeline: str  # the diffusers pipeline class
    denoiser: str  # the pipeline attribute that denoises: "unet" or "transformer"
    components: Tuple[str, ...]  # subfolders that must hold safetensors weights
    schedulers: Tuple[SchedulerKind, ...]  # the schedulers it is trained for
    guidance_distilled: bool = False  # guidance is an input embedding, no classifier-free guidance batch
    packed_latents: bool = False  # the pipeline takes latents as a sequence of 2x2 patches (Flux)
    cache_hooks: bool = False  # diffusers' cache hooks run on it (CacheMixin, and its pipeline sets a cache context)
    dispatcher: bool = False  # its attention processors call diffusers' attention dispatcher (set_attention_backend)
    load_kwargs: Tuple[Tuple[str, Any], ...] = ()  # extra from_pretrained arguments

    @property
    def transformer(self) -> bool:
        return self.denoiser == "transformer"

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


FAMILIES: Dict[ModelFamily, Family] = {
    ModelFamily.sd15: Family(ModelFamily.sd15, "StableDiffusionPipeline", "unet", ("unet", "vae", "text_encoder"),
                             UNET_SCHEDULERS, load_kwargs=(("safety_checker", None), ("requires_safety_checker", False))),
    ModelFamily.sdxl: Family(ModelFamily.sdxl, "StableDiffusionXLPipeline", "unet",
                             ("unet", "vae", "text_encoder", "text_encoder_2"), UNET_SCHEDULERS),
    ModelFamily.flux: Family(ModelFamily.flux, "FluxPipeline", "transformer",
                             ("transformer", "vae", "text_encoder", "text_encoder_2"), FLOW_SCHEDULERS,
                             guidance_distilled=True, packed_latents=True, cache_hooks=True, dispatcher=True),
    # diffusers 0.42: SD3Transformer2DModel has no CacheMixin and StableDiffusion3Pipeline sets no cache context;
    # its JointAttnProcessor2_0 calls torch's SDPA directly, not the dispatcher.
    ModelFamily.sd3: Family(ModelFamily.sd3, "StableDiffusion3Pipeline", "transformer",
                            ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), FLOW_SCHEDULERS),
}

TRANSFORMER_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.transformer)
CACHE_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.cache_hooks)
DISPATCHER_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.dispatcher)
UNET_FAMILIES = tuple(f.family for f in FAMILIES.values() if not f.transformer)


def family_of(spec: Spec) -> Family:
    return FAMILIES[spec.model.family]


def denoiser(pipe):
    """The pipeline's denoising model: its UNet or its transformer."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
