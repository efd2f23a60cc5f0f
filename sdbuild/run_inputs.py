"""The pipeline call a run makes: image size, initial noise, and the keyword arguments.

Initial latents are drawn on the CPU in fp32 from `run.seed` and only then cast to the
pipeline's dtype and device, so every configuration (fp32, fp16, CUDA, CPU) starts from the
same noise and their images can be compared pixel for pixel.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .families import denoiser, family_of
from .spec import Spec


def image_size(spec: Spec) -> Tuple[int, int]:
    """(height, width): the run's, or the model's native resolution."""
    return spec.run.height or spec.model.resolution, spec.run.width or spec.model.resolution


def initial_latents(spec: Spec, pipe, device: str) -> torch.Tensor:
    """Noise of shape (batch, latent channels, height/8, width/8); a family whose pipeline takes
    packed latents (Flux: 2x2 patches as tokens) gets the same noise packed, as its pipeline packs it."""
    height, width = image_size(spec)
    model, scale = denoiser(pipe), pipe.vae_scale_factor
    packed = family_of(spec).packed_latents
    channels = model.config.in_channels // 4 if packed else model.config.in_channels
    h, w = (2 * (height // (scale * 2)), 2 * (width // (scale * 2))) if packed else (height // scale, width // scale)
    shape = (spec.run.batch_size, channels, h, w)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(spec.run.seed), dtype=torch.float32)
    if packed:
        noise = pipe._pack_latents(noise, spec.run.batch_size, channels, h, w)
    return noise.to(device=device, dtype=model.dtype)


def call_kwargs(spec: Spec, pipe, device: str) -> Dict[str, Any]:
    """Everything passed to `pipe(...)`; output as float numpy in [0, 1] (no PIL in the timed path)."""
    run = spec.run
    height, width = image_size(spec)
    kwargs: Dict[str, Any] = dict(
        prompt=[run.prompt] * run.batch_size,
        num_inference_steps=run.steps,
        guidance_scale=run.guidance_scale,
        height=height,
        width=width,
        latents=initial_latents(spec, pipe, device),
        generator=torch.Generator("cpu").manual_seed(run.seed),
        output_type="np",
    )
    if run.negative_prompt is not None:
        kwargs["negative_prompt"] = [run.negative_prompt] * run.batch_size
    if run.max_sequence_length is not None:  # families with a T5 encoder only (capabilities.py refuses the rest)
        kwargs["max_sequence_length"] = run.max_sequence_length
    return kwargs


def pipeline_call(spec: Spec, pipe):
    """What the measurement calls: the pipeline, under torch.inference_mode when run.inference_mode."""
    if not spec.run.inference_mode:
        return pipe

    def call(**kwargs):
        import torch

        with torch.inference_mode():
            return pipe(**kwargs)

    call.__wrapped__ = pipe  # the pipeline itself, for whoever inspects what is measured
    return call


def adherence_calls(spec: Spec, pipe, device: str, prompts, seeds):
    """The prompt-adherence pass's calls (sdbuild.job.adherence_fields): every prompt with every seed,
    `fidelity.batch` images a call, each image's noise drawn from its own seed as a single run's is;
    otherwise the row's own call (steps, guidance, size). Yields (prompts of the call, kwargs)."""
    import dataclasses

    pairs = [(p, s) for s in seeds for p in prompts]
    for start in range(0, len(pairs), spec.fidelity.batch):
        chunk = pairs[start:start + spec.fidelity.batch]
        noise = [initial_latents(dataclasses.replace(spec, run=dataclasses.replace(spec.run, batch_size=1, seed=s)),
                                 pipe, device) for _, s in chunk]
        one = dataclasses.replace(spec, run=dataclasses.replace(spec.run, batch_size=len(chunk), negative_prompt=None))
        kwargs = call_kwargs(one, pipe, device)
        kwargs.update(prompt=[p for p, _ in chunk], latents=torch.cat(noise))
        if spec.run.negative_prompt is not None:
            kwargs["negative_prompt"] = [spec.run.negative_prompt] * len(chunk)
        yield [p for p, _ in chunk], kwargs
