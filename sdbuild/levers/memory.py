"""The `memory` group: what trades time for memory, as three of the builder's steps.

- VAE memory: the VAE's own slicing (one image at a time) and tiling (overlapping tiles) switches.
- Layerwise casting (`memory.layerwise_fp8`): the denoiser's weights stored in float8 (e4m3), each
  layer's weights cast up to the precision's dtype just before it runs and back after (diffusers
  `enable_layerwise_casting`). Norms, embeddings and other precision-sensitive layers stay
  unconverted (diffusers' own skip list).
- Placement: the pipeline moved to the device, or diffusers' offload hooks installed instead
  (model, sequential, group offload). The builder places after every change to the modules,
  which offload hooks would otherwise undo (fused QKV needs real weights, not sequential
  offload's `meta` ones; channels-last must be in place before offload copies the weights).
"""

from __future__ import annotations

from ..families import denoiser
from ..spec import Offload, Spec


def apply_vae_memory(pipe, spec: Spec, device: str, info) -> None:
    if spec.memory.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.memory.vae_tiling:
        pipe.vae.enable_tiling()


def describe_vae_memory(spec: Spec, device: str) -> str:
    m = spec.memory
    return f"slicing {'on' if m.vae_slicing else 'off'}, tiling {'on' if m.vae_tiling else 'off'}"


def apply_layerwise_casting(pipe, spec: Spec, device: str, info) -> None:
    import torch

    if spec.memory.layerwise_fp8:
        model = denoiser(pipe)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype)


def describe_layerwise_casting(spec: Spec, device: str) -> str:
    if not spec.memory.layerwise_fp8:
        return "off"
    return f"denoiser weights stored in float8 e4m3, computed in {spec.precision.dtype.value}"


def place(pipe, spec: Spec, device: str) -> None:
    """Move the pipeline to the device, or install diffusers' offload hooks instead."""
    import torch

    offload = spec.memory.offload
    if offload is Offload.none:
        pipe.to(device)
    elif offload is Offload.model:
        pipe.enable_model_cpu_offload(device=device)
    elif offload is Offload.sequential:
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload is Offload.group:
        pipe.enable_group_offload(
            onload_device=torch.device(device), offload_type="leaf_level", use_stream=True
        )


def apply_place(pipe, spec: Spec, device: str, info) -> None:
    place(pipe, spec, device)


def describe_place(spec: Spec, device: str) -> str:
    offload = spec.memory.offload
    return f"on {device}" if offload is Offload.none else f"{offload.name} offload to {device}"
