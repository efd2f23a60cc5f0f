"""The `compile` group: torch.jit.trace or torch.export (AOTInductor) of the UNet, replayed as a
fixed-shape graph (`GraphUNet`), or torch.compile of the chosen modules (whole, or regional: each
repeated block alone); and Inductor's persistent caches (`compile.cache_dir`), set by the switches
step before anything is compiled.

The builder compiles last: tracing records the final attention processors and memory format,
exactly as in diffusers' guide, where the UNet is traced last; torch.compile wraps the placed
model with its cache hooks already on.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

from ..errors import SpecError, problem
from ..families import denoiser
from ..spec import AttentionProcessor, CompileMethod, CompileTarget, SdpaBackend, Spec

log = logging.getLogger(__name__)


def apply(pipe, spec: Spec, device: str, info) -> None:
    """The builder's compile step."""
    info.notes += apply_compile(pipe, spec, device, info.attention_kernel)


def describe(spec: Spec, device: str) -> str:
    c = spec.compile
    if c.method is CompileMethod.none:
        return "none (eager)"
    if c.method is CompileMethod.inductor:
        return (f"torch.compile of {', '.join(t.value for t in c.targets)}, mode={c.mode.value}, "
                f"fullgraph={c.fullgraph}, dynamic={c.dynamic}" + (", regional" if c.regional else "")
                + (f", cache {c.cache_dir}" if c.cache_dir else ""))
    return {CompileMethod.trace: "torch.jit.trace of the unet",
            CompileMethod.export: "torch.export + AOTInductor of the unet"}[c.method]


# Inductor's persistent caches ------------------------------------------------------------------

# TRITON_CACHE_DIR too: Inductor sets it once per process, from the cache folder in force at its first
# kernel launch, and never again (torch/_inductor/runtime/triton_heuristics.py), so without a reset every
# later job and interleaved member would build its Triton kernels in the first one's folder.
_INDUCTOR_ENV_AT_START = {name: os.environ.get(name) for name in
                          ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE",
                           "TRITON_CACHE_DIR")}
_CACHE_CONFIG_AT_START: Dict[str, bool] = {}  # Inductor's cache switches as this process had them


def set_inductor_caches(cache_dir: Optional[str]) -> None:
    """Inductor's persistent caches (FX graph + AOTAutograd) for warm starts across processes: in
    `cache_dir`, or as the process started (an earlier job's folder must not stick); Triton's kernel
    folder (TRITON_CACHE_DIR) with them. Called by every build and before every interleaved member's call.

    The environment variables reach a process that has not imported Inductor yet (and the
    subprocesses Inductor starts); Inductor reads the cache folder from the environment at each
    use, but its on/off switches only at import, so where its config is loaded already they are
    set on the config itself."""
    import sys

    for name, value in _INDUCTOR_ENV_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if cache_dir:
        folder = os.path.abspath(os.path.expanduser(cache_dir))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton", "0")  # Inductor's layout (device 0: a job's)
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    if "torch._inductor.config" in sys.modules:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        if not _CACHE_CONFIG_AT_START:
            _CACHE_CONFIG_AT_START.update(fx=inductor_config.fx_graph_cache, aot=functorch_config.enable_autograd_cache)
        inductor_config.fx_graph_cache = True if cache_dir else _CACHE_CONFIG_AT_START["fx"]
        functorch_config.enable_autograd_cache = True if cache_dir else _CACHE_CONFIG_AT_START["aot"]


# Trace, export, torch.compile ------------------------------------------------------------------


def apply_compile(pipe, spec: Spec, device: str, attention: Optional[Dict[str, Any]] = None) -> List[str]:
    """Trace, export or torch.compile as the compile group says; returns build notes."""
    method = spec.compile.method
    notes: List[str] = []
    if method is CompileMethod.trace:
        backend = _graph_sdpa_pin(spec, attention or {})
        log.info("compile=trace: tracing the UNet with torch.jit.trace (seconds to a minute)")
        from .graphs import trace_unet

        trace_unet(pipe, spec, device, backend)
        if backend is not None:
            notes.append(f"compile=trace: the traced UNet replays under sdpa_kernel({backend.name})")
    elif method is CompileMethod.export:
        log.info("compile=export: torch.export + AOTInductor compiles the UNet ahead of time now "
                 "(about 1 min for the tiny model on CPU, several minutes for SD 1.5 on a GPU)")
        from .graphs import export_unet

        export_unet(pipe, spec, device)
    elif method is CompileMethod.inductor:
        log.info("compile=%s: torch.compile compiles lazily during the first warmup call, which is silent "
                 "while it runs: tens of seconds for the tiny model on CPU, about 1-3 minutes for an SD 1.5 "
                 "UNet on a GPU, 10 minutes or more with max-autotune (a warm cache, compile.cache_dir, is "
                 "much faster)", spec.compile.name)
        compile_modules(pipe, spec)
    return notes


def _graph_sdpa_pin(spec: Spec, attention: Dict[str, Any]) -> Optional[SdpaBackend]:
    """The SDPA kernel a traced UNet must replay under (the graph records a plain
    `scaled_dot_product_attention` call, and the processor's pin is gone when it replays), or
    None when nothing is pinned. A UNet pinned only in part cannot be replayed under one kernel."""
    backend = spec.attention.sdpa_backend
    if spec.attention.processor is not AttentionProcessor.sdpa or backend is SdpaBackend.auto:
        return None
    if "unet" not in attention.get("pinned_modules", []):
        raise SpecError([problem(f"compile=trace with attention.sdpa_backend={backend.name}",
                                 f"the traced UNet replays every attention under one kernel, but {backend.name} "
                                 f"cannot run all of this UNet's attention ({attention.get('unpinned', {}).get('unet')})",
                                 "Use attention.sdpa_backend=efficient or auto with compile=trace")])
    return backend


def compile_modules(pipe, spec: Spec) -> None:
    """torch.compile in place (`module.compile`), so the pipeline keeps its module classes.

    Compilation itself happens lazily on the first call: it shows up in the warmup time.
    """
    c = spec.compile
    options = dict(mode=c.mode.value, fullgraph=c.fullgraph, dynamic=c.dynamic)
    for target in c.targets:
        if target is CompileTarget.unet and c.regional:  # `unet`: the denoiser, a UNet or a transformer
            denoiser(pipe).compile_repeated_blocks(**options)
        elif target is CompileTarget.unet:
            denoiser(pipe).compile(**options)
        elif target is CompileTarget.vae_decoder:
            pipe.vae.decoder.compile(**options)
        elif target is CompileTarget.text_encoder:
            pipe.text_encoder.compile(**options)
