"""The typed pipeline spec: one dataclass per config group, enums for every choice.

Hydra composes `conf/` YAML files on top of these schemas (registered in the ConfigStore
as `sdbuild_schema`), so a misspelt key or a value outside an enum fails at composition
with Hydra's own message. This module imports neither torch nor diffusers: composing a
config and `--help` stay fast.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


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
    max_autotune = "max-autotune"  # CUDA graphs too
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"

    @property
    def cuda_graphs(self) -> bool:
        """Whether Inductor records CUDA graphs in this mode on CUDA (`triton.cudagraphs` in
        torch._inductor.list_mode_options): reduce-overhead and max-autotune do."""
        return self in (CompileMode.reduce_overhead, CompileMode.max_autotune)


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
    drawn = "drawn"  # tiny model trained on the drawn set (scripts/train_tiny.py), shipped in sdbuild/data


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
    faster_cache = "faster_cache"  # FasterCacheConfig: extrapolate attention outputs from the last two computed ones within a timestep range
    mag_cache = "mag_cache"  # MagCacheConfig: skip steps while the accumulated residual magnitude error is small
    deepcache = "deepcache"  # DeepCache (UNets): reuse the deep UNet features between full steps
    tome = "tome"  # token merging for SD (UNets): merge similar tokens before self-attention


class ParallelMethod(enum.Enum):
    """How one denoiser call is split over several processes (diffusers' enable_parallelism)."""

    none = "none"  # one process, one device
    ulysses = "ulysses"  # context parallelism, Ulysses: all-to-all of heads and sequence (ContextParallelConfig(ulysses_degree))
    ring = "ring"  # context parallelism, ring attention: K/V passed around the ranks (ContextParallelConfig(ring_degree))
    unified = "unified"  # ring x Ulysses on a 2-D mesh (ContextParallelConfig(ring_degree, ulysses_degree))
    tensor = "tensor"  # tensor parallelism: Linear weights sharded (TensorParallelConfig(tp_degree))


class CommBackend(enum.Enum):
    """torch.distributed's process-group backend for a parallel job."""

    auto = "auto"  # nccl on CUDA, gloo on CPU
    gloo = "gloo"
    nccl = "nccl"


class LoraMode(enum.Enum):
    """How LoRA adapters run (diffusers' LoRA API, with peft)."""

    none = "none"  # no adapters
    fused = "fused"  # fuse_lora, then unload_lora_weights: the deltas merged into the weights, no per-step cost
    unfused = "unfused"  # adapters live beside the weights (set_adapters): their per-step cost is measured
    hotswap = "hotswap"  # enable_lora_hotswap before compile; later adapters swapped in with hotswap=True


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
    path: Optional[str] = None  # hub id, local folder, or one .safetensors checkpoint file (source=pretrained)
    config: Optional[str] = None  # a single-file checkpoint's layout: a local diffusers folder of the same architecture
    variant: Optional[str] = None  # diffusers' variant= (e.g. fp16): load <name>.fp16.safetensors where a component has it
    download: bool = False  # fetch a hub id that is not in the local cache (huggingface_hub, safetensors only)
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
    interval: int = 5  # taylorseer, deepcache, pab, faster_cache: a full computation every `interval` steps, reuse in between
    warmup_steps: int = 3  # taylorseer: full computation for the first steps (gathers the Taylor factors)
    order: int = 1  # taylorseer: highest order of the Taylor expansion
    branch: int = 0  # deepcache: the skip branch whose shallow layers still run on cached steps (0: the shallowest)
    ratio: float = 0.5  # tome: share of the self-attention tokens merged away
    timestep_low: int = 100  # pab, faster_cache: attention is reused only at timesteps strictly between low and high
    timestep_high: int = 800
    weight: float = 0.5  # faster_cache: w in out(t) + w * (out(t) - out(t-2)), the extrapolation of a skipped attention
    max_skip_steps: int = 3  # mag_cache: most consecutive steps skipped
    retention_ratio: float = 0.2  # mag_cache: share of the first steps never skipped


@dataclass
class ParallelSpec:
    """Context or tensor parallelism: the degrees; the job runs as world_size ranks (their product)."""

    name: str = "none"
    method: ParallelMethod = ParallelMethod.none
    ulysses_degree: int = 1
    ring_degree: int = 1
    tp_degree: int = 1
    backend: CommBackend = CommBackend.auto
    # How long one collective (a barrier, an all-to-all) may wait for the other ranks before the rank gives up
    # with its own error (init_process_group's timeout). None: the job's limit (run.timeout_s, else
    # sdbuild.distributed.PARALLEL_TIMEOUT_S), so the job's own end of its ranks comes first. Not identity.
    collective_timeout_s: Optional[float] = None

    @property
    def world_size(self) -> int:
        """How many ranks the job runs as: the product of the degrees."""
        return self.ulysses_degree * self.ring_degree * self.tp_degree


@dataclass
class LoraAdapter:
    path: str = ""  # a .safetensors LoRA file, a local folder holding weight_name, or a hub id (org/name)
    weight_name: Optional[str] = None  # the file inside a folder or hub repo (default: pytorch_lora_weights.safetensors)
    scale: float = 1.0  # the adapter's weight (set_adapters); fused: merged at this weight
    # a hub id not in the local HF cache: fetch weight_name (safetensors only) in the LoRA step; default offline
    download: bool = False


@dataclass
class LoraSpec:
    name: str = "none"
    mode: LoraMode = LoraMode.none
    # fused, unfused: all active at once, each at its scale. hotswap: the first is loaded before compile and
    # measured; each later one is swapped into its place after the timed calls (swap time, recompilations).
    adapters: List[LoraAdapter] = field(default_factory=list)


@dataclass
class RunSpec:
    prompt: str = "a photo of an astronaut riding a horse on mars"
    negative_prompt: Optional[str] = None
    steps: int = 50
    height: Optional[int] = None  # None: model.resolution
    width: Optional[int] = None
    batch_size: int = 1
    guidance_scale: float = 7.5
    # The T5 prompt sequence of the families with a T5 encoder (flux, sd3): the pipeline's
    # `max_sequence_length`; None: the pipeline's default (512 for Flux, 256 for SD3). Shorter is
    # faster (the denoiser attends over it every step) and changes the image (T5 sees fewer padding
    # tokens): model=tiny_flux_drawn sets the 48 it was trained with.
    max_sequence_length: Optional[int] = None
    seed: int = 0
    device: Device = Device.auto
    warmup: int = 1
    max_warmup: int = 5  # warmup goes on while a call still compiles / records CUDA graphs, up to this many
    # Timed calls: a number, or `auto`: at least 3, then on until the 95 % interval of the median
    # (of the paired speed-ups, when candidates are interleaved) is within +-interval_target, or
    # until max_measure_s of timed calls (sdbuild.measure).
    repeats: Any = 3
    interval_target: float = 0.03
    max_measure_s: float = 120.0
    # torch.set_num_threads for the job: `auto` (torch's own default for this machine) or a number.
    threads: Any = "auto"
    save_image: bool = True
    # Sweeps: seconds a job may run (from its hand-over to its row) before it is ended with a `failed`
    # row "timed out after N s"; jobs with a limit run in the sweep's long-lived worker process
    # (sdbuild.worker: replaced after a timeout, a crash or a job that leaves state behind).
    # None: SWEEP_TIMEOUT_S under the basic launcher, no limit under launchers with their own
    # (submitit's timeout_min); 0: no limit (jobs in the sweep's process). A single run has no limit.
    timeout_s: Optional[float] = None
    # Call the pipeline under torch.inference_mode (on top of its own no_grad): no version counters or
    # view tracking. Pixels identical on every CPU path tested (tests/test_inference_mode.py); off: no_grad only.
    inference_mode: bool = True


@dataclass
class MachineSpec:
    """The machine a spec is validated against (the `machine` group, conf/machine/). `local` (the
    default) probes the machine this process runs on; a profile (h100, h200, a100, l40s, rtx4090,
    cpu, or a team's own file on `hydra.searchpath`) describes one that may not be here, so
    `dry_run=true machine=h200` plans for an H200 from a laptop. A profile plans only: a real run
    with one is refused unless this machine matches it (sdbuild.validate). Not part of a row's
    identity (`_NOT_IDENTITY`): the row records it as what the plan was validated against."""

    name: str = "local"
    probe: bool = True  # true: this process's machine, probed (the profile's facts below are unused)
    cuda: bool = False
    device_name: str = "cpu"
    capability: Optional[List[int]] = None  # CUDA compute capability, e.g. [9, 0]
    gpu_memory_gb: Optional[float] = None  # GiB on GPU 0
    gpu_count: Optional[int] = None  # GPUs on the node (a parallel job's ranks); None: 1 where cuda, else 0
    cpu_count: Optional[int] = None  # CPU cores (ranks of a parallel job on CPU); None: this machine's
    host_memory_gb: Optional[float] = None  # GiB of physical memory
    cudnn_version: Optional[str] = None  # the cuDNN torch runs with, e.g. "9.10.2"
    diffusers_version: Optional[str] = None  # None: the diffusers installed here
    # The optional packages importable there: import name -> version (as diffusers probes them:
    # the module imports and a distribution of that name is installed; "flash_attn_3" is FA3's).
    packages: Dict[str, str] = field(default_factory=dict)
    cxx: bool = True  # a C++ compiler (g++, c++, clang++): Inductor's CPU kernels, AOTInductor's wrapper
    cc: bool = True  # a C compiler ($CC, else gcc or clang): Triton builds its kernel launcher with it
    python_headers: bool = True  # Python.h: the same launcher includes it
    cuda_toolkit: bool = False  # CUDA_HOME / nvcc: AOTInductor compiles its CUDA wrapper with it


@dataclass
class FidelitySpec:
    """The prompt-adherence pass of a drawn model (sdbuild/drawn.py): after the timed calls, the built
    pipeline draws every prompt with every seed (batched, the row's steps, guidance and scheduler) and
    the drawn reader scores the images. Other models have no reader, so no pass and no `adherence`."""

    prompts: Optional[List[str]] = None  # None: drawn.ADHERENCE_PROMPTS; [] turns the pass off
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    batch: int = 20  # images per pipeline call


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
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    run: RunSpec = field(default_factory=RunSpec)
    # The machine validated against: this one (local, probed) or a profile that plans for another.
    machine: MachineSpec = field(default_factory=MachineSpec)
    fidelity: FidelitySpec = field(default_factory=FidelitySpec)
    # A finished sweep folder: combinations already measured there are copied, not re-run.
    resume: Optional[str] = None
    # Name of the `+preset=` a job came from (set by the preset files), for report ordering.
    preset: Optional[str] = None
    preset_order: Optional[int] = None
    # Where the embedded tiny model is cached (default: ~/.cache/sdbuild).
    cache_dir: Optional[str] = None
    # Sweeps: run each job in a fresh Python process of its own (CPU memory figures untouched by
    # earlier jobs, no weights shared with them). Costs the imports once per job.
    isolate: bool = False
    # Validate, print the resolved spec and what would be built, and stop: no weights load.
    dry_run: bool = False


# The config groups, in the order labels and the option tables list them (the order the builder
# applies their levers in is its own: sdbuild/builder.py STEPS).
GROUPS = ("precision", "memory_format", "attention", "compile", "memory", "quant", "vae", "model", "scheduler",
          "cache", "parallel", "lora")


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
    """Raise `SpecError` naming every key of `cfg` that the Spec does not have, and every spec
    value that calls a resolver (see `resolver_problems`)."""
    from .errors import SpecError

    if problems := unknown_keys(cfg) + resolver_problems(cfg):
        raise SpecError(problems)


def _resolvers(tree: Any, found: list) -> list:
    """The names of the resolvers an OmegaConf interpolation's parse tree calls."""
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    if isinstance(tree, OmegaConfGrammarParser.InterpolationResolverContext):
        found.append(tree.resolverName().getText())
    for child in getattr(tree, "children", None) or []:
        _resolvers(child, found)
    return found


def resolver_problems(cfg: Any, prefix: str = "") -> list[str]:
    """A problem for every spec value of a composed config that calls a resolver (`${oc.env:X}`,
    `${oc.decode:...}`, `${now:...}`...): a spec is data, and a resolver would write what it
    evaluates (an environment variable, a secret) into the row. A reference to another spec value
    (`${run.height}`) is plain data and allowed; `hydra:` is not a spec and not checked. Plain
    dicts (a recorded spec) are never interpolated (`to_spec`), so only DictConfigs are checked."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.grammar_parser import parse

    from .errors import problem

    if not isinstance(cfg, (DictConfig, ListConfig)):
        return []
    problems = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        if prefix == "" and key in NOT_SPEC_KEYS:
            continue
        name = f"{prefix}{key}" if isinstance(cfg, DictConfig) else f"{prefix[:-1]}[{key}]"
        if OmegaConf.is_interpolation(cfg, key):
            raw = cfg._get_node(key)._value()
            try:
                called = _resolvers(parse(raw), [])
            except Exception:  # a malformed interpolation: Hydra/OmegaConf say so when it is used
                called = []
            if called:
                problems.append(problem(f"{name}={raw}", f"calls the resolver(s) {', '.join(dict.fromkeys(called))}: "
                                        "spec values are data, never evaluated (a resolver could write an "
                                        "environment variable or a secret into the row)",
                                        "Write the value itself; for a literal ${, escape it as \\${"))
        else:
            value = cfg._get_node(key)
            if isinstance(value, (DictConfig, ListConfig)):
                problems += resolver_problems(value, f"{name}.")
    return problems


def _literal(data: Any) -> Any:
    """Plain data as OmegaConf must see it to keep it plain: every `${` in a string escaped, so a
    recorded `${oc.env:SECRET}` stays that text and is never evaluated."""
    import re

    if isinstance(data, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", data)
    if isinstance(data, dict):
        return {k: _literal(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_literal(v) for v in data]
    return data


def to_spec(cfg: Any) -> Spec:
    """Turn a composed DictConfig (or a plain dict, such as a recorded `spec`) into the typed
    `Spec` object: Hydra's node dropped, unknown keys and resolvers refused, values typed; a value
    of the wrong type is a `SpecError` naming the key. A plain dict is read as plain data: nothing
    in it is interpolated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .errors import SpecError, problem

    check_keys(cfg)
    try:
        if not OmegaConf.is_config(cfg):
            cfg = OmegaConf.create(_literal(cfg))
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in NOT_SPEC_KEYS])
        merged = OmegaConf.merge(OmegaConf.structured(Spec), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "spec"
        why = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
        raise SpecError([problem(key, why, "Give a value of the field's type (sdbuild/spec.py; "
                                 "`python -m sdbuild --cfg job` prints a valid spec)")]) from None


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

    run, problems = spec.run, float_problems(spec)
    if run.timeout_s is not None and run.timeout_s < 0:
        problems.append(problem(f"run.timeout_s={run.timeout_s}", "must be >= 0 seconds",
                                "Use run.timeout_s=0 for no limit, or the seconds a sweep job may take"))
    wait = spec.parallel.collective_timeout_s
    if wait is not None and not (math.isfinite(wait) and wait > 0):
        problems.append(problem(f"parallel.collective_timeout_s={wait}", "must be a positive number of seconds",
                                "Leave it unset (null: the job's limit, run.timeout_s) or use e.g. "
                                "parallel.collective_timeout_s=600"))
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
        elif option == "compile.cache_dir" and value is not None and (why := not_own_folder(value)):
            problems.append(problem(f"{option}={value}", f"{why}: torch loads compiled code and unpickles cache entries "
                                    "from this folder, so everyone who can write there could run code in this job",
                                    f"Set {option} to a folder of your own that only you can write (e.g. "
                                    "compile.cache_dir=outputs/compile_cache), or leave it unset"))
    problems += measurement_problems(run) + range_problems(spec) + fidelity_problems(spec)
    if spec.resume is not None and not os.path.isdir(os.path.expanduser(spec.resume)):
        problems.append(problem(f"resume={spec.resume}", "is not a folder", "Point resume at an earlier sweep's folder "
                                "(outputs/multirun/<time>)"))
    return problems


def fidelity_problems(spec: Spec) -> list[str]:
    """fidelity.prompts are drawn-set prompts, read by the drawn reader: only a drawn model has one;
    fidelity.seeds are seeds torch takes."""
    from .drawn import parse_prompt
    from .errors import problem

    fid, problems = spec.fidelity, []
    for seed in fid.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            problems.append(problem(f"fidelity.seeds={list(fid.seeds)}", f"holds {seed!r}, not a seed",
                                    "Use seeds between 0 and 2**64-1, e.g. fidelity.seeds=[0,1]"))
    if not fid.prompts:
        return problems
    if spec.model.source is not ModelSource.drawn:
        return problems + [problem("fidelity.prompts", f"asks for prompt adherence, but model={spec.model.name} has no "
                                   "reader (the drawn reader knows only the drawn set's images)",
                                   "Use a drawn model (model=tiny_drawn, model=tiny_flux_drawn), or drop fidelity.prompts")]
    for text in fid.prompts:
        try:
            parse_prompt(text)
        except ValueError as exc:
            problems.append(problem("fidelity.prompts", str(exc), "Use prompts such as 'a red 7 on a blue background'"))
    return problems


AUTO = "auto"


def _count(value: Any) -> Optional[int]:
    """A whole number given as an int (or its digits), else None; bools are not counts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def repeat_count(run: RunSpec) -> Optional[int]:
    """`run.repeats` as a number of timed calls; None for `auto` (call until the interval is narrow)."""
    return None if run.repeats == AUTO else _count(run.repeats)


# The range of every numeric spec field not checked above (sizes, measurement settings): (low, high,
# what to use instead), both ends included; `None` is the field left unset where it may be. Checked
# with the other spec-level rules, before anything loads: a value out of range would otherwise fail
# after the weights loaded (a division by zero, an overflowing seed) or be taken silently.
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
TINY = 1e-9  # the low end of a field that must be > 0
RANGES: dict = {
    "model.resolution": (8, MAX_SIDE, "Use the model's native side, e.g. model.resolution=512 (a multiple of 8)"),
    "run.steps": (1, 1000, "Use run.steps=1 or more, at most 1000 (the schedulers' training timesteps; 50 is typical)"),
    "run.batch_size": (1, 10 ** 9, "Use run.batch_size=1 or more"),  # above MAX_BATCH: its own message above
    "run.warmup": (0, 100, "Use run.warmup=0 or more, at most 100 (1 is typical)"),
    "run.max_warmup": (1, 100, "Use run.max_warmup=1 or more, at most 100 (5 is typical)"),
    "run.guidance_scale": (0, 100, "Use 7.5 (typical) or 1.0 (no classifier-free guidance)"),
    "run.max_sequence_length": (1, 512, "Use run.max_sequence_length=512 (Flux's default; T5 reads at most 512)"),
    "run.seed": (*SEED_RANGE, "Use a seed between 0 and 2**64-1, e.g. run.seed=0"),
    "run.max_measure_s": (0, 7 * 24 * 3600, "Use run.max_measure_s=120"),
    # A relative change of a residual: it can pass 1 where features move fast (the random tiny model).
    "cache.threshold": (TINY, 100.0, "Use cache.threshold=0.05 (a relative change, > 0)"),
    "cache.interval": (1, 1000, "Use cache.interval=5 (a full computation every 5 steps)"),
    "cache.warmup_steps": (0, 1000, "Use cache.warmup_steps=3"),
    "cache.order": (0, 8, "Use cache.order=1"),
    "cache.branch": (0, 64, "Use cache.branch=0 (the shallowest skip branch)"),
    "cache.ratio": (0.0, 0.99, "Use cache.ratio=0.5 (the share of tokens merged, below 1)"),
    "cache.timestep_low": (0, 1000, "Use cache.timestep_low=100"),
    "cache.timestep_high": (0, 100000, "Use cache.timestep_high=800"),  # faster_cache's <= 1000: capabilities.py
    "cache.weight": (0.0, 1.0, "Use cache.weight=0.5"),
    "cache.max_skip_steps": (1, 1000, "Use cache.max_skip_steps=3"),
    "cache.retention_ratio": (0.0, 1.0, "Use cache.retention_ratio=0.2 (a share, between 0 and 1)"),
    "parallel.ulysses_degree": (1, 64, "Use parallel.ulysses_degree=2 (ranks; 1: no Ulysses split)"),
    "parallel.ring_degree": (1, 64, "Use parallel.ring_degree=2 (ranks; 1: no ring split)"),
    "parallel.tp_degree": (1, 64, "Use parallel.tp_degree=2 (ranks; 1: no tensor split)"),
    "fidelity.batch": (1, 1024, "Use fidelity.batch=20 (images per call of the adherence pass)"),
}
MAX_SLICE = 4096  # attention.slice_size as a number of heads / slices


def range_problems(spec: Spec) -> list[str]:
    """A problem for every numeric field outside its range (RANGES), for model.resolution when it is not
    a multiple of 8, for attention.slice_size when it is not auto, max or a count >= 1, and for
    run.threads above this machine's CPU count (oversubscribed threads make every call many times
    slower). No torch: os.cpu_count() only."""
    import math

    from .errors import problem

    problems = []
    for name, (low, high, instead) in RANGES.items():
        section, field = name.split(".")
        value = getattr(getattr(spec, section), field)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue  # float_problems says so
        if value < low:
            problems.append(problem(f"{name}={value}", "must be > 0" if low == TINY else f"must be >= {low}", instead))
        elif value > high:
            problems.append(problem(f"{name}={value}", f"must be <= {high}", instead))
    res = spec.model.resolution
    if isinstance(res, int) and 8 <= res <= MAX_SIDE and res % 8:
        problems.append(problem(f"model.resolution={res}", "must be a multiple of 8 (the VAE downsamples 8x)",
                                f"Use model.resolution={max(8, round(res / 8) * 8)}"))
    size = spec.attention.slice_size
    if size is not None and size not in ("auto", "max"):
        if not str(size).isdigit():
            problems.append(problem(f"attention.slice_size={size}", "must be auto, max or a number of heads",
                                    "Use attention.slice_size=auto"))
        elif not 1 <= int(size) <= MAX_SLICE:
            problems.append(problem(f"attention.slice_size={size}", f"must be a number of heads from 1 to {MAX_SLICE}",
                                    "Use attention.slice_size=auto, or a number such as 2"))
    threads, cores = thread_count(spec.run), os.cpu_count() or 1
    if threads is not None and threads > cores:
        problems.append(problem(f"run.threads={threads}", f"is more than this machine's {cores} CPU cores "
                                "(oversubscribed threads make each call many times slower)",
                                f"Use run.threads=auto or a number from 1 to {cores}"))
    return problems


def thread_count(run: RunSpec) -> Optional[int]:
    """`run.threads` as a number of torch threads; None for `auto` (torch's own default)."""
    return None if run.threads == AUTO else _count(run.threads)


def measurement_problems(run: RunSpec) -> list[str]:
    """run.repeats, run.threads, run.interval_target and run.max_measure_s, each named when wrong."""
    from .errors import problem

    problems = []
    for name, why, instead in (("repeats", "must be auto or a whole number >= 1",
                                "Use run.repeats=auto (call until the interval is narrow) or run.repeats=3"),
                               ("threads", "must be auto or a whole number >= 1",
                                "Use run.threads=auto (torch's default) or run.threads=1")):
        value = getattr(run, name)
        if value != AUTO and not ((_count(value) or 0) >= 1):
            problems.append(problem(f"run.{name}={value}", why, instead))
    if not 0 < run.interval_target < 1:
        problems.append(problem(f"run.interval_target={run.interval_target}", "must be a fraction between 0 and 1 "
                                "(the half-width of the 95 % interval, relative to the median)",
                                "Use run.interval_target=0.03 (+-3 %)"))
    if not run.max_measure_s > 0:
        problems.append(problem(f"run.max_measure_s={run.max_measure_s}", "must be > 0 seconds",
                                "Use run.max_measure_s=120"))
    return problems


def float_problems(spec: Any, prefix: str = "") -> list[str]:
    """A problem for every float field of the spec that is not a finite number (nan, inf): every
    comparison with NaN is false, so it would slip past each range check and time another pipeline."""
    import dataclasses
    import math
    import typing

    from .errors import problem

    problems = []
    hints = typing.get_type_hints(type(spec))
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            problems += float_problems(value, f"{prefix}{f.name}.")
        elif hints[f.name] in (float, Optional[float]) and value is not None and not math.isfinite(value):
            default = f.default if f.default is not dataclasses.MISSING else None
            problems.append(problem(f"{prefix}{f.name}={value}", "must be a finite number",
                                    f"Use a number, e.g. {prefix}{f.name}={default}" if default is not None
                                    else f"Use a number, or leave {prefix}{f.name} unset"))
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


def _private_group(gid: int) -> bool:
    """Whether group `gid` is this user's own private group (the user's name, no other member:
    the usual one-user group), where a group write bit lets nobody else in."""
    import grp
    import pwd

    try:
        group, me = grp.getgrgid(gid), pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return False
    return gid == os.getgid() and group.gr_name == me and set(group.gr_mem) <= {me}


def _others_write(st: os.stat_result, sticky_ok: bool) -> Optional[str]:
    """Who else than this user can write into a file or folder with these stat facts (None: nobody)."""
    import stat as stat_

    if st.st_uid not in (os.getuid(), 0):
        return f"owned by user {st.st_uid}"
    shared = not (sticky_ok and st.st_mode & stat_.S_ISVTX)  # a sticky folder (/tmp): nobody swaps another's entry
    if st.st_mode & stat_.S_IWOTH and shared:
        return "writable by every user"
    if st.st_mode & stat_.S_IWGRP and shared and not _private_group(st.st_gid):
        return f"writable by group {st.st_gid}"
    return None


MAX_CACHE_ENTRIES = 200_000  # a compile cache folder with more entries is not walked whole: refused


def not_own_folder(path: str) -> Optional[str]:
    """Why a compile cache folder is not this user's alone, else None. The folder (when it exists)
    and everything in it must be owned by this user (or root) and writable by nobody else (a group
    write bit only for the user's private group), with no symbolic links; each folder above it must
    be writable by nobody else either, or be sticky like /tmp (else someone could swap the folder
    for theirs). A folder that does not exist yet is made by the job, with this user's umask."""
    folder = os.path.abspath(os.path.expanduser(path))
    parent = folder
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if parent == folder:
        parent = os.path.dirname(folder)
        seen = 0
        for top, dirs, files in os.walk(folder):
            for entry in ([top] if top == folder else []) + [os.path.join(top, n) for n in dirs + files]:
                seen += 1
                if seen > MAX_CACHE_ENTRIES:
                    return f"holds more than {MAX_CACHE_ENTRIES} entries (too many to check)"
                try:
                    st = os.lstat(entry)
                except OSError as exc:
                    return f"cannot be checked ({entry}: {exc.strerror})"
                where = "is" if entry == folder else f"holds {entry}, which is"
                if os.path.islink(entry):
                    return f"{where} a symbolic link"
                if why := _others_write(st, sticky_ok=False):
                    return f"{where} {why}"
    while True:
        if why := _others_write(os.stat(parent), sticky_ok=True):
            return f"is inside {parent}, which is {why}"
        if parent == os.path.dirname(parent):
            return None
        parent = os.path.dirname(parent)


# Fields that say how a run is measured or where it is stored, not what pipeline is built:
# left out of the identity used to match rows when a sweep is resumed.
# (`machine`: what the plan was validated against; the row's env records the machine it ran on.)
_NOT_IDENTITY = {"resume", "preset", "preset_order", "cache_dir", "isolate", "dry_run", "machine"}
# run fields added after rows were first written, with their defaults: left out of the identity at
# their default, so a row measured before they existed still matches the same spec on resume.
_UNSET = object()
# Fields added after rows were first written, at the value that builds and runs what rows from before
# them measured: left out of the identity at that value, so an older row still matches the same spec
# on resume and in comparisons. (run.inference_mode is not among them: older rows ran without it.)
_LATER_FIELDS = {
    ("run", "threads"): RunSpec.threads, ("run", "interval_target"): RunSpec.interval_target,
    ("run", "max_measure_s"): RunSpec.max_measure_s, ("attention", "backend"): AttentionBackend.default.name,
    ("memory", "layerwise_fp8"): False, ("cache", "weight"): CacheSpec.weight,
    ("model", "variant"): None, ("model", "download"): False,
    ("fidelity", "prompts"): FidelitySpec.prompts, ("fidelity", "seeds"): [0, 1], ("fidelity", "batch"): FidelitySpec.batch,
}
_LATER_SECTIONS = {"fidelity"}  # sections added later: left out where every field is at its default
# Groups added later: left out while their switch (field, value) is off.
_LATER_GROUPS = {"cache": ("method", CacheMethod.none.name), "parallel": ("method", ParallelMethod.none.name),
                 "lora": ("mode", LoraMode.none.name)}
_NOT_RUN_IDENTITY = {"timeout_s"}  # how long a job may take is not what it builds
_NOT_FIELD_IDENTITY = {("parallel", "collective_timeout_s")}  # nor how long a rank waits for the others


def spec_key(spec_dict: dict) -> str:
    """Stable identity of a resolved spec, to find the same combination in another sweep."""
    import hashlib
    import json

    ident = {k: v for k, v in spec_dict.items() if k not in _NOT_IDENTITY
             and not (k in _LATER_GROUPS and isinstance(v, dict) and v.get(_LATER_GROUPS[k][0]) == _LATER_GROUPS[k][1])}
    for group, fields in ident.items():
        if isinstance(fields, dict):
            ident[group] = {k: v for k, v in fields.items()
                            if not (group == "run" and k in _NOT_RUN_IDENTITY)
                            and (group, k) not in _NOT_FIELD_IDENTITY
                            and _LATER_FIELDS.get((group, k), _UNSET) != v}
    ident = {k: v for k, v in ident.items() if not (k in _LATER_SECTIONS and v == {})}
    if isinstance(ident.get("lora"), dict) and isinstance(ident["lora"].get("adapters"), list):
        # an adapter's `download` says how its file got here, not what is built (its sha256 is in the row)
        ident["lora"] = {**ident["lora"], "adapters": [{k: v for k, v in a.items() if k != "download"}
                                                       if isinstance(a, dict) else a for a in ident["lora"]["adapters"]]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

