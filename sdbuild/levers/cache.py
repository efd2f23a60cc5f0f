"""The `cache` group: step caching through diffusers' cache hooks (`CacheMixin.enable_cache`) on
transformers, and for UNets DeepCache and token merging (ToMe) through their packages.

Each option skips or approximates work (earlier steps' block outputs, merged tokens), so each is lossy: a row's image moves away from the no-cache image of the same model,
and the report and the ladder measure by how much (PSNR, SSIM). Which family each option needs is
in sdbuild/capabilities.py; a wrong family is refused there before weights load.

The hooks keep per-call state (which step, the last residuals); diffusers resets it at the end of
every pipeline call (`maybe_free_model_hooks`), so warmup and timed calls all start alike.
"""

from __future__ import annotations

from ..spec import CacheMethod, CacheSpec, Spec


def cache_config(cache: CacheSpec, current_timestep=None, steps: int = 0):
    """The diffusers config object of the chosen cache, its knobs from the spec's fields."""
    import torch
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if cache.method is CacheMethod.first_block:
        return FirstBlockCacheConfig(threshold=cache.threshold)
    if cache.method is CacheMethod.taylorseer:
        # Taylor factors in fp32: diffusers' default (bf16) would add a rounding of its own to the
        # lever's error on an fp32 pipeline.
        return TaylorSeerCacheConfig(cache_interval=cache.interval, disable_cache_before_step=cache.warmup_steps,
                                     max_order=cache.order, taylor_factors_dtype=torch.float32)
    if cache.method is CacheMethod.pab:
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=cache.interval,
            spatial_attention_timestep_skip_range=(cache.timestep_low, cache.timestep_high),
            current_timestep_callback=current_timestep)
    if cache.method is CacheMethod.faster_cache:
        # Flux is guidance-distilled (one batch, no unconditional half): only FasterCache's attention
        # reuse applies. Inside (timestep_low, timestep_high) each block's attention is computed every
        # `interval`-th call; in between its output is extrapolated from the last two it kept,
        # out(t) + weight * (out(t) - out(t-2)). The unconditional-batch (CFG-Cache) knobs are unused;
        # is_guidance_distilled=False would split Flux's one batch in two and fail. A range reaching
        # step 0 (timestep_high > 1000) is refused in capabilities.py: diffusers would skip before
        # anything is cached.
        return FasterCacheConfig(
            spatial_attention_block_skip_range=cache.interval,
            spatial_attention_timestep_skip_range=(cache.timestep_low, cache.timestep_high),
            attention_weight_callback=lambda _module: cache.weight,
            is_guidance_distilled=True,
            current_timestep_callback=current_timestep)
    if cache.method is CacheMethod.mag_cache:
        # Magnitude ratios calibrated by diffusers on FLUX.1-dev, interpolated to the run's steps.
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return MagCacheConfig(threshold=cache.threshold, max_skip_steps=cache.max_skip_steps,
                              retention_ratio=cache.retention_ratio, num_inference_steps=steps,
                              mag_ratios=FLUX_MAG_RATIOS)
    raise ValueError(f"no diffusers cache config for cache={cache.method.name}")


def apply(pipe, spec: Spec, device: str, info) -> None:
    """The builder's cache step (on the placed pipeline, before torch.compile wraps it)."""
    apply_cache(pipe, spec)


def apply_cache(pipe, spec: Spec) -> None:
    """Install the chosen cache: diffusers' hooks on a transformer, DeepCache or ToMe on a UNet."""
    method = spec.cache.method
    if method is CacheMethod.none:
        return
    if method is CacheMethod.deepcache:
        apply_deepcache(pipe, spec.cache)
    elif method is CacheMethod.tome:
        apply_tome(pipe, spec.cache)
    else:
        pipe.transformer.enable_cache(cache_config(spec.cache, current_timestep=lambda: pipe.current_timestep,
                                                   steps=spec.run.steps))


def apply_deepcache(pipe, cache: CacheSpec) -> None:
    """DeepCache (Ma, Fang, Wang, CVPR 2024, arXiv:2312.00858) through its package's helper: every
    `cache.interval`-th step runs the whole UNet; the others run only the shallow layers of skip
    branch `cache.branch` and reuse the deep features of the last full step. The helper wraps the
    UNet's and its blocks' forward methods; the first step of every call is a full one, so each call
    starts afresh."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=cache.interval, cache_branch_id=cache.branch)
    helper.enable()


def apply_tome(pipe, cache: CacheSpec) -> None:
    """Token merging for SD (Bolya, Hoffman, 2023, arXiv:2303.17604) through the tomesd package: in
    the UNet's highest-resolution transformer blocks, `cache.ratio` of the tokens are merged into
    similar ones before self-attention and unmerged after. Deterministic merges (use_rand=False), so
    every call of a run, and every run of the same spec, merges the same tokens."""
    import tomesd

    tomesd.apply_patch(pipe, ratio=cache.ratio, use_rand=False)


def describe(spec: Spec, device: str) -> str:
    """The chosen cache and its knobs, as the dry run prints them."""
    c = spec.cache
    if c.method is CacheMethod.none:
        return "none"
    return f"{c.method.name} ({knobs(c)})"


def knobs(c: CacheSpec) -> str:
    if c.method is CacheMethod.first_block:
        return f"threshold {c.threshold}"
    if c.method is CacheMethod.deepcache:
        return f"full UNet every {c.interval} steps, branch {c.branch}"
    if c.method is CacheMethod.tome:
        return f"merge ratio {c.ratio}"
    if c.method is CacheMethod.mag_cache:
        return f"threshold {c.threshold}, at most {c.max_skip_steps} steps skipped in a row, first {c.retention_ratio:.0%} kept"
    if c.method is CacheMethod.pab:
        return f"attention reused except every {c.interval}th step between timesteps {c.timestep_low} and {c.timestep_high}"
    if c.method is CacheMethod.faster_cache:
        return (f"attention extrapolated (weight {c.weight}) except every {c.interval}th step between timesteps "
                f"{c.timestep_low} and {c.timestep_high}")
    return f"full step every {c.interval} after {c.warmup_steps}, Taylor order {c.order}"
