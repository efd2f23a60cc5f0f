"""The typed pipeline spec: one dataclass per config group, enums for every choice.

Hydra composes `conf/` YAML files on top of these schemas (registered in the ConfigStore
as `sdbuild_schema`), so a misspelt key or a value outside an enum fails at composition
with Hydra's own message. This module imports neither torch nor diffusers: composing a
config and `--help` stay fast.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional


class Dtype(enum.Enum):
    fp32 = "float32"
    fp16 = "float16"
    bf16 = "bfloat16"


class MemoryFormat(enum.Enum):
    contiguous = "contiguous_format"
    channels_last = "channels_last"


class AttentionProcessor(enum.Enum):
    classic = "AttnProcessor"  # diffusers' plain, non-fused attention: the seed table's baseline
    sdpa = "AttnProcessor2_0"  # torch.nn.functional.scaled_dot_product_attention
    xformers = "XFormersAttnProcessor"  # xformers.ops.memory_efficient_attention


class SdpaBackend(enum.Enum):
    """Which kernel `scaled_dot_product_attention` may pick (`torch.nn.attention.sdpa_kernel`)."""

    auto = "auto"
    flash = "FLASH_ATTENTION"
    efficient = "EFFICIENT_ATTENTION"
    math = "MATH"
    cudnn = "CUDNN_ATTENTION"


class AttentionBackend(enum.Enum):
    """diffusers' attention dispatcher backend (`set_attention_backend`), for transformers whose
    processors call it. Values are diffusers' names; `_hub` backends download kernels: not offered."""

    default = "default"  # none set: the dispatcher's active backend (native SDPA)
    native = "native"  # torch SDPA, PyTorch picks the kernel
    native_math = "_native_math"  # torch SDPA pinned to its math kernel
    native_flash = "_native_flash"  # torch SDPA pinned to FlashAttention (a CPU flash kernel too)
    native_efficient = "_native_efficient"  # torch SDPA pinned to the memory-efficient kernel (CUDA)
    native_cudnn = "_native_cudnn"  # torch SDPA pinned to cuDNN attention (CUDA)
    flex = "flex"  # torch flex_attention (unfused without torch.compile)
    flash = "flash"  # the flash-attn package (FlashAttention-2)
    flash_3 = "_flash_3"  # FlashAttention-3 (flash_attn_interface, Hopper)
    sage = "sage"  # the sageattention package (quantized QK)
    xformers = "xformers"  # xformers.ops.memory_efficient_attention


class CompileMethod(enum.Enum):
    none = "none"
    trace = "trace"  # torch.jit.trace, the seed's traced UNet
    inductor = "inductor"  # torch.compile
    export = "export"  # torch.export + AOTInductor package


class CompileMode(enum.Enum):
    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class CompileTarget(enum.Enum):
    unet = "unet"
    vae_decoder = "vae_decoder"
    text_encoder = "text_encoder"


class Offload(enum.Enum):
    none = "none"
    model = "model"  # pipe.enable_model_cpu_offload()
    sequential = "sequential"  # pipe.enable_sequential_cpu_offload()
    group = "group"  # diffusers group offloading (leaf level, CUDA streams)


class Quant(enum.Enum):
    none = "none"
    int8wo = "int8wo"  # torchao int8 weight-only
    int8dq = "int8dq"  # torchao int8 dynamic activation + int8 weight
    fp8dq = "fp8dq"  # torchao float8 dynamic activation + float8 weight


class ModelSource(enum.Enum):
    tiny = "tiny"  # embedded tiny model, built from code once, then loaded from safetensors
    pretrained = "pretrained"  # hub id or local folder, loaded with from_pretrained
    arch = "arch"  # published architecture, random weights


class ModelFamily(enum.Enum):
    sd15 = "sd15"
    sdxl = "sdxl"
    flux = "flux"  # Flux.1: a diffusion transformer, CLIP + T5 encoders, guidance-distilled
    sd3 = "sd3"  # Stable Diffusion 3.x: a joint-attention transformer, two CLIP + one T5 encoder


class VaeKind(enum.Enum):
    full = "full"  # the model's own AutoencoderKL
    tiny = "tiny"  # AutoencoderTiny (TAESD) for the decode


class SchedulerKind(enum.Enum):
    ddim = "DDIMScheduler"
    dpmpp_2m = "DPMSolverMultistepScheduler"
    euler = "EulerDiscreteScheduler"
    pndm = "PNDMScheduler"
    flow_euler = "FlowMatchEulerDiscreteScheduler"  # flow matching (Flux, SD3)


class CacheMethod(enum.Enum):
    """Step caching: reuse or approximate work of earlier denoising steps (diffusers' cache hooks on
    Flux; the DeepCache and tomesd packages on UNets)."""

    none = "none"
    first_block = "first_block"  # FirstBlockCacheConfig: skip the other blocks while the first one's residual barely moves
    taylorseer = "taylorseer"  # TaylorSeerCacheConfig: predict block outputs by a Taylor series between full steps
    pab = "pab"  # PyramidAttentionBroadcastConfig: reuse attention outputs within a timestep range
    mag_cache = "mag_cache"  # MagCacheConfig: skip steps while the accumulated residual magnitude error is small
    deepcache = "deepcache"  # DeepCache (UNets): reuse the deep UNet features between full steps
    tome = "tome"  # token merging for SD (UNets): merge similar tokens before self-attention


class Device(enum.Enum):
    auto = "auto"  # CUDA when present, else CPU
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class PrecisionSpec:
    name: str = "fp32"
    dtype: Dtype = Dtype.fp32
    tf32: bool = False  # torch.backends.{cuda.matmul,cudnn}.allow_tf32
    vae_dtype: Optional[Dtype] = None  # None: same as dtype


@dataclass
class MemoryFormatSpec:
    name: str = "contiguous"
    format: MemoryFormat = MemoryFormat.contiguous


@dataclass
class AttentionSpec:
    name: str = "classic"
    processor: AttentionProcessor = AttentionProcessor.classic
    sdpa_backend: SdpaBackend = SdpaBackend.auto
    fuse_qkv: bool = False  # pipe.fuse_qkv_projections()
    slice_size: Optional[str] = None  # attention slicing: "auto", "max" or a number of heads
    backend: AttentionBackend = AttentionBackend.default  # the dispatcher's backend (Flux's transformer)


@dataclass
class CompileSpec:
    name: str = "none"
    method: CompileMethod = CompileMethod.none
    mode: CompileMode = CompileMode.default
    fullgraph: bool = False
    dynamic: Optional[bool] = False
    targets: List[CompileTarget] = field(default_factory=lambda: [CompileTarget.unet])
    regional: bool = False  # compile_repeated_blocks: compile one block, reuse for its repeats
    cache_dir: Optional[str] = None  # persistent inductor cache for warm starts


@dataclass
class MemorySpec:
    name: str = "none"
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: Offload = Offload.none
    # The denoiser's weights stored in float8 (e4m3), each layer cast to the precision's dtype while it
    # runs (diffusers enable_layerwise_casting): about half of bf16's weight memory, lossy.
    layerwise_fp8: bool = False


@dataclass
class QuantSpec:
    name: str = "none"
    method: Quant = Quant.none


@dataclass
class ModelSpec:
    name: str = "tiny"
    source: ModelSource = ModelSource.tiny
    family: ModelFamily = ModelFamily.sd15
    path: Optional[str] = None  # hub id or local folder (source=pretrained)
    resolution: int = 64  # native image size, used when run.height/width are not set


@dataclass
class VaeSpec:
    name: str = "full"
    kind: VaeKind = VaeKind.full
    path: Optional[str] = None  # AutoencoderTiny weights for kind=tiny; None: random (tiny/arch models)


@dataclass
class SchedulerSpec:
    name: str = "ddim"
    kind: SchedulerKind = SchedulerKind.ddim


@dataclass
class CacheSpec:
    name: str = "none"
    method: CacheMethod = CacheMethod.none
    threshold: float = 0.05  # first_block: relative residual change below which the other blocks are reused; mag_cache: error bound
    interval: int = 5  # taylorseer, deepcache, pab: a full computation every `interval` steps, reuse in between
    warmup_steps: int = 3  # taylorseer: full computation for the first steps (gathers the Taylor factors)
    order: int = 1  # taylorseer: highest order of the Taylor expansion
    branch: int = 0  # deepcache: the skip branch whose shallow layers still run on cached steps (0: the shallowest)
    ratio: float = 0.5  # tome: share of the self-attention tokens merged away
    timestep_low: int = 100  # pab: attention is reused only at timesteps strictly between low and high
    timestep_high: int = 800
    max_skip_steps: int = 3  # mag_cache: most consecutive steps skipped
    retention_ratio: float = 0.2  # mag_cache: share of the first steps never skipped


@dataclass
class RunSpec:
    prompt: str = "a photo of an astronaut riding a horse on mars"
    negative_prompt: Optional[str] = None
    steps: int = 50
    height: Optional[int] = None  # None: model.resolution
    width: Optional[int] = None
    batch_size: int = 1
    guidance_scale: float = 7.5
    seed: int = 0
    device: Device = Device.auto
    warmup: int = 1
    max_warmup: int = 5  # warmup goes on while a call still compiles / records CUDA graphs, up to this many
    repeats: int = 3
    save_image: bool = True
    # Call the pipeline under torch.inference_mode (on top of its own no_grad): no version counters or
    # view tracking. Pixels identical on every CPU path tested (tests/test_inference_mode.py); off: no_grad only.
    inference_mode: bool = True


@dataclass
class Spec:
    """Everything that defines one measured pipeline. `resume` and `preset` do not change it."""

    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    memory_format: MemoryFormatSpec = field(default_factory=MemoryFormatSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    compile: CompileSpec = field(default_factory=CompileSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    vae: VaeSpec = field(default_factory=VaeSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    run: RunSpec = field(default_factory=RunSpec)
    # A finished sweep folder: combinations already measured there are copied, not re-run.
    resume: Optional[str] = None
    # Name of the `+preset=` a job came from (set by the preset files), for report ordering.
    preset: Optional[str] = None
    preset_order: Optional[int] = None
    # Where the embedded tiny model is cached (default: ~/.cache/sdbuild).
    cache_dir: Optional[str] = None
    # Sweeps: run each job in a fresh Python process (CPU memory figures untouched by earlier
    # jobs; a crash in one job cannot take the sweep down). Costs the imports once per job.
    isolate: bool = False
    # Validate, print the resolved spec and what would be built, and stop: no weights load.
    dry_run: bool = False


# The config groups, in the order the builder applies them (see sdbuild/builder.py).
GROUPS = ("precision", "memory_format", "attention", "compile", "memory", "quant", "vae", "model", "scheduler",
          "cache")


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends (`defaults: [sdbuild_schema, ...]`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sdbuild_schema", node=Spec)


# Keys a composed config may hold beside the Spec's fields: Hydra's own node (dropped here).
NOT_SPEC_KEYS = frozenset({"hydra"})


def unknown_keys(data: Any, schema: Any = Spec, prefix: str = "") -> list[str]:
    """Every key in `data` (a DictConfig or dict) that is not a field of `schema`, as one
    problem line each naming the key and the nearest valid one.

    Hydra adds `+key=value` overrides with `force_add`, which writes the key into the
    structured schema's node past its struct flag, and `OmegaConf.to_object` then drops it
    without a word: `+precison=fp16` would run fp32. So the composed keys are checked against
    the dataclass fields here, on every path that makes a Spec.
    """
    import dataclasses
    import difflib

    from omegaconf import DictConfig, OmegaConf

    from .errors import problem

    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=False)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    problems = []
    for key, value in data.items():
        if prefix == "" and key in NOT_SPEC_KEYS:
            continue
        name = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            instead = f"Did you mean {prefix}{near[0]}?" if near else \
                f"Valid keys here: {', '.join(prefix + f for f in fields)}"
            problems.append(problem(name, "is not a spec field (sdbuild refuses keys it does not know, also those "
                                          "added with `+`, so a typo cannot silently run the default)", instead))
            continue
        default = getattr(schema(), key) if dataclasses.is_dataclass(schema) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            problems += unknown_keys(value, type(default), f"{name}.")
    return problems


def check_keys(cfg: Any) -> None:
    """Raise `SpecError` naming every key of `cfg` that the Spec does not have."""
    from .errors import SpecError

    if problems := unknown_keys(cfg):
        raise SpecError(problems)


def to_spec(cfg: Any) -> Spec:
    """Turn a composed DictConfig (or a plain dict, such as a recorded `spec`) into the typed
    `Spec` object: Hydra's node dropped, unknown keys refused (`SpecError`), values typed."""
    from omegaconf import OmegaConf

    check_keys(cfg)
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in NOT_SPEC_KEYS])
    merged = OmegaConf.merge(OmegaConf.structured(Spec), cfg)
    return OmegaConf.to_object(merged)


def spec_to_dict(spec: Spec) -> dict:
    """Plain JSON-able dict of a spec (enums by name), as recorded in result.json."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(spec), enum_to_str=True)


# Upper bounds that keep a config from someone else from asking for an absurd allocation
# (run.height=80000 is 100 GB of latents before the UNet starts). SDXL's native side is 1024.
MAX_SIDE = 4096
MAX_BATCH = 64


def value_problems(spec: Spec) -> list[str]:
    """Spec-level checks of sizes and paths, each naming the option (no machine, no torch)."""
    from .errors import problem

    run, problems = spec.run, []
    for name in ("height", "width"):
        value = getattr(run, name)
        if value is not None and (value <= 0 or value % 8 or value > MAX_SIDE):
            fixed = min(MAX_SIDE, max(8, round(value / 8) * 8))
            problems.append(problem(f"run.{name}={value}", f"must be a positive multiple of 8 (the VAE downsamples "
                                    f"8x), at most {MAX_SIDE}", f"Use run.{name}={fixed}"))
    if run.batch_size > MAX_BATCH:
        problems.append(problem(f"run.batch_size={run.batch_size}", f"is more than {MAX_BATCH} images per call",
                                f"Use run.batch_size={MAX_BATCH} or less, and run.repeats for more samples"))
    for option, value in (("cache_dir", spec.cache_dir), ("compile.cache_dir", spec.compile.cache_dir)):
        if value is not None and (why := _unwritable(value)):
            problems.append(problem(f"{option}={value}", why, f"Set {option} to a folder you can write, or leave it unset"))
    if spec.resume is not None and not os.path.isdir(os.path.expanduser(spec.resume)):
        problems.append(problem(f"resume={spec.resume}", "is not a folder", "Point resume at an earlier sweep's folder "
                                "(outputs/multirun/<time>)"))
    return problems


def _unwritable(path: str) -> Optional[str]:
    """Why a folder cannot be used (or made) for writing, else None."""
    if not path.strip():
        return "is empty"
    folder = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "is a file, not a folder"
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written ({existing} is not writable)"
    return None


# Fields that say how a run is measured or where it is stored, not what pipeline is built:
# left out of the identity used to match rows when a sweep is resumed.
_NOT_IDENTITY = {"resume", "preset", "preset_order", "cache_dir", "isolate", "dry_run"}


def spec_key(spec_dict: dict) -> str:
    """Stable identity of a resolved spec, to find the same combination in another sweep."""
    import hashlib
    import json

    ident = {k: v for k, v in spec_dict.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

