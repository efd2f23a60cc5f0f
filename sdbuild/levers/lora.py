"""The `lora` group: LoRA adapters through diffusers' LoRA API (peft underneath), right after the load
step, before anything changes the modules (attention processors, channels-last, placement) and
before compile.

- `fused`: every adapter loaded (`load_lora_weights`), weighted (`set_adapters`), merged into the
  weights (`fuse_lora`) and unloaded (`unload_lora_weights`): the denoiser runs as a plain model,
  no per-step cost; the fuse time is in `build_s`.
- `unfused`: the adapters stay live beside the weights, each at its scale: every step pays for the
  low-rank matmuls (measured as any lever).
- `hotswap`: `enable_lora_hotswap(target_rank=<largest rank given>)` before the first adapter loads,
  so peft pads its layers to that rank and keeps the scalings as tensors; after compile and the
  timed calls, each later adapter replaces the first in place (`load_lora_weights(..., hotswap=True,
  adapter_name=...)`): `measure_swaps` times each swap and the call after it, and counts the graphs
  Dynamo compiled meanwhile (zero: the swap did not recompile).

An adapter may be a hub id (org/name, with its weight_name): resolved from the local HF cache, or,
with its own `download: true` and not cached yet, fetched here first, before any adapter loads
(sdbuild/models.py: download_adapter; offline by default, refused before weights load otherwise).

What the row records (`lora`): the mode and each adapter's file, sha256, scale and rank (a hub id's
also its repo, file and commit); for hotswap the swaps. Adapter files are checked before loading in sdbuild/models.py (`lora_problems`); the
combinations that cannot work are rows in sdbuild/capabilities.py.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from ..models import (adapter_label, adapter_record, cached_adapter, download_adapter, hub_adapter, lora_file,
                      lora_rank, safetensors_header)
from ..spec import CompileMethod, LoraMode, Spec

SLOT = "adapter_0"  # hotswap: the adapter name every swap replaces


def adapter_name(index: int) -> str:
    return f"adapter_{index}"


def _load(pipe, adapter, name: str, **kwargs) -> None:
    file = lora_file(adapter)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=True,
                           local_files_only=True, **kwargs)


def target_rank(spec: Spec) -> int:
    """The largest rank among the adapters (hotswap pads every adapter's layers to it)."""
    return max(lora_rank(safetensors_header(lora_file(a))) for a in spec.lora.adapters)


def apply(pipe, spec: Spec, device: str, info) -> None:
    """The builder's LoRA step: load the adapters as `lora.mode` says; record them in `info.lora`."""
    lora = spec.lora
    if lora.mode is LoraMode.none:
        return
    adapters = lora.adapters
    for i, adapter in enumerate(adapters):  # a hub id asked for (download: true) and not cached yet: fetched first
        if adapter.download and hub_adapter(adapter) and cached_adapter(adapter) is None:
            download_adapter(f"lora.adapters[{i}]", adapter, spec.model.family)
    info.lora = {"mode": lora.mode.name, "adapters": [adapter_record(a) for a in adapters]}
    if lora.mode is LoraMode.hotswap:
        rank = target_rank(spec)
        pipe.enable_lora_hotswap(target_rank=rank)
        _load(pipe, adapters[0], SLOT)
        info.lora["target_rank"] = rank
        info.notes.append(f"lora=hotswap: adapter 0 loaded, prepared for swaps up to rank {rank}; adapters 1-"
                          f"{len(adapters) - 1} are swapped in after the timed calls")
        return
    names = [adapter_name(i) for i in range(len(adapters))]
    for adapter, name in zip(adapters, names):
        _load(pipe, adapter, name)
    pipe.set_adapters(names, adapter_weights=[a.scale for a in adapters])
    if lora.mode is LoraMode.fused:
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()  # the merged weights stay; peft's layers go


def describe(spec: Spec, device: str) -> str:
    lora = spec.lora
    if lora.mode is LoraMode.none:
        return "none"

    def fetched(a) -> str:
        return " (download)" if a.download and hub_adapter(a) and cached_adapter(a) is None else ""

    listed = ", ".join(f"{adapter_label(a)}{fetched(a)} x{a.scale:g}" for a in lora.adapters)
    if lora.mode is LoraMode.fused:
        return f"fuse {len(lora.adapters)} adapter(s) into the weights, then unload them: {listed}"
    if lora.mode is LoraMode.unfused:
        return f"{len(lora.adapters)} live adapter(s) (set_adapters): {listed}"
    compiled = spec.compile.method is CompileMethod.inductor
    return (f"hotswap: enable_lora_hotswap(target_rank=largest rank given), load {adapter_label(lora.adapters[0])}; "
            f"after the timed calls swap in {len(lora.adapters) - 1} adapter(s) with hotswap=True, "
            + ("counting Dynamo's recompilations" if compiled else "eager (no compile: nothing to recompile)"))


def compiled_graphs() -> int:
    """How many graphs Dynamo has compiled in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_swaps(pipe, spec: Spec, call: Callable[[], Any]) -> Optional[List[Dict[str, Any]]]:
    """hotswap: swap each later adapter into the first one's place and call the pipeline once after each;
    per swap: its time (`swap_s`), the call's time (`call_s`), and the graphs Dynamo compiled during the
    swap and the call (`recompiles`; None when nothing is compiled). None for the other modes."""
    if spec.lora.mode is not LoraMode.hotswap:
        return None
    compiled = spec.compile.method is CompileMethod.inductor
    swaps = []
    for i, adapter in enumerate(spec.lora.adapters[1:], start=1):
        before = compiled_graphs()
        start = time.perf_counter()
        _load(pipe, adapter, SLOT, hotswap=True)
        swapped = time.perf_counter()
        call()
        done = time.perf_counter()
        swaps.append({"adapter": i, "path": str(lora_file(adapter)), "swap_s": swapped - start,
                      "call_s": done - swapped, "recompiles": compiled_graphs() - before if compiled else None})
    return swaps
