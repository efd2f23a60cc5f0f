"""The `vae` group: the model's own AutoencoderKL, or AutoencoderTiny (TAESD) in its place: from
`vae.path`, or with random weights in TAESD's layout (timing only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..models import local_folder
from ..spec import Spec, VaeKind
from .precision import dtype_keyword


def tiny_autoencoder(spec: Spec, dtype: torch.dtype):
    """AutoencoderTiny (TAESD): from `vae.path`, or random weights with TAESD's layout."""
    import torch
    from diffusers import AutoencoderTiny

    if spec.vae.path:
        return AutoencoderTiny.from_pretrained(str(local_folder(spec.vae.path)), use_safetensors=True,
                                               local_files_only=True, **{dtype_keyword(): dtype})
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(3)
        return AutoencoderTiny().to(dtype)
    finally:
        torch.random.set_rng_state(state)


def apply(pipe, spec: Spec, dtype: torch.dtype) -> None:
    if spec.vae.kind is VaeKind.tiny:
        pipe.vae = tiny_autoencoder(spec, dtype)


def describe(spec: Spec) -> str:
    return "own AutoencoderKL" if spec.vae.kind is VaeKind.full else f"AutoencoderTiny ({spec.vae.path or 'random weights'})"
