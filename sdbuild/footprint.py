"""How much memory a spec's run needs at the least, estimated before anything loads.

A deliberately low estimate (so nothing that fits is refused): the VAE decodes the batch at full
image resolution, and each of its last convolutions holds an input and an output of batch x
channels x height x width values. `run.batch_size=64 run.height=4096 run.width=4096` on the tiny
model is 2 x 64 x 16 x 4096 x 4096 float32 values, 137 GB, more than most hosts have: refused
with that figure instead of running into the OOM killer. No torch is imported.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import problem
from .spec import Dtype, ModelSource, Spec, VaeKind

BYTES = {Dtype.fp32: 4, Dtype.fp16: 2, Dtype.bf16: 2}
TAESD_CHANNELS = 64  # AutoencoderTiny's decoder width at full resolution


def vae_channels(spec: Spec) -> int:
    """The VAE decoder's width at full resolution (its first block_out_channels)."""
    from .families.sd15 import SD15_VAE, TINY_VAE

    if spec.vae.kind is VaeKind.tiny:
        return TAESD_CHANNELS
    # The drawn model's VAE is narrower (8) than the tiny one: the tiny width bounds it from above.
    tiny = spec.model.source in (ModelSource.tiny, ModelSource.drawn)
    return (TINY_VAE if tiny else SD15_VAE)["block_out_channels"][0]


def decode_bytes(spec: Spec) -> Optional[int]:
    """The least memory the VAE decode of one call needs, in bytes; None where tiling bounds it by tile."""
    if spec.memory.vae_tiling:
        return None
    run = spec.run
    height, width = run.height or spec.model.resolution, run.width or spec.model.resolution
    batch = 1 if spec.memory.vae_slicing else run.batch_size
    dtype = spec.precision.vae_dtype or spec.precision.dtype
    return 2 * batch * vae_channels(spec) * height * width * BYTES[dtype]


def machine_memory_bytes(device: str) -> Optional[int]:
    """The memory the run's device has: the GPU's total, or the host's physical memory (None: unknown)."""
    if device == "cuda":
        try:
            import torch

            return torch.cuda.get_device_properties(0).total_memory
        except Exception:
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_problem(spec: Spec, device: str, available: Optional[int], where: str = "here") -> Optional[str]:
    """A problem when the spec's least memory need is beyond what `device` has (None: it may fit).
    `where` names the machine: "here" for this one, "on machine=h100" for a profile planned against."""
    need = decode_bytes(spec)
    if need is None or available is None or need <= available:
        return None
    run, gb = spec.run, 1e9
    height, width = run.height or spec.model.resolution, run.width or spec.model.resolution
    sliced = 2 * vae_channels(spec) * height * width * BYTES[spec.precision.vae_dtype or spec.precision.dtype]
    several = run.batch_size > 1 and not spec.memory.vae_slicing
    instead = ("Use memory=vae_tiling" + (f", memory=vae_slicing (one image at a time: {sliced / gb:.1f} GB), "
                                          f"a smaller run.batch_size" if several else "") + " or smaller images")
    return problem(f"run.batch_size={run.batch_size} run.height={height} run.width={width}",
                   f"the VAE decode alone needs at least {need / gb:.0f} GB, more than the {available / gb:.0f} GB "
                   f"of {'GPU' if device == 'cuda' else 'host'} memory {where}", instead)
