"""`dry_run=true`: validate a spec and say what would be built, loading no weights.

The plan follows the builder's order (sdbuild/builder.py) step by step, read from the spec's
typed fields; nothing is loaded, built or compiled, so a dry run takes the time of validation.
"""

from __future__ import annotations

from pathlib import Path

from .families import family_of
from .spec import CacheMethod, CompileMethod, ModelSource, Offload, Quant, SdpaBackend, Spec, VaeKind, spec_to_dict


def plan(spec: Spec, device: str) -> list[str]:
    """What `build_pipeline` would do for `spec` on `device`, one line per builder step."""
    from .models import model_folder

    p, a, c, m, run = spec.precision, spec.attention, spec.compile, spec.memory, spec.run
    folder = model_folder(spec.model, spec.cache_dir)
    if spec.model.source is ModelSource.pretrained:
        source = f"{folder} (local safetensors)"
    else:
        cached = (Path(folder) / "model_index.json").exists()
        source = f"{folder} ({'cached' if cached else 'built from code with random weights on first use'})"
    vae = "own AutoencoderKL" if spec.vae.kind is VaeKind.full else f"AutoencoderTiny ({spec.vae.path or 'random weights'})"
    if c.method is CompileMethod.none:
        compiled = "none (eager)"
    elif c.method is CompileMethod.inductor:
        compiled = (f"torch.compile of {', '.join(t.value for t in c.targets)}, mode={c.mode.value}, "
                    f"fullgraph={c.fullgraph}, dynamic={c.dynamic}" + (", regional" if c.regional else "")
                    + (f", cache {c.cache_dir}" if c.cache_dir else ""))
    else:
        compiled = {CompileMethod.trace: "torch.jit.trace of the unet",
                    CompileMethod.export: "torch.export + AOTInductor of the unet"}[c.method]
    h, w = run.height or spec.model.resolution, run.width or spec.model.resolution
    return [
        f"device: {device} (run.device={run.device.name})",
        f"1. global switches: TF32 {'on' if p.tf32 else 'off'}",
        f"2. load: {spec.model.family.name} {family_of(spec).pipeline} ({spec.model.name}) from {source}, "
        f"weights in {p.dtype.value}"
        + (f", VAE in {p.vae_dtype.value}" if p.vae_dtype else "")
        + (f", unet quantized {spec.quant.method.value} (torchao)" if spec.quant.method is not Quant.none else "")
        + f"; scheduler {spec.scheduler.kind.value}; VAE: {vae}",
        f"3. place: {'on ' + device if m.offload is Offload.none else m.offload.name + ' offload to ' + device}",
        ("4. attention: the transformer's own processors (diffusers' attention dispatcher)" if family_of(spec).transformer
         else f"4. attention: {a.processor.value}")
        + (f", SDPA kernel {a.sdpa_backend.value}" if a.sdpa_backend is not SdpaBackend.auto else "")
        + (", fused QKV" if a.fuse_qkv else "") + (f", slicing {a.slice_size}" if a.slice_size is not None else ""),
        f"5. memory format: {spec.memory_format.format.name}",
        f"6. VAE memory: slicing {'on' if m.vae_slicing else 'off'}, tiling {'on' if m.vae_tiling else 'off'}"
        + ("; denoiser weights stored in float8 (layerwise casting)" if m.layerwise_fp8 else ""),
        f"7. cache: {spec.cache.method.name}" + (f" ({cache_knobs(spec)})" if spec.cache.method is not CacheMethod.none else ""),
        f"8. compile: {compiled}",
        f"run: {run.steps} steps at {h}x{w}, batch {run.batch_size}, guidance {run.guidance_scale}, seed {run.seed}; "
        f"warmup {run.warmup}, timed runs {run.repeats}",
    ]


def cache_knobs(spec: Spec) -> str:
    c = spec.cache
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


def show(spec: Spec) -> str:
    """The build plan, what was asked for, then the resolved spec (YAML) it was read from. Raises
    `SpecError` where validation refuses it."""
    from omegaconf import OmegaConf

    from .validate import validate

    device = validate(spec)
    resolved = OmegaConf.to_yaml(OmegaConf.create(spec_to_dict(spec)))
    return ("would build (dry run: no weights loaded):\n" + "\n".join("  " + line for line in plan(spec, device))
            + "\n\nresolved spec (Hydra's `--cfg job` prints the composed config alone):\n" + resolved.rstrip("\n"))


def say(cfg) -> bool:
    """Print the plan of the composed config `cfg` on stdout, or its refusal on stderr; whether it
    was accepted. The one dry run of a job, whatever launched it (a run, a sweep, the ladder)."""
    import sys

    from .errors import SpecError
    from .spec import to_spec

    try:
        print(show(to_spec(cfg)), flush=True)
    except SpecError as exc:
        print(f"sdbuild: refused (dry run):\n{exc}", file=sys.stderr, flush=True)
        return False
    return True
