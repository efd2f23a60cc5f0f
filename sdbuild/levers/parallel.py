"""The `parallel` group: context parallelism (Ulysses, ring, both) and tensor parallelism of the denoiser,
through diffusers' own `ContextParallelConfig` / `TensorParallelConfig` / `ParallelConfig` and
`ModelMixin.enable_parallelism`, on a torch.distributed process group that sdbuild/distributed.py starts
(one rank per GPU on CUDA, per core group on CPU). What each method needs (a `_cp_plan` / `_tp_plan`,
an attention backend, degrees that divide the heads and the sequence) is refused in capabilities.py
before anything loads.

Every rank builds the same pipeline; this step (after `place`, so the weights are on the rank's
device) installs diffusers' hooks on the denoiser: its inputs split along the sequence, attention
computed across ranks, its output gathered, so every rank ends the call with the whole latents.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

from ..families import denoiser
from ..spec import ParallelMethod, ParallelSpec, Spec


def parallel_config(p: ParallelSpec):
    """The diffusers config object for the spec's method and degrees."""
    from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig

    if p.method is ParallelMethod.tensor:
        return ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=p.tp_degree))
    return ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=p.ring_degree,
                                                                        ulysses_degree=p.ulysses_degree))


@contextlib.contextmanager
def cpu_device_count() -> Iterator[None]:
    """CPU ranks only, for the one `enable_parallelism` call: diffusers 0.42.1's
    `ModelMixin._resolve_parallel_config` picks the rank's device as
    `torch.device(accelerator, rank % torch.accelerator.device_count())`, and on a machine with no
    accelerator device_count() is 0 (ZeroDivisionError) although the CPU mesh itself works. For the
    duration of that call device_count answers 1, so the device is cpu:0; restored on leaving."""
    import torch

    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


def apply(pipe, spec: Spec, device: str, info) -> None:
    """The builder's parallel step: diffusers' parallel hooks on the denoiser, on this rank's process group."""
    p = spec.parallel
    if p.method is ParallelMethod.none:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"parallel={p.name} needs a torch.distributed process group: the job runs as "
                           f"{p.world_size} ranks started by sdbuild.distributed, not in this process")
    model = denoiser(pipe)
    config = parallel_config(p)
    with cpu_device_count() if device == "cpu" else contextlib.nullcontext():
        model.enable_parallelism(config=config)
    info.parallel = mesh_record(config)
    info.notes.append(f"parallel: {describe(spec, device)}, rank {dist.get_rank()} of {dist.get_world_size()}")


def mesh_record(config) -> Dict[str, Any]:
    """The device mesh diffusers built: its device type, dimension names and sizes."""
    mesh = config._mesh
    return {"device_type": mesh.device_type, "dims": dict(zip(mesh.mesh_dim_names, mesh.mesh.shape)),
            "shape": list(mesh.mesh.shape)}


def describe(spec: Spec, device: str) -> str:
    p = spec.parallel
    if p.method is ParallelMethod.none:
        return "none (one process)"
    backend = p.backend.value if p.backend.value != "auto" else ("nccl" if device == "cuda" else "gloo")
    if p.method is ParallelMethod.tensor:
        split = f"TensorParallelConfig(tp_degree={p.tp_degree})"
    else:
        split = f"ContextParallelConfig(ring_degree={p.ring_degree}, ulysses_degree={p.ulysses_degree})"
    return f"{p.method.name}: {split} on the denoiser, {p.world_size} ranks over {backend}"
