"""The family record: what differs between SD 1.x, SDXL, Flux and SD3, as data the rest of sdbuild asks.

Each family module (sd15.py, sdxl.py, flux.py, sd3.py) builds one `Family`; sdbuild/families/__init__.py
collects them. Nothing here imports torch or diffusers at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Tuple

from ..spec import ModelFamily, SchedulerKind

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
    # diffusers 0.42's parallelism plans on its denoiser class: `_cp_plan` (context parallelism: Ulysses,
    # ring) and `_tp_plan` (tensor parallelism); tests/test_parallel.py checks both against diffusers.
    context_parallel: bool = False
    tensor_parallel: bool = False
    text_tokens: int = 0  # the text sequence the denoiser attends over (the pipeline's max_sequence_length)
    load_kwargs: Tuple[Tuple[str, Any], ...] = ()  # extra from_pretrained arguments
    # The random-weight layouts this family builds from code ("tiny-sd15", "sd15-arch", ...: name ->
    # component configs) and the function that builds a pipeline from one of them, by name.
    random_models: Mapping[str, Mapping[str, Any]] = None  # type: ignore[assignment]
    build_random: Callable[[str], Any] = None  # type: ignore[assignment]

    @property
    def transformer(self) -> bool:
        return self.denoiser == "transformer"

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)
