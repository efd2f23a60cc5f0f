"""memory.layerwise_fp8: the denoiser's weights stored in float8 (e4m3), each layer's weights cast up
to the precision's dtype just before it runs and back after (diffusers `enable_layerwise_casting`).
Norms, embeddings and other precision-sensitive layers stay unconverted (diffusers' own skip list)."""

from __future__ import annotations

import torch

from ..families import denoiser
from ..spec import Spec


def apply_layerwise_casting(pipe, spec: Spec) -> None:
    if spec.memory.layerwise_fp8:
        model = denoiser(pipe)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype)
