"""The `cache` group: step caching through diffusers' cache hooks (`CacheMixin.enable_cache`).

Each option reuses work of earlier denoising steps instead of computing every transformer block at
every step, so each is lossy: a row's image moves away from the no-cache image of the same model,
and the report and the ladder measure by how much (PSNR, SSIM). Which family each option needs is
in sdbuild/capabilities.py; a wrong family is refused there before weights load.

The hooks keep per-call state (which step, the last residuals); diffusers resets it at the end of
every pipeline call (`maybe_free_model_hooks`), so warmup and timed calls all start alike.
"""

from __future__ import annotations

from typing import Any, Dict

from ..spec import CacheMethod, CacheSpec, Spec


def cache_config(cache: CacheSpec):
    """The diffusers config object of the chosen cache, its knobs from the spec's fields."""
    import torch
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.method is CacheMethod.first_block:
        return FirstBlockCacheConfig(threshold=cache.threshold)
    if cache.method is CacheMethod.taylorseer:
        # Taylor factors in fp32: diffusers' default (bf16) would add a rounding of its own to the
        # lever's error on an fp32 pipeline.
        return TaylorSeerCacheConfig(cache_interval=cache.interval, disable_cache_before_step=cache.warmup_steps,
                                     max_order=cache.order, taylor_factors_dtype=torch.float32)
    raise ValueError(f"no diffusers cache config for cache={cache.method.name}")


def apply_cache(pipe, spec: Spec) -> Dict[str, Any]:
    """Enable the cache on the pipeline's transformer; returns what the row records (empty: none)."""
    if spec.cache.method is CacheMethod.none:
        return {}
    config = cache_config(spec.cache)
    pipe.transformer.enable_cache(config)
    return {"method": spec.cache.method.name, "config": repr(config)}
