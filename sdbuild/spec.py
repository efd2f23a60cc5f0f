"""The typed pipeline spec: one dataclass per config group, enums for every choice.

Hydra composes `conf/` YAML files on top of these schemas (registered in the ConfigStore
as `sdbuild_schema`), so a misspelt key or a value outside an enum fails at composition
with Hydra's own message. This module imports neither torch nor diffusers: composing a
config and `--help` stay fast.
"""

from __future__ import annotations

import enum
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


class VaeKind(enum.Enum):
    full = "full"  # the model's own AutoencoderKL
    tiny = "tiny"  # AutoencoderTiny (TAESD) for the decode


class SchedulerKind(enum.Enum):
    ddim = "DDIMScheduler"
    dpmpp_2m = "DPMSolverMultistepScheduler"
    euler = "EulerDiscreteScheduler"
    pndm = "PNDMScheduler"


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
    repeats: int = 3
    save_image: bool = True


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


# The config groups, in the order the builder applies them (see sdbuild/builder.py).
GROUPS = ("precision", "memory_format", "attention", "compile", "memory", "quant", "vae", "model", "scheduler")


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends (`defaults: [sdbuild_schema, ...]`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sdbuild_schema", node=Spec)


def to_spec(cfg: Any) -> Spec:
    """Turn a composed DictConfig into the typed `Spec` object (hydra keys dropped)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    merged = OmegaConf.merge(OmegaConf.structured(Spec), cfg)
    return OmegaConf.to_object(merged)


def spec_to_dict(spec: Spec) -> dict:
    """Plain JSON-able dict of a spec (enums by name), as recorded in result.json."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(spec), enum_to_str=True)


# Fields that say how a run is measured or where it is stored, not what pipeline is built:
# left out of the identity used to match rows when a sweep is resumed.
_NOT_IDENTITY = {"resume", "preset", "preset_order", "cache_dir", "isolate"}


def spec_key(spec_dict: dict) -> str:
    """Stable identity of a resolved spec, to find the same combination in another sweep."""
    import hashlib
    import json

    ident = {k: v for k, v in spec_dict.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

