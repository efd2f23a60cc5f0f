"""What each option needs and what excludes what: one table, read by validation and the docs.

`REQUIREMENTS` says what an option needs from the machine (CUDA, compute capability, a package,
a diffusers version, a model family). `EXCLUSIONS` says which options cannot be combined.
`validate.validate` checks a spec against both before any weights load, and
`python -m sdbuild.capabilities` prints both as the Markdown tables of docs/options.md, so the error
a user sees and the docs they read come from the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .families import (
    CACHE_FAMILIES,
    CONTEXT_PARALLEL_FAMILIES,
    DISPATCHER_FAMILIES,
    FAMILIES,
    TENSOR_PARALLEL_FAMILIES,
    TRANSFORMER_FAMILIES,
    UNET_FAMILIES,
    UNET_SCHEDULERS,
)
from .spec import (
    AttentionBackend,
    AttentionProcessor,
    CacheMethod,
    CommBackend,
    CompileMethod,
    CompileMode,
    CompileTarget,
    Dtype,
    LoraMode,
    MemoryFormat,
    ModelFamily,
    ModelSource,
    Offload,
    ParallelMethod,
    Quant,
    SchedulerKind,
    SdpaBackend,
    Spec,
    VaeKind,
)


@dataclass(frozen=True)
class Requirement:
    option: str  # how the user writes it
    group: str  # the config group it belongs to, named in the error with the user's choice
    applies: Callable[[Spec], bool]
    cuda: bool = False
    min_capability: Optional[Tuple[int, int]] = None  # CUDA compute capability, when on CUDA
    package: Optional[str] = None  # importable module name (a distribution of that name installed: diffusers' probe)
    package_version: Optional[str] = None  # the package's minimum version (diffusers' attention_dispatch asks it)
    diffusers: Optional[str] = None  # minimum diffusers version
    families: Optional[Tuple[ModelFamily, ...]] = None
    c_compiler_on_cpu: bool = False  # inductor writes and builds C++ on CPU
    triton_on_cuda: bool = False  # Triton builds its launcher with a C compiler and Python.h
    cxx_on_cuda: bool = False  # AOTInductor builds its CUDA wrapper with a C++ compiler (g++)
    cuda_toolkit_on_cuda: bool = False  # AOTInductor compiles its CUDA wrapper with nvcc (CUDA_HOME)
    ranks_fit: bool = False  # parallel.world_size ranks: one GPU each on CUDA, one CPU core each on CPU
    instead: str = ""  # what to use where the need is not met

    @property
    def asks_machine(self) -> bool:
        """Whether checking it needs the machine's facts (a model-family rule needs only the spec)."""
        return bool(self.cuda or self.min_capability or self.package or self.diffusers or self.c_compiler_on_cpu
                    or self.triton_on_cuda or self.cxx_on_cuda or self.cuda_toolkit_on_cuda or self.ranks_fit)


@dataclass(frozen=True)
class Exclusion:
    options: str  # the combination, as the user writes it
    applies: Callable[[Spec], bool]
    why: str
    instead: str
    explain: Optional[Callable[[Spec], str]] = None  # the spec's own numbers, appended to `why` in the error
    cuda_only: bool = False  # the conflict exists on CUDA only (CUDA graphs, half-only kernels): not refused on CPU

    @property
    def combination(self) -> str:
        """The combination as the error and the docs name it."""
        return self.options + (" on CUDA" if self.cuda_only else "")


def _uses_dtype(spec: Spec, dtype: Dtype) -> bool:
    return spec.precision.dtype is dtype or spec.precision.vae_dtype is dtype


def _fixed_graph(spec: Spec) -> bool:
    return spec.compile.method in (CompileMethod.trace, CompileMethod.export)


def _compiles(spec: Spec) -> bool:
    return spec.compile.method is CompileMethod.inductor


def _cuda_graphs(spec: Spec) -> bool:
    """torch.compile in a mode that records CUDA graphs (on CUDA): reduce-overhead, max-autotune."""
    return _compiles(spec) and spec.compile.mode.cuda_graphs


# diffusers' dispatcher backends whose CUDA kernels take fp16/bf16 only (on CPU, _native_flash runs fp32)
_HALF_ONLY_BACKENDS = (AttentionBackend.native_flash, AttentionBackend.native_cudnn, AttentionBackend.flash,
                       AttentionBackend.flash_3, AttentionBackend.sage)


# diffusers' cache hooks (hooks/*.py) keep tensors of one denoising step to read back at the next
_HOOK_CACHES = (CacheMethod.first_block, CacheMethod.taylorseer, CacheMethod.pab, CacheMethod.faster_cache,
                CacheMethod.mag_cache)


def _lora(spec: Spec, *modes: LoraMode) -> bool:
    return spec.lora.mode in (modes or (LoraMode.fused, LoraMode.unfused, LoraMode.hotswap))


def _transformer(spec: Spec) -> bool:
    return FAMILIES[spec.model.family].transformer


# The versions diffusers' attention dispatcher needs before it uses a package's kernels
# (diffusers/models/attention_dispatch.py `_REQUIRED_*_VERSION`; tests/test_machines.py checks they agree).
REQUIRED_FLASH_ATTN = "2.6.3"
REQUIRED_SAGE = "2.1.1"
REQUIRED_XFORMERS = "0.0.29"

_CPU_BACKENDS = "On CPU use attention.backend=native, native_math, native_flash or flex"


def _backend(spec: Spec, *backends: AttentionBackend) -> bool:
    return spec.attention.backend in backends


_CACHE_INSTEAD = ("diffusers' cache hooks run on Flux only (UNet2DConditionModel has no transformer blocks for them; "
                  "in diffusers 0.42 SD3's transformer has no CacheMixin and its pipeline sets no cache context): use "
                  "cache=none, or a Flux model (model=tiny_flux, flux, flux_arch)")


def _parallel(spec: Spec) -> bool:
    return spec.parallel.method is not ParallelMethod.none


def _context_parallel(spec: Spec) -> bool:
    return spec.parallel.method in (ParallelMethod.ulysses, ParallelMethod.ring, ParallelMethod.unified)


# diffusers 0.42.1's attention backends registered with supports_context_parallel=True (of those sdbuild offers;
# `default` is the dispatcher's active backend, native); tests/test_parallel.py checks this against
# _AttentionBackendRegistry._supports_context_parallel.
CONTEXT_PARALLEL_BACKENDS = (AttentionBackend.default, AttentionBackend.native, AttentionBackend.native_flash,
                             AttentionBackend.native_cudnn, AttentionBackend.flash, AttentionBackend.sage)
# Ring attention merges the partial results of each K/V block by their log-sum-exp: the backend's forward op must
# return it (return_lse=True). native and native_math raise "does not support return_lse=True".
RING_BACKENDS = (AttentionBackend.native_flash, AttentionBackend.native_cudnn, AttentionBackend.flash,
                 AttentionBackend.sage)


def _ring(spec: Spec) -> bool:
    return spec.parallel.method in (ParallelMethod.ring, ParallelMethod.unified)


# The degrees each method takes: (ulysses, ring, tp) each either "> 1" (True) or "= 1" (False).
PARALLEL_DEGREES = {
    ParallelMethod.none: (False, False, False),
    ParallelMethod.ulysses: (True, False, False),
    ParallelMethod.ring: (False, True, False),
    ParallelMethod.unified: (True, True, False),
    ParallelMethod.tensor: (False, False, True),
}


def _degrees_wrong(spec: Spec, method: ParallelMethod) -> bool:
    p = spec.parallel
    return p.method is method and any((degree > 1) != above for degree, above in
                                      zip((p.ulysses_degree, p.ring_degree, p.tp_degree), PARALLEL_DEGREES[method]))


def _degrees(spec: Spec) -> str:
    p = spec.parallel
    return f"parallel.ulysses_degree={p.ulysses_degree}, ring_degree={p.ring_degree}, tp_degree={p.tp_degree}"


def parallel_shapes(spec: Spec) -> Optional[dict]:
    """What the degrees must divide: the denoiser's heads, its image tokens and text tokens (None where
    the denoiser's config cannot be read before loading; then diffusers' own check at the first call says)."""
    from .models import denoiser_config, vae_downsampling

    family = FAMILIES[spec.model.family]
    config = denoiser_config(spec)
    if not config or "num_attention_heads" not in config:
        return None
    side = spec.model.resolution
    height, width = spec.run.height or side, spec.run.width or side
    # Flux: the VAE downsamples (8x; the drawn Flux's 4x) and the pipeline packs 2x2 latent patches into one token
    down = vae_downsampling(spec) * (2 if family.packed_latents else 1)
    image_tokens = (height // down) * (width // down)
    text_tokens = spec.run.max_sequence_length or family.text_tokens
    return {"heads": int(config["num_attention_heads"]), "image_tokens": image_tokens, "text_tokens": text_tokens}


def parallel_split_problem(spec: Spec) -> Optional[str]:
    """Why the degrees do not split this model evenly (None: they do, or it cannot be told before loading)."""
    if not _parallel(spec) or (shapes := parallel_shapes(spec)) is None:
        return None
    p, why = spec.parallel, []
    for name, degree in (("ulysses_degree", p.ulysses_degree), ("tp_degree", p.tp_degree)):
        if shapes["heads"] % degree:
            why.append(f"parallel.{name}={degree} does not divide the denoiser's {shapes['heads']} attention heads")
    context = p.ulysses_degree * p.ring_degree
    for name in ("image_tokens", "text_tokens"):
        if context > 1 and shapes[name] % context:
            why.append(f"{context} context ranks do not divide its {shapes[name]} {name.replace('_', ' ')}")
    return "; ".join(why) or None


def _parallel_instead(spec: Spec) -> str:
    return "Use a degree that divides them (2 for model=tiny_flux: 2 heads; at 64x64 16 image tokens)"


REQUIREMENTS: Tuple[Requirement, ...] = (
    Requirement(
        "precision.dtype or precision.vae_dtype = fp16",
        "precision",
        lambda s: _uses_dtype(s, Dtype.fp16),
        cuda=True,
        instead="On CPU use precision=bf16 (or fp32); fp16 kernels there are missing or slower than fp32",
    ),
    Requirement(
        "precision.dtype or precision.vae_dtype = bf16",
        "precision",
        lambda s: _uses_dtype(s, Dtype.bf16),
        min_capability=(8, 0),
        instead="On pre-Ampere GPUs use precision=fp16",
    ),
    Requirement(
        "attention=xformers",
        "attention",
        lambda s: s.attention.processor is AttentionProcessor.xformers,
        cuda=True,
        package="xformers",
        instead="Use attention=sdpa (PyTorch's fused attention, no extra package)",
    ),
    Requirement(
        "attention.sdpa_backend=flash, efficient, cudnn",
        "attention",
        lambda s: s.attention.sdpa_backend not in (SdpaBackend.auto, SdpaBackend.math),
        cuda=True,
        instead="On CPU use attention.sdpa_backend=auto or math",
    ),
    Requirement(
        "attention.sdpa_backend=flash",
        "attention",
        lambda s: s.attention.sdpa_backend is SdpaBackend.flash,
        min_capability=(8, 0),
        instead="Use attention.sdpa_backend=efficient on pre-Ampere GPUs",
    ),
    Requirement(
        "compile=inductor",
        "compile",
        _compiles,
        c_compiler_on_cpu=True,
        triton_on_cuda=True,
        instead="Install what is missing (apt-get install g++ python3-dev) or use compile=none",
    ),
    Requirement(
        "compile=export",
        "compile",
        lambda s: s.compile.method is CompileMethod.export,
        c_compiler_on_cpu=True,
        triton_on_cuda=True,
        cxx_on_cuda=True,
        cuda_toolkit_on_cuda=True,
        instead="Install what is missing (g++, python3-dev, a CUDA toolkit with CUDA_HOME set) or use compile=trace",
    ),
    Requirement(
        "compile.mode=reduce_overhead (CUDA graphs)",
        "compile",
        lambda s: _compiles(s) and s.compile.mode is CompileMode.reduce_overhead,
        cuda=True,
        instead="On CPU use compile.mode=default",
    ),
    Requirement(
        "compile.regional=true",
        "compile",
        lambda s: s.compile.regional,
        diffusers="0.35",
        instead="Use compile=inductor (whole-model compile)",
    ),
    Requirement(
        "memory.offload=model, sequential, group",
        "memory",
        lambda s: s.memory.offload is not Offload.none,
        cuda=True,
        package="accelerate",
        instead="Offloading moves weights between CPU and GPU; on CPU use memory=none",
    ),
    Requirement(
        "memory.layerwise_fp8=true",
        "memory",
        lambda s: s.memory.layerwise_fp8,
        diffusers="0.34",  # enable_layerwise_casting
        instead="Use memory=none (or quant=int8wo for smaller weights)",
    ),
    Requirement(
        "memory.offload=group",
        "memory",
        lambda s: s.memory.offload is Offload.group,
        diffusers="0.33",
        instead="Use memory=model_offload",
    ),
    Requirement(
        "quant=int8wo, int8dq, fp8dq",
        "quant",
        lambda s: s.quant.method is not Quant.none,
        package="torchao",
        diffusers="0.34",  # PipelineQuantizationConfig
        instead="Use quant=none",
    ),
    Requirement(
        "quant=int8wo, int8dq, fp8dq (loading)",
        "quant",
        lambda s: s.quant.method is not Quant.none,
        package="accelerate",  # diffusers loads quantized weights with low_cpu_mem_usage, which needs it
        instead="pip install accelerate, or use quant=none",
    ),
    Requirement(
        "quant=fp8dq",
        "quant",
        lambda s: s.quant.method is Quant.fp8dq,
        cuda=True,
        min_capability=(8, 9),
        instead="float8 matmuls need Ada/Hopper (compute capability >= 8.9); use quant=int8dq",
    ),
    Requirement(
        "scheduler=ddim, dpmpp_2m, euler, pndm (discrete-time noise schedules)",
        "scheduler",
        lambda s: s.scheduler.kind in UNET_SCHEDULERS,
        families=UNET_FAMILIES,
        instead="Flux and SD3 are trained for flow matching: use scheduler=flow_euler (their model options' default)",
    ),
    Requirement(
        "scheduler=flow_euler",
        "scheduler",
        lambda s: s.scheduler.kind is SchedulerKind.flow_euler,
        families=TRANSFORMER_FAMILIES,
        instead="SD 1.x and SDXL use scheduler=ddim, dpmpp_2m or euler",
    ),
    Requirement(
        "cache=pab",
        "cache",
        lambda s: s.cache.method is CacheMethod.pab,
        diffusers="0.34",  # PyramidAttentionBroadcastConfig
        families=CACHE_FAMILIES,
        instead=_CACHE_INSTEAD,
    ),
    Requirement(
        "cache=faster_cache",
        "cache",
        lambda s: s.cache.method is CacheMethod.faster_cache,
        diffusers="0.34",  # FasterCacheConfig; like pab, reads FluxPipeline.current_timestep
        families=CACHE_FAMILIES,
        instead=_CACHE_INSTEAD,
    ),
    Requirement(
        "cache=mag_cache",
        "cache",
        lambda s: s.cache.method is CacheMethod.mag_cache,
        diffusers="0.37",  # MagCacheConfig
        families=CACHE_FAMILIES,
        instead=_CACHE_INSTEAD,
    ),
    Requirement(
        "cache=deepcache",
        "cache",
        lambda s: s.cache.method is CacheMethod.deepcache,
        package="DeepCache",
        families=UNET_FAMILIES,
        instead="pip install DeepCache (or the unetcache extra); on a transformer use cache=first_block or taylorseer",
    ),
    Requirement(
        "cache=tome",
        "cache",
        lambda s: s.cache.method is CacheMethod.tome,
        package="tomesd",
        families=UNET_FAMILIES,
        instead="pip install tomesd (or the unetcache extra); on a transformer use cache=first_block or taylorseer",
    ),
    Requirement(
        "attention.backend (diffusers' attention dispatcher)",
        "attention",
        lambda s: s.attention.backend is not AttentionBackend.default,
        diffusers="0.35",  # set_attention_backend
        families=DISPATCHER_FAMILIES,
        instead="Only Flux's processors call diffusers' dispatcher (SD3's call torch SDPA directly; UNets use "
                "attention.processor and attention.sdpa_backend): leave attention.backend=default there",
    ),
    Requirement(
        "attention.backend=native_efficient, native_cudnn, flash, flash_3, sage, xformers",
        "attention",
        lambda s: _backend(s, AttentionBackend.native_efficient, AttentionBackend.native_cudnn, AttentionBackend.flash,
                           AttentionBackend.flash_3, AttentionBackend.sage, AttentionBackend.xformers),
        cuda=True,
        instead=_CPU_BACKENDS,
    ),
    Requirement(
        "attention.backend=native_flash (on CUDA)",
        "attention",
        lambda s: _backend(s, AttentionBackend.native_flash),
        min_capability=(8, 0),
        instead="Use attention.backend=native_efficient on pre-Ampere GPUs",
    ),
    Requirement(
        "attention.backend=flash",
        "attention",
        lambda s: _backend(s, AttentionBackend.flash),
        package="flash_attn",
        package_version=REQUIRED_FLASH_ATTN,
        instead=f"pip install 'flash-attn>={REQUIRED_FLASH_ATTN}', or use attention.backend=native_flash",
    ),
    Requirement(
        "attention.backend=flash_3",
        "attention",
        lambda s: _backend(s, AttentionBackend.flash_3),
        package="flash_attn_3",  # the distribution diffusers looks for (its module: flash_attn_interface)
        min_capability=(9, 0),
        instead="FlashAttention-3 is built from source for Hopper (flash-attention's hopper/ folder installs the "
                "flash_attn_3 distribution); use attention.backend=flash or native_flash",
    ),
    Requirement(
        "attention.backend=sage",
        "attention",
        lambda s: _backend(s, AttentionBackend.sage),
        package="sageattention",
        package_version=REQUIRED_SAGE,
        instead=f"pip install 'sageattention>={REQUIRED_SAGE}', or use attention.backend=native_flash",
    ),
    Requirement(
        "attention.backend=xformers",
        "attention",
        lambda s: _backend(s, AttentionBackend.xformers),
        package="xformers",
        package_version=REQUIRED_XFORMERS,
        instead=f"pip install 'xformers>={REQUIRED_XFORMERS}', or use attention.backend=native_efficient",
    ),
    Requirement(
        "cache=first_block",
        "cache",
        lambda s: s.cache.method is CacheMethod.first_block,
        diffusers="0.35",  # FirstBlockCacheConfig
        families=CACHE_FAMILIES,
        instead=_CACHE_INSTEAD,
    ),
    Requirement(
        "cache=taylorseer",
        "cache",
        lambda s: s.cache.method is CacheMethod.taylorseer,
        diffusers="0.36",  # TaylorSeerCacheConfig
        families=CACHE_FAMILIES,
        instead=_CACHE_INSTEAD,
    ),    Requirement(
        "lora=fused, unfused, hotswap",
        "lora",
        _lora,
        package="peft",
        instead="pip install peft (or the lora extra: pip install -e \".[lora]\"), or use lora=none",
    ),
    Requirement(
        "lora=hotswap",
        "lora",
        lambda s: _lora(s, LoraMode.hotswap),
        diffusers="0.33",  # enable_lora_hotswap, load_lora_weights(hotswap=True)
        instead="Use lora=unfused and load each adapter afresh",
    ),
)


_PARALLEL_REQUIREMENTS: Tuple[Requirement, ...] = (
    Requirement(
        "parallel=ulysses, ring, unified (context parallelism)",
        "parallel",
        _context_parallel,
        diffusers="0.36",  # ContextParallelConfig, ModelMixin.enable_parallelism
        families=CONTEXT_PARALLEL_FAMILIES,
        instead="In diffusers 0.42 only Flux's transformer of the families here has a `_cp_plan` "
                "(SD3Transformer2DModel and UNet2DConditionModel have none): use parallel=none, or model=tiny_flux, "
                "flux or flux_arch",
    ),
    Requirement(
        "parallel=tensor",
        "parallel",
        lambda s: s.parallel.method is ParallelMethod.tensor,
        cuda=True,
        diffusers="0.42",  # TensorParallelConfig
        families=TENSOR_PARALLEL_FAMILIES,
        instead="diffusers 0.42.1 shards weights on cuda, neuron, tpu and xpu meshes only "
                "(hooks/tensor_parallel._SUPPORTED_TP_DEVICES), and only Flux here has a `_tp_plan`: on CPU use "
                "parallel=ulysses",
    ),
    Requirement(
        "parallel=ring, unified (ring attention)",
        "parallel",
        _ring,
        cuda=True,
        instead="the backends that return the log-sum-exp ring attention merges by run on CUDA only here: "
                "native_flash's forward op calls aten::_scaled_dot_product_flash_attention, which torch 2.13 does not "
                "implement on CPU (NotImplementedError, measured); on CPU use parallel=ulysses",
    ),
    Requirement(
        "parallel.backend=nccl",
        "parallel",
        lambda s: _parallel(s) and s.parallel.backend is CommBackend.nccl,
        cuda=True,
        instead="NCCL runs between GPUs: on CPU use parallel.backend=auto (gloo)",
    ),
    Requirement(
        "parallel (world size above 1)",
        "parallel",
        lambda s: _parallel(s) and s.parallel.world_size > 1,
        ranks_fit=True,
        instead="Lower the degrees (their product is the number of ranks), or run where more GPUs (cores) are visible",
    ),
)
REQUIREMENTS += _PARALLEL_REQUIREMENTS

_PARALLEL_EXCLUSIONS: Tuple[Exclusion, ...] = tuple(
    Exclusion(
        f"parallel={method.name} with " + ("a degree above 1" if method is ParallelMethod.none else
                                           "degrees other than " + ", ".join(
                                               f"{name}{' > 1' if above else '=1'}" for name, above in
                                               zip(("ulysses_degree", "ring_degree", "tp_degree"), degrees))),
        lambda s, method=method: _degrees_wrong(s, method),
        "parallel=none runs one process; the degrees are read by the parallel options only" if method is
        ParallelMethod.none else f"parallel={method.name} splits over " + " x ".join(
            name for name, above in zip(("ulysses_degree", "ring_degree", "tp_degree"), degrees) if above),
        "Use parallel=ulysses parallel.ulysses_degree=2 (ring: ring_degree; unified: both; tensor: tp_degree), "
        "or leave the degrees at 1 with parallel=none",
        explain=_degrees,
    )
    for method, degrees in PARALLEL_DEGREES.items()
) + (
    Exclusion(
        "parallel=ulysses, ring, unified with attention.backend other than default, native, native_flash, "
        "native_cudnn, flash, sage",
        lambda s: _context_parallel(s) and s.attention.backend not in CONTEXT_PARALLEL_BACKENDS,
        "diffusers 0.42 runs context parallelism on the attention backends registered with "
        "supports_context_parallel only (_AttentionBackendRegistry._supports_context_parallel)",
        "Use attention.backend=default or native (Ulysses), native_flash, native_cudnn, flash or sage",
        explain=lambda s: f"attention.backend={s.attention.backend.name}",
    ),
    Exclusion(
        "parallel=ring or unified with attention.backend other than native_flash, native_cudnn, flash, sage",
        lambda s: _ring(s) and s.attention.backend in CONTEXT_PARALLEL_BACKENDS and s.attention.backend not in RING_BACKENDS,
        "ring attention merges each K/V block's partial result by its log-sum-exp, which the native (SDPA) backend "
        "does not return (diffusers 0.42: 'Native attention does not support return_lse=True')",
        "Use attention.backend=native_flash (CPU or CUDA), native_cudnn, flash or sage with parallel=ring or unified",
        explain=lambda s: f"attention.backend={s.attention.backend.name}",
    ),
    Exclusion(
        "parallel with degrees that do not divide the model's heads or sequence",
        lambda s: parallel_split_problem(s) is not None,
        "diffusers splits the heads evenly over the Ulysses (tensor) ranks and the image and text sequences evenly "
        "over all context ranks (hooks/context_parallel: 'must be divisible by mesh size')",
        "Use degrees that divide them: 2 for model=tiny_flux (2 heads, 16 image tokens at 64x64)",
        explain=lambda s: parallel_split_problem(s) or "",
    ),
    Exclusion(
        "parallel with memory.offload or memory.layerwise_fp8",
        lambda s: _parallel(s) and (s.memory.offload is not Offload.none or s.memory.layerwise_fp8),
        "offload hooks move weights between CPU and GPU inside the call and layerwise casting wraps every layer in "
        "hooks; diffusers' parallel hooks expect each rank's weights in place on its device (tensor parallelism "
        "refuses accelerate's hooks itself); with N GPUs each rank holds its own copy, or its shard, anyway",
        "Use memory=none (or vae_slicing/vae_tiling) with parallel",
    ),
    Exclusion(
        "parallel with compile other than none",
        lambda s: _parallel(s) and s.compile.method is not CompileMethod.none,
        "not measured here: diffusers' context-parallel hooks call functional collectives inside the denoiser, "
        "which a traced or exported graph cannot hold and torch.compile was not run with on this machine "
        "(CPU, gloo); CUDA graphs (reduce_overhead) cannot capture gloo collectives",
        "Use compile=none with parallel",
    ),
    Exclusion(
        "parallel with cache other than none",
        lambda s: _parallel(s) and s.cache.method is not CacheMethod.none,
        "the cache hooks decide on each rank from that rank's shard (first_block and mag_cache from its part of "
        "the residual): ranks can decide differently, and one then waits in a collective the other skipped",
        "Use cache=none with parallel",
    ),
    Exclusion(
        "parallel with quant",
        lambda s: _parallel(s) and s.quant.method is not Quant.none,
        "tensor parallelism cannot shard torchao's packed weights (diffusers refuses a quantized model); "
        "context parallelism with quantized weights was not measured here",
        "Use quant=none with parallel",
    ),
    Exclusion(
        "parallel with run.repeats=auto",
        lambda s: _parallel(s) and s.run.repeats == "auto",
        "each rank would decide alone when its interval is narrow enough, and every rank must make the same calls "
        "(each is a collective)",
        "Give run.repeats a number (e.g. run.repeats=3) with parallel",
    ),
)


EXCLUSIONS: Tuple[Exclusion, ...] = (
    Exclusion(
        "attention.fuse_qkv=true with attention.processor other than sdpa",
        lambda s: s.attention.fuse_qkv and s.attention.processor is not AttentionProcessor.sdpa,
        "fused QKV projections run through diffusers' FusedAttnProcessor2_0, which is SDPA",
        "Use attention=sdpa_fused (or attention=sdpa attention.fuse_qkv=true)",
    ),
    Exclusion(
        "attention.sdpa_backend with attention.processor other than sdpa",
        lambda s: s.attention.sdpa_backend is not SdpaBackend.auto and s.attention.processor is not AttentionProcessor.sdpa,
        "the SDPA backend only picks the kernel of scaled_dot_product_attention",
        "Use attention=sdpa with it, or leave attention.sdpa_backend=auto",
    ),
    Exclusion(
        "attention.slice_size with attention.processor other than classic",
        lambda s: s.attention.slice_size is not None and s.attention.processor is not AttentionProcessor.classic,
        "attention slicing replaces every attention processor with SlicedAttnProcessor",
        "Use attention=sliced on its own",
    ),
    Exclusion(
        "compile=trace or export with a target other than the UNet",
        lambda s: _fixed_graph(s) and s.compile.targets != [CompileTarget.unet],
        "the fixed-shape graph recipes (trace, export) replace the UNet only",
        "Use compile=inductor for other modules",
    ),
    Exclusion(
        "attention.sdpa_backend=flash or cudnn with precision.dtype=fp32 (fp32, tf32)",
        lambda s: s.attention.sdpa_backend in (SdpaBackend.flash, SdpaBackend.cudnn) and s.precision.dtype is Dtype.fp32,
        "FlashAttention and cuDNN attention run fp16/bf16 only, so the fp32 UNet has no attention they can run",
        "Use precision=fp16 or bf16 with them, or attention.sdpa_backend=efficient in fp32",
    ),
    Exclusion(
        "attention.backend=native_flash, native_cudnn, flash, flash_3 or sage with precision.dtype=fp32 (fp32, tf32)",
        lambda s: _backend(s, *_HALF_ONLY_BACKENDS) and s.precision.dtype is Dtype.fp32,
        "those kernels run fp16/bf16 only, and diffusers checks a backend's dtypes only with DIFFUSERS_ATTN_CHECKS=1 "
        "(off by default), so the fp32 transformer's first attention call fails (\"No available kernel\")",
        "Use precision=bf16 or fp16 with them, or attention=dispatch_efficient or dispatch_native in fp32",
        cuda_only=True,
    ),
    Exclusion(
        "compile=export with attention.sdpa_backend other than auto",
        lambda s: s.compile.method is CompileMethod.export and s.attention.sdpa_backend is not SdpaBackend.auto,
        "AOTInductor picks the attention kernel when it compiles the exported graph, outside the "
        "processor's pin, so the row could not say which kernel ran",
        "Use compile=trace (the traced UNet replays under the pin) or attention.sdpa_backend=auto",
    ),
    Exclusion(
        "memory.offload=group with memory_format=channels_last",
        lambda s: s.memory.offload is Offload.group and s.memory_format.format is MemoryFormat.channels_last,
        "group offload copies the weights onto the GPU at each use, which drops their channels-last layout",
        "Use memory_format=contiguous with group offload, or memory=model_offload",
    ),
    Exclusion(
        "compile.regional=true with compile.method other than inductor",
        lambda s: s.compile.regional and s.compile.method is not CompileMethod.inductor,
        "regional compilation is torch.compile applied to repeated blocks",
        "Use compile=regional",
    ),
    Exclusion(
        "compile=trace or inductor with memory.offload",
        lambda s: s.compile.method is not CompileMethod.none and s.memory.offload is not Offload.none,
        "offload hooks move weights during the forward pass, which a traced or compiled graph does not see",
        "Use compile=none with offloading",
    ),
    Exclusion(
        "compile=trace or export with model family sdxl",
        lambda s: _fixed_graph(s) and s.model.family is ModelFamily.sdxl,
        "SDXL's UNet takes added conditioning (text_embeds, time_ids) that the 3-input graph does not carry",
        "Use compile=inductor or compile=regional for SDXL",
    ),
    Exclusion(
        "attention.fuse_qkv=true with quant",
        lambda s: s.attention.fuse_qkv and s.quant.method is not Quant.none,
        "diffusers' fuse_projections joins the q, k and v weights with torch.cat and copies them into a new plain "
        "Linear: torchao's Int8Tensor (int8wo, int8dq) has no aten.cat, and its Float8Tensor (fp8dq) joins but "
        "cannot be copied into a plain weight (torchao 0.18), so the build fails",
        "Use attention=sdpa (unfused projections) with quant, or quant=none with attention=sdpa_fused",
    ),
    Exclusion(
        "compile=trace with quant",
        lambda s: s.compile.method is CompileMethod.trace and s.quant.method is not Quant.none,
        "torchao's quantized tensor subclasses cannot be traced by torch.jit",
        "Use compile=inductor with quantization",
    ),
    Exclusion(
        "attention=xformers or sliced, attention.sdpa_backend, attention.fuse_qkv with a transformer family (flux, sd3)",
        lambda s: _transformer(s) and (s.attention.processor is AttentionProcessor.xformers or s.attention.fuse_qkv
                                       or s.attention.slice_size is not None
                                       or s.attention.sdpa_backend is not SdpaBackend.auto),
        "those options set the UNet's attention processors; a transformer keeps diffusers' own processors for it",
        "Use attention=classic or sdpa (both leave the transformer's own processors) with Flux and SD3",
    ),
    Exclusion(
        "compile=trace or export with a transformer family (flux, sd3)",
        lambda s: _fixed_graph(s) and _transformer(s),
        "the fixed-shape graph recipes replace a UNet called with (sample, timestep, encoder_hidden_states)",
        "Use compile=inductor or compile=regional for a transformer",
    ),
    Exclusion(
        "memory.layerwise_fp8=true with quant or compile=trace/export",
        lambda s: s.memory.layerwise_fp8 and (s.quant.method is not Quant.none or _fixed_graph(s)),
        "layerwise casting keeps float8 weights and casts them in hooks around each layer: quantized weights have "
        "their own storage, and a fixed graph would bake in one cast",
        "Use memory=layerwise_fp8 with quant=none and compile=none or inductor",
    ),
    Exclusion(
        "memory.layerwise_fp8=true with compile.mode=reduce_overhead or max_autotune (CUDA graphs)",
        lambda s: s.memory.layerwise_fp8 and _cuda_graphs(s),
        "layerwise casting's hooks call module.to() around every layer at every call, giving the weights new storage "
        "each time, while a CUDA graph replays with the addresses it recorded (static inputs): a re-record per call, "
        "or stale weights",
        "Use memory=layerwise_fp8 with compile=inductor (mode=default) or inductor_max_autotune_no_cudagraphs",
        cuda_only=True,
    ),
    Exclusion(
        "compile=regional with model family sd3",
        lambda s: s.compile.regional and s.model.family is ModelFamily.sd3,
        "SD3Transformer2DModel names no repeated blocks (_repeated_blocks) for compile_repeated_blocks in diffusers 0.42",
        "Use compile=inductor (the whole transformer) for SD3",
    ),
    Exclusion(
        "vae=tiny with a transformer family (flux, sd3)",
        lambda s: s.vae.kind is VaeKind.tiny and _transformer(s),
        "AutoencoderTiny here is TAESD, for 4-channel latents; Flux's and SD3's latents have 16 channels",
        "Use vae=full",
    ),
    Exclusion(
        "run.max_sequence_length with a family without a T5 encoder (sd15, sdxl)",
        lambda s: s.run.max_sequence_length is not None and s.model.family in (ModelFamily.sd15, ModelFamily.sdxl),
        "SD 1.x and SDXL read the prompt with CLIP alone, 77 tokens; their pipelines take no max_sequence_length",
        "Leave run.max_sequence_length unset with sd15 and sdxl (it is for flux and sd3)",
    ),
    Exclusion(
        "run.negative_prompt with a guidance-distilled family (flux)",
        lambda s: s.run.negative_prompt is not None and FAMILIES[s.model.family].guidance_distilled,
        "Flux is guidance-distilled: guidance_scale is an input embedding, there is no unconditional pass for a "
        "negative prompt to steer",
        "Leave run.negative_prompt unset with Flux",
    ),
    Exclusion(
        "cache=faster_cache with cache.timestep_high above 1000",
        lambda s: s.cache.method is CacheMethod.faster_cache and s.cache.timestep_high > 1000,
        "Flux's first step is at timestep 1000; inside the range diffusers' FasterCache skips attention from the "
        "first call on, before it has any output to extrapolate from (TypeError in diffusers 0.42)",
        "Keep cache.timestep_high <= 1000 with cache=faster_cache",
    ),
    Exclusion(
        "cache=deepcache with compile other than none",
        lambda s: s.cache.method is CacheMethod.deepcache and s.compile.method is not CompileMethod.none,
        "DeepCache decides in Python, step by step, which UNet blocks run; a traced, exported or compiled UNet "
        "would freeze one path (or recompile at every switch)",
        "Use compile=none with cache=deepcache",
    ),
    Exclusion(
        "cache=first_block, taylorseer, pab, faster_cache or mag_cache with compile.mode=reduce_overhead or "
        "max_autotune (CUDA graphs)",
        lambda s: s.cache.method in _HOOK_CACHES and _cuda_graphs(s),
        "diffusers' cache hooks keep tensors of one denoising step (e.g. first_block's head_block_residual) to read "
        "at the next, and each CUDA-graph replay starts a new cudagraph-trees generation that overwrites the "
        "previous call's outputs: the second step reads freed memory",
        "Use compile=inductor_max_autotune_no_cudagraphs (or compile=inductor, mode=default) with a step cache",
        cuda_only=True,
    ),
    Exclusion(
        "compile=regional with compile.mode=reduce_overhead or max_autotune (CUDA graphs)",
        lambda s: s.compile.regional and _cuda_graphs(s),
        "compile_repeated_blocks compiles each block as its own graph, and block i's CUDA-graph output (overwritten "
        "at the next replay) is block i+1's input (PyTorch issue 160281)",
        "Use compile=regional with compile.mode=default or max_autotune_no_cudagraphs, or "
        "compile=inductor_reduce_overhead (the whole denoiser in one graph)",
        cuda_only=True,
    ),
    Exclusion(
        "cache=tome with compile=trace or export",
        lambda s: s.cache.method is CacheMethod.tome and _fixed_graph(s),
        "ToMe chooses which tokens to merge from the activations at every call; a fixed graph would replay one choice",
        "Use compile=none or inductor with cache=tome",
    ),
    Exclusion(
        "vae=tiny with a pretrained model and no vae.path",
        lambda s: s.vae.kind is VaeKind.tiny and s.model.source is ModelSource.pretrained and not s.vae.path,
        "a real model needs real AutoencoderTiny weights (madebyollin/taesd, or taesdxl for SDXL)",
        "Set vae.path=/path/to/taesd (a local folder or a hub id in the HF cache)",
    ),
    Exclusion(
        "lora=fused with quant",
        lambda s: _lora(s, LoraMode.fused) and s.quant.method is not Quant.none,
        "torchao's quantized weights are tensor subclasses that fuse_lora cannot add a LoRA delta into",
        "Use quant=none with lora=fused",
    ),
    Exclusion(
        "lora=unfused or hotswap with attention.fuse_qkv=true",
        lambda s: _lora(s, LoraMode.unfused, LoraMode.hotswap) and s.attention.fuse_qkv,
        "fusing the QKV projections concatenates the base weights of to_q/to_k/to_v, leaving their live LoRA "
        "layers out",
        "Use lora=fused with attention.fuse_qkv=true (the adapters are merged first), or attention=sdpa",
    ),
    Exclusion(
        "lora=hotswap with compile=trace or export",
        lambda s: _lora(s, LoraMode.hotswap) and _fixed_graph(s),
        "a traced or exported graph holds the adapter's weights as constants: a swapped adapter never reaches it",
        "Use compile=inductor (hotswap is prepared for it) or compile=none",
    ),
    Exclusion(
        "lora=hotswap with an adapter scale other than 1",
        lambda s: _lora(s, LoraMode.hotswap) and any(a.scale != 1.0 for a in s.lora.adapters),
        "setting a scale (set_adapters) replaces the scaling tensors hotswap prepared with Python floats, which "
        "the compiled graph guards on: the next swap recompiles",
        "Keep lora.adapters[*].scale=1.0 with lora=hotswap (bake a scale into the adapter's alpha), or use "
        "lora=unfused",
    ),
)
EXCLUSIONS += _PARALLEL_EXCLUSIONS


def requirement_needs(req: Requirement) -> str:
    """One human line of what a requirement needs, shared by the error and the docs."""
    needs = []
    if req.cuda:
        needs.append("CUDA")
    if req.min_capability:
        needs.append("compute capability >= %d.%d" % req.min_capability)
    if req.package:
        needs.append(f"the `{req.package}` package" + (f" >= {req.package_version}" if req.package_version else ""))
    if req.diffusers:
        needs.append(f"diffusers >= {req.diffusers}")
    if req.families:
        needs.append("model family " + "/".join(f.name for f in req.families))
    if req.c_compiler_on_cpu:
        needs.append("a C++ compiler on CPU")
    if req.triton_on_cuda:
        needs.append("on CUDA a C compiler and the Python headers (Triton)")
    if req.cxx_on_cuda:
        needs.append("on CUDA a C++ compiler (AOTInductor)")
    if req.cuda_toolkit_on_cuda:
        needs.append("on CUDA a CUDA toolkit (CUDA_HOME, nvcc)")
    if req.ranks_fit:
        needs.append("one GPU per rank on CUDA, one CPU core per rank on CPU")
    return ", ".join(needs)


def option_rows() -> list[tuple[str, str, str]]:
    """(group=option, description, needs) for every YAML option, needs evaluated on its composed spec."""
    from pathlib import Path

    from .config import compose, config_dir
    from .spec import GROUPS

    rows = []
    for group in GROUPS:
        for path in sorted(Path(config_dir(), group).glob("*.yaml")):
            comment = " ".join(line.lstrip("# ").strip() for line in path.read_text().splitlines()
                               if line.startswith("#") and "@package" not in line)
            spec = compose([f"{group}={path.stem}"])
            # the option's own group's needs (the defaults of the others, e.g. the scheduler's family, are not its)
            needs = "; ".join(requirement_needs(r) for r in REQUIREMENTS if r.group == group and r.applies(spec)) \
                or "nothing (runs on CPU)"
            rows.append((f"{group}={path.stem}", comment, needs))
    return rows


def options_table() -> str:
    """The option table of docs/options.md: what each option does and costs (its YAML comment), what it needs."""
    lines = ["| option | what it does, what it costs | needs |", "|---|---|---|"]
    lines += [f"| `{opt}` | {desc} | {needs} |" for opt, desc, needs in option_rows()]
    return "\n".join(lines)


def markdown_tables() -> str:
    """The 'what needs what' section of docs/options.md, generated from the tables above."""
    lines = ["| option | needs | otherwise |", "|---|---|---|"]
    lines += [f"| `{r.option}` | {requirement_needs(r)} | {r.instead} |" for r in REQUIREMENTS]
    lines += ["", "| combination | why not | instead |", "|---|---|---|"]
    lines += [f"| `{e.combination}` | {e.why} | {e.instead} |" for e in EXCLUSIONS]
    return "\n".join(lines)


BEGIN = "<!-- generated by `python -m sdbuild.capabilities --update docs/options.md`: begin -->"
END = "<!-- generated: end -->"


def generated_docs() -> str:
    return f"{options_table()}\n\n### What needs what\n\n{markdown_tables()}"


def update_docs(path: str = "docs/options.md") -> None:
    """Replace the generated block of `path` (docs/options.md) with the tables as the code has them now."""
    from pathlib import Path

    text = Path(path).read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no generated block ({BEGIN} ... {END}): the option tables live in "
                         "docs/options.md (python -m sdbuild.capabilities --update docs/options.md)")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    Path(path).write_text(f"{head}{BEGIN}\n{generated_docs()}\n{END}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:
        update_docs(*sys.argv[2:3])
    else:
        print(generated_docs())
