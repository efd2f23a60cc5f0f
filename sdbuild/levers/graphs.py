"""The compile lever's fixed-shape graphs: the UNet traced (torch.jit.trace) or exported and compiled
ahead of time (torch.export + AOTInductor), standing in for the UNet as `GraphUNet`. Imported when a
spec traces or exports (it imports torch; the rest of the levers do so only when they run)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from ..spec import MemoryFormat, SdpaBackend, Spec


def unet_example_inputs(pipe, spec: Spec, device: str):
    """UNet inputs of the shape the pipeline will call it with (classifier-free guidance doubles the batch)."""
    from ..run_inputs import image_size

    height, width = image_size(spec)
    cfg = 2 if spec.run.guidance_scale > 1 else 1
    batch = spec.run.batch_size * cfg
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    dtype = unet.dtype
    sample = torch.randn(batch, unet.config.in_channels, height // scale, width // scale, dtype=dtype, device=device)
    if spec.memory_format.format is MemoryFormat.channels_last:
        sample = sample.to(memory_format=torch.channels_last)
    pipe.scheduler.set_timesteps(spec.run.steps, device=device)
    timestep = pipe.scheduler.timesteps[0]  # a 0-d tensor of the scheduler's dtype, as the pipeline passes it
    seq_len = pipe.tokenizer.model_max_length
    hidden = torch.randn(batch, seq_len, unet.config.cross_attention_dim, dtype=dtype, device=device)
    return sample, timestep, hidden


class GraphUNet(torch.nn.Module):
    """Stands in for the UNet with a fixed-shape graph (traced or AOT-compiled): same config,
    dtype and device, called by the pipeline exactly like UNet2DConditionModel. Options such a
    graph cannot take (timestep_cond, added_cond_kwargs, cross_attention_kwargs) are refused.
    """

    def __init__(self, graph, unet, kind: str, sdpa_backend: Optional[SdpaBackend] = None) -> None:
        super().__init__()
        self.graph = graph  # a torch.jit.ScriptModule (trace) or an AOTInductor runner (export)
        self.kind = kind
        self.sdpa_backend = sdpa_backend  # the kernel the graph's attention is pinned to when it replays
        self.config = unet.config
        self._dtype, self._device = unet.dtype, unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict: bool = True, **unused):
        if timestep_cond is not None or cross_attention_kwargs or added_cond_kwargs:
            raise ValueError(f"compile={self.kind}: the UNet graph takes only (sample, timestep, encoder_hidden_states)")
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if self.sdpa_backend is None:
            out = self.graph(sample, timestep, encoder_hidden_states)[0]
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, self.sdpa_backend.value)):
                out = self.graph(sample, timestep, encoder_hidden_states)[0]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class _UNetForGraph(torch.nn.Module):
    """The UNet as a function of three tensors, returning a tuple: what trace and export capture."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)


def trace_unet(pipe, spec: Spec, device: str, sdpa_backend: Optional[SdpaBackend] = None) -> None:
    """The seed's recipe: torch.jit.trace the UNet with example inputs of the run's shape."""
    example = unet_example_inputs(pipe, spec, device)
    # TracerWarnings say the graph is fixed to these shapes: that is the recipe (and why the
    # example inputs take the run's shape), not a problem to show the user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(_UNetForGraph(pipe.unet).eval(), example, check_trace=False)
    pipe.unet = GraphUNet(traced, pipe.unet, "trace", sdpa_backend)


def export_unet(pipe, spec: Spec, device: str) -> None:
    """torch.export the UNet, compile it ahead of time with AOTInductor into a .pt2 package, load it."""
    import tempfile

    from torch._inductor import aoti_compile_and_package, aoti_load_package

    example = unet_example_inputs(pipe, spec, device)
    with torch.no_grad():
        exported = torch.export.export(_UNetForGraph(pipe.unet).eval(), example)
    folder = Path(spec.compile.cache_dir).expanduser() if spec.compile.cache_dir else Path(tempfile.mkdtemp(prefix="sdbuild-aoti-"))
    folder.mkdir(parents=True, exist_ok=True)
    package = aoti_compile_and_package(exported, package_path=str(folder / "unet.pt2"))
    pipe.unet = GraphUNet(aoti_load_package(package), pipe.unet, "export")
