"""Spec in, optimized diffusers pipeline out: the recipe, one step per lever, applied in order.

Each step names the lever (sdbuild/levers/<group>.py) that owns it: a function that applies it to
the pipeline and a function that describes, from the spec, what applying it would do. `build_pipeline`
runs the steps top to bottom; the dry run (sdbuild/dryrun.py) walks the same `STEPS` and prints each
description, so the plan and the build cannot disagree.

1. switches       TF32 / cuDNN flags and Inductor's caches, set explicitly every build (precision)
2. load           the family's pipeline class, weights straight in the precision's dtype, quantized
                  while loading; scheduler, VAE and the VAE's dtype (model, quant, scheduler, vae)
3. LoRA           adapters loaded, fused or kept live; hotswap prepared (lora)
4. attention      processors, fused QKV, slicing, SDPA kernel pins; a transformer's backend
5. memory format  channels-last conv weights
6. VAE memory     VAE slicing / tiling (memory)
7. layerwise      the denoiser's weights stored in float8 (memory.layerwise_fp8)
8. place          moved to the device, or offloaded (memory.offload)
9. parallel       context / tensor parallelism of the denoiser (diffusers' enable_parallelism), on this rank
10. cache         step caching: diffusers' hooks on a transformer, DeepCache or ToMe on a UNet
11. compile       torch.jit.trace / torch.export of the UNet, or torch.compile of chosen modules

Why this order: LoRA comes straight after loading, while the modules are the checkpoint's own (peft
wraps the Linear layers the later steps would change: fused QKV, placement, compile), and hotswap must
be prepared before compile. Offload (`place`) comes after every change to the modules (fused QKV needs real
weights, not sequential offload's `meta` ones; channels-last must be in place before offload copies
the weights), and before the compile step, which traces or exports on the device. The cache hooks go
on the placed model (as in diffusers' guides), before torch.compile wraps it. Tracing comes last, so
it records the final attention processors and memory format, as in diffusers' guide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .levers import attention, cache, lora, memory, memory_format, model, parallel, precision
from .levers import compile as compile_lever
from .spec import Spec
from .validate import validate

@dataclass
class BuildInfo:
    """What the builder did and how long it took, recorded beside the measurements."""

    device: str
    reuse_weights: bool = False  # the load step hands out a copy of the sweep's in-memory pipeline
    load_s: float = 0.0  # the steps that load (switches and load)
    build_s: float = 0.0  # everything after loading, including tracing (not lazy torch.compile)
    attention_kernel: Dict[str, Any] = field(default_factory=dict)  # what attention runs, per module
    notes: List[str] = field(default_factory=list)  # decisions the user should see (row: build_notes)
    steps: List[str] = field(default_factory=list)  # the steps run, in order (the dry run prints the same)
    parallel: Dict[str, Any] = field(default_factory=dict)  # the device mesh of a parallel job (levers/parallel.py)
    lora: Optional[Dict[str, Any]] = None  # the adapters loaded (levers/lora.py; row: lora)


@dataclass(frozen=True)
class Step:
    """One step of the recipe: `apply(pipe, spec, device, info)` changes the pipeline in place (the
    load step returns it); `describe(spec, device)` says what `apply` would do, loading nothing."""

    name: str
    apply: Callable[..., Any]
    describe: Callable[[Spec, str], str]
    loads: bool = False  # timed as loading (BuildInfo.load_s); the others as build_s


STEPS = (
    Step("switches", precision.apply_switches, precision.describe_switches, loads=True),
    Step("load", model.apply, model.describe, loads=True),
    Step("LoRA", lora.apply, lora.describe),
    Step("attention", attention.apply, attention.describe),
    Step("memory format", memory_format.apply, memory_format.describe),
    Step("VAE memory", memory.apply_vae_memory, memory.describe_vae_memory),
    Step("layerwise casting", memory.apply_layerwise_casting, memory.describe_layerwise_casting),
    Step("place", memory.apply_place, memory.describe_place),
    Step("parallel", parallel.apply, parallel.describe),
    Step("cache", cache.apply, cache.describe),
    Step("compile", compile_lever.apply, compile_lever.describe),
)


def build(spec: Spec) -> Any:
    """Validate `spec` against this machine and return the optimized pipeline."""
    return build_pipeline(spec)[0]


def build_pipeline(spec: Spec, device: Optional[str] = None, reuse_weights: bool = False):
    """Like `build`, also returning `BuildInfo` (device, load and build time, attention, notes).

    `reuse_weights` (sweeps): keep the last freshly loaded pipeline in memory and hand out deep
    copies of it, so a sweep reads a model's weights from disk once per dtype, and every job still
    starts from an untouched pipeline.
    """
    from .quiet import quiet_imports

    quiet_imports()  # before diffusers loads anything: its and its neighbours' import-time chatter
    device = device or validate(spec)
    info = BuildInfo(device=device, reuse_weights=reuse_weights)
    pipe = None
    for step in STEPS:
        start = time.perf_counter()
        pipe = step.apply(pipe, spec, device, info) or pipe  # the load step returns the pipeline
        elapsed = time.perf_counter() - start
        if step.loads:
            info.load_s += elapsed
        else:
            info.build_s += elapsed
        info.steps.append(step.name)
    pipe.set_progress_bar_config(disable=True)  # measurement shows its own progress
    return pipe, info


def plan_steps(spec: Spec, device: str) -> List[tuple[str, str]]:
    """(name, description) of every step `build_pipeline` would run for `spec` on `device`."""
    return [(step.name, step.describe(spec, device)) for step in STEPS]
