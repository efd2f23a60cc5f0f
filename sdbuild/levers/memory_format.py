"""The `memory_format` group: channels-last (NHWC) conv weights in the denoiser and the VAE;
activations follow. A transformer's only conv-like weights are its patch embedding's, if any."""

from __future__ import annotations

from ..families import denoiser
from ..spec import MemoryFormat, Spec


def apply(pipe, spec: Spec, device: str, info) -> None:
    import torch

    if spec.memory_format.format is MemoryFormat.channels_last:
        denoiser(pipe).to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


def describe(spec: Spec, device: str) -> str:
    return spec.memory_format.format.name
