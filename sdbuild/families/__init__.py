"""Model families: one module each (sd15.py, sdxl.py, flux.py, sd3.py), collected here.

A family module holds its record (`FAMILY`: which diffusers pipeline class loads it, which component
denoises, which folders must hold weights, which schedulers it is trained for, how its initial noise
is laid out, whether its guidance is distilled), its random-weight layouts (the tiny model and the
published architecture) and the function that builds one of them. What they share (seeded
construction, tokenizers and text encoders built from code) is in common.py. The builder and the
levers ask the family and never test model names; sdbuild/models.py asks it how to build a random
model, and nothing here imports sdbuild.models.
Nothing here imports torch or diffusers at import time.
"""

from __future__ import annotations

from typing import Dict

from ..spec import ModelFamily, Spec
from . import flux, sd3, sd15, sdxl
from .family import FLOW_SCHEDULERS, UNET_SCHEDULERS, Family

__all__ = ["Family", "FAMILIES", "FLOW_SCHEDULERS", "UNET_SCHEDULERS", "family_of", "denoiser", "random_family"]

FAMILIES: Dict[ModelFamily, Family] = {m.FAMILY.family: m.FAMILY for m in (sd15, sdxl, flux, sd3)}

TRANSFORMER_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.transformer)
CACHE_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.cache_hooks)
DISPATCHER_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.dispatcher)
CONTEXT_PARALLEL_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.context_parallel)
TENSOR_PARALLEL_FAMILIES = tuple(f.family for f in FAMILIES.values() if f.tensor_parallel)
UNET_FAMILIES = tuple(f.family for f in FAMILIES.values() if not f.transformer)


def family_of(spec: Spec) -> Family:
    return FAMILIES[spec.model.family]


def random_family(name: str) -> Family:
    """The family that builds the random-weight model `name` ("tiny-flux", "sd15-arch", ...)."""
    for family in FAMILIES.values():
        if name in family.random_models:
            return family
    raise KeyError(f"no family builds a random model named {name!r}")


def denoiser(pipe):
    """The pipeline's denoising model: its UNet or its transformer."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
