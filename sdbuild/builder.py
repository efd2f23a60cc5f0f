"""Spec in, optimized diffusers pipeline out: one small function per axis, applied in order.

The order is fixed and each step only does what its config group says:

1. ``set_global_switches``  TF32 / cuDNN flags and compiler caches, set explicitly every build
2. ``load``                 the family's pipeline class (sdbuild/families), weights loaded
                            directly in the precision's dtype (and quantized); SDXL's VAE kept
                            in fp32 under fp16 (``upcast_sdxl_vae``)
3. ``apply_attention``      attention processor, fused QKV, slicing, SDPA kernel pin (UNets);
                            the transformer families' own processors, recorded
4. ``apply_memory_format``  channels-last conv weights
5. ``apply_vae_memory``     VAE slicing / tiling; the denoiser's weights stored in fp8
                            (``apply_layerwise_casting``, sdbuild/levers/layerwise.py)
6. ``place``                moved to the device, or offloaded (``memory`` group): after every
                            change to the modules, which offload hooks would otherwise undo
7. ``apply_cache``          step caching: diffusers' hooks on a transformer, DeepCache or ToMe
                            on a UNet (sdbuild/levers/cache.py)
8. ``apply_compile``        torch.jit.trace or torch.export (AOTInductor) of the UNet, or
                            torch.compile of the chosen modules

Later steps see what earlier ones did: tracing records the final attention processors and
memory format, exactly as in diffusers' guide, where the UNet is traced last.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .families import denoiser, family_of
from .levers.attention import transformer_attention
from .levers.cache import apply_cache
from .levers.layerwise import apply_layerwise_casting
from .models import ensure_model, local_folder
from .quiet import quiet_imports
from .spec import (
    AttentionProcessor,
    CompileMethod,
    CompileTarget,
    Dtype,
    MemoryFormat,
    ModelFamily,
    Offload,
    Quant,
    SchedulerKind,
    SdpaBackend,
    Spec,
    VaeKind,
)
from .errors import SpecError, problem
from .validate import validate

log = logging.getLogger(__name__)
quiet_imports()


@dataclass
class BuildInfo:
    """What the builder did and how long it took, recorded beside the measurements."""

    device: str
    load_s: float = 0.0
    build_s: float = 0.0  # everything after loading, including tracing (not lazy torch.compile)
    attention_kernel: Dict[str, Any] = field(default_factory=dict)  # what attention runs, per module
    notes: List[str] = field(default_factory=list)  # decisions the user should see (row: build_notes)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def build(spec: Spec) -> Any:
    """Validate `spec` against this machine and return the optimized pipeline."""
    return build_pipeline(spec)[0]


def build_pipeline(spec: Spec, device: str | None = None, reuse_weights: bool = False):
    """Like `build`, also returning `BuildInfo` (device, load and build time, attention, notes).

    `reuse_weights` (sweeps): keep the last freshly loaded pipeline in memory and hand out deep
    copies of it, so a sweep reads a model's weights from disk once per dtype, and every job still
    starts from an untouched pipeline.
    """
    device = device or validate(spec)
    info = BuildInfo(device=device)
    set_global_switches(spec)
    start = time.perf_counter()
    pipe = load_reusing(spec) if reuse_weights else load(spec)
    info.notes += upcast_sdxl_vae(pipe, spec)
    info.load_s = time.perf_counter() - start
    start = time.perf_counter()
    for step in BUILD_STEPS:
        step(pipe, spec, device, info)
    info.build_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)  # measurement shows its own progress
    return pipe, info


def _attention_step(pipe, spec: Spec, device: str, info: BuildInfo) -> None:
    info.attention_kernel = apply_attention(pipe, spec)
    info.notes += [f"attention: {name} not pinned to {spec.attention.sdpa_backend.name} ({why})"
                   for name, why in info.attention_kernel.get("unpinned", {}).items()]
    if info.attention_kernel.get("xformers_kernels_loaded") is False:
        info.notes.append("attention=xformers: xformers' own compiled kernels did not load (built for another "
                          f"torch); its ops run {info.attention_kernel.get('xformers_op')} instead")


def _cache_step(pipe, spec: Spec, device: str, info: BuildInfo) -> None:
    apply_cache(pipe, spec)


def _compile_step(pipe, spec: Spec, device: str, info: BuildInfo) -> None:
    info.notes += apply_compile(pipe, spec, device, info.attention_kernel)


# The order the loaded pipeline is changed in. Offload (`place`) comes after every change to the
# modules (fused QKV needs real weights, not sequential offload's `meta` ones; channels-last must
# be in place before offload copies the weights), and before the compile step, which traces or
# exports on the device. The cache hooks go on the placed model (as in diffusers' guides), before
# torch.compile wraps it.
BUILD_STEPS = (
    _attention_step,
    lambda pipe, spec, device, info: apply_memory_format(pipe, spec),
    lambda pipe, spec, device, info: apply_vae_memory(pipe, spec),
    lambda pipe, spec, device, info: apply_layerwise_casting(pipe, spec),
    lambda pipe, spec, device, info: place(pipe, spec, device),
    _cache_step,
    _compile_step,
)


# 1. Global switches ----------------------------------------------------------------------------


def set_global_switches(spec: Spec) -> None:
    """Set every process-wide flag the spec depends on, so nothing leaks in from an earlier build."""
    # Compiler caches first: TorchDynamo and Inductor are imported by what follows (and read their
    # environment once, at import); where they are already imported, their config is set directly.
    set_inductor_caches(spec.compile.cache_dir)
    set_numeric_flags(spec)
    torch.compiler.reset()  # drop dynamo caches and compiled graphs of earlier builds


def set_numeric_flags(spec: Spec) -> None:
    """The spec's TF32 and cuDNN flags alone: what must be set again before each call when several
    built pipelines take turns in one process (sdbuild.interleave), without dropping compiled graphs."""
    tf32 = spec.precision.tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = False


_INDUCTOR_ENV_AT_START = {name: os.environ.get(name) for name in
                          ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")}
_CACHE_CONFIG_AT_START: Dict[str, bool] = {}  # Inductor's cache switches as this process had them


def set_inductor_caches(cache_dir: Optional[str]) -> None:
    """Inductor's persistent caches (FX graph + AOTAutograd) for warm starts across processes: in
    `cache_dir`, or as the process started (an earlier job's folder must not stick).

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
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(os.path.expanduser(cache_dir))
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    if "torch._inductor.config" in sys.modules:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        if not _CACHE_CONFIG_AT_START:
            _CACHE_CONFIG_AT_START.update(fx=inductor_config.fx_graph_cache, aot=functorch_config.enable_autograd_cache)
        inductor_config.fx_graph_cache = True if cache_dir else _CACHE_CONFIG_AT_START["fx"]
        functorch_config.enable_autograd_cache = True if cache_dir else _CACHE_CONFIG_AT_START["aot"]


def global_switches() -> Dict[str, Any]:
    """The flags in force, as recorded in result.json."""
    return {
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }


# 2. Load ---------------------------------------------------------------------------------------


def pipeline_class(spec: Spec):
    return family_of(spec).pipeline_class()


def scheduler_from(spec: Spec, config: Any):
    """The scheduler group: a scheduler class built from the model's own scheduler config."""
    import diffusers

    cls = getattr(diffusers, spec.scheduler.kind.value)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if spec.scheduler.kind is SchedulerKind.dpmpp_2m else {}
    return cls.from_config(config, **extra)


def quantization_config(spec: Spec):
    """diffusers' own torchao integration, applied to the denoiser (UNet or transformer) while it loads."""
    if spec.quant.method is Quant.none:
        return None
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    ao_config = {
        Quant.int8wo: Int8WeightOnlyConfig,
        Quant.int8dq: Int8DynamicActivationInt8WeightConfig,
        Quant.fp8dq: Float8DynamicActivationFloat8WeightConfig,
    }[spec.quant.method]()
    return PipelineQuantizationConfig(quant_mapping={family_of(spec).denoiser: TorchAoConfig(ao_config)})


def dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (and warns on the old name); older ones know only `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load(spec: Spec):
    """Load weights straight into the target dtype (no fp32 copy first), safetensors only."""
    folder = ensure_model(spec.model, spec.cache_dir)
    dtype = torch_dtype(spec.precision.dtype.value)
    kwargs: Dict[str, Any] = {dtype_keyword(): dtype, "use_safetensors": True, "local_files_only": True}
    kwargs.update(family_of(spec).load_kwargs)
    if (quant := quantization_config(spec)) is not None:
        kwargs["quantization_config"] = quant
    pipe = pipeline_class(spec).from_pretrained(folder, **kwargs)
    pipe.scheduler = scheduler_from(spec, pipe.scheduler.config)
    if spec.vae.kind is VaeKind.tiny:
        pipe.vae = tiny_autoencoder(spec, dtype)
    if spec.precision.vae_dtype is not None:
        run_vae_in(pipe, torch_dtype(spec.precision.vae_dtype.value))
    return pipe


_LOADED: Dict[tuple, Any] = {}  # load key -> pristine pipeline on the CPU (one entry: bounded memory)


def load_key(spec: Spec) -> tuple:
    """Everything `load` depends on."""
    return (spec.model.source, spec.model.family, spec.model.path, spec.cache_dir, spec.precision.dtype,
            spec.precision.vae_dtype, spec.vae.kind, spec.vae.path, spec.scheduler.kind)


def load_reusing(spec: Spec):
    """`load`, from memory when the previous job loaded the same thing. Quantized weights are
    always loaded afresh (torchao tensor subclasses are not safely deep-copyable)."""
    import copy

    if spec.quant.method is not Quant.none:
        return load(spec)
    key = load_key(spec)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load(spec)
    return copy.deepcopy(_LOADED[key])


def tiny_autoencoder(spec: Spec, dtype: torch.dtype):
    """AutoencoderTiny (TAESD): from `vae.path`, or random weights with TAESD's layout."""
    from diffusers import AutoencoderTiny

    if spec.vae.path:
        return AutoencoderTiny.from_pretrained(str(local_folder(spec.vae.path)), use_safetensors=True,
                                               local_files_only=True, **{dtype_keyword(): dtype})
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(3)
        return AutoencoderTiny().to(dtype)
    finally:
        torch.random.set_rng_state(state)


def run_vae_in(pipe, dtype: torch.dtype) -> None:
    """Keep the VAE in `dtype` while the UNet runs lower; latents are cast on their way in."""
    pipe.vae.to(dtype)

    def cast_input(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    first = pipe.vae.post_quant_conv if getattr(pipe.vae, "post_quant_conv", None) is not None else pipe.vae.decoder
    first.register_forward_pre_hook(cast_input)


def upcast_sdxl_vae(pipe, spec: Spec) -> List[str]:
    """SDXL's VAE overflows in fp16, so diffusers casts it to fp32 and back inside every call
    (`force_upcast`), which also re-records CUDA graphs each call. Under precision=fp16 with no
    VAE dtype chosen, sdbuild keeps the VAE in fp32 once, at build time, and says so."""
    if (spec.model.family is ModelFamily.sdxl and spec.precision.dtype is Dtype.fp16
            and spec.precision.vae_dtype is None and spec.vae.kind is VaeKind.full
            and getattr(pipe.vae.config, "force_upcast", False)):
        run_vae_in(pipe, torch.float32)
        return ["VAE kept in float32: SDXL's VAE overflows in fp16, and diffusers would otherwise upcast it "
                "inside every call (force_upcast). Set precision.vae_dtype to choose otherwise"]
    return []


# 3. Device / offload ---------------------------------------------------------------------------


def place(pipe, spec: Spec, device: str) -> None:
    """Move the pipeline to the device, or install diffusers' offload hooks instead."""
    offload = spec.memory.offload
    if offload is Offload.none:
        pipe.to(device)
    elif offload is Offload.model:
        pipe.enable_model_cpu_offload(device=device)
    elif offload is Offload.sequential:
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload is Offload.group:
        pipe.enable_group_offload(
            onload_device=torch.device(device), offload_type="leaf_level", use_stream=True
        )


# 4. Attention ----------------------------------------------------------------------------------

# Largest head dim each pinnable SDPA kernel takes on CUDA (PyTorch's sdp_utils checks: FlashAttention-2
# up to 256; cuDNN's fused attention is held to 128 here, the limit of the cuDNN 9 releases PyTorch
# ships with on pre-Blackwell cards). Math and memory-efficient take any head dim. The GPU proof's
# preflight prints the kernel x head-dim x dtype matrix of the card it runs on.
MAX_HEAD_DIM = {SdpaBackend.flash: 256, SdpaBackend.cudnn: 128}


def head_dim(attn) -> int:
    """Per-head width of a diffusers `Attention` module (the VAE's mid-block: one head of 512)."""
    return attn.inner_dim // attn.heads


# FlashAttention and cuDNN run fp16/bf16 only; math and memory-efficient also fp32.
HALF_ONLY = (SdpaBackend.flash, SdpaBackend.cudnn)


def kernel_takes(backend: SdpaBackend, dim: int, dtype: torch.dtype) -> Optional[str]:
    """Why the pinned kernel `backend` cannot run attention with heads of width `dim` in `dtype`
    (None: it can)."""
    if dim > MAX_HEAD_DIM.get(backend, dim):
        return f"head dim {dim} > {MAX_HEAD_DIM[backend]}, the most {backend.name} takes"
    if backend in HALF_ONLY and dtype not in (torch.float16, torch.bfloat16):
        return f"{backend.name} does not run {str(dtype).replace('torch.', '')}"
    return None


def _pinned_class(base: type, backend: SdpaBackend) -> type:
    """`base` (AttnProcessor2_0 or FusedAttnProcessor2_0) running its SDPA call under
    `sdpa_kernel(backend)`: the same processor, with PyTorch allowed only that kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = getattr(SDPBackend, backend.value)

    class KernelPinned(base):
        sdpa_backend = backend

        def __call__(self, *args, **kwargs):
            with sdpa_kernel(pinned):
                return super().__call__(*args, **kwargs)

    KernelPinned.__name__ = KernelPinned.__qualname__ = "KernelPinned" + base.__name__.replace("2_0", "")
    return KernelPinned


def kernel_pinned_processor(backend: SdpaBackend, fused: bool = False):
    """An SDPA processor (fused QKV or not) pinned to `backend`."""
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    return _pinned_class(FusedAttnProcessor2_0 if fused else AttnProcessor2_0, backend)()


def attention_modules(module):
    """The diffusers `Attention` blocks of `module`, by name."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in module.named_modules() if isinstance(m, Attention)]


def pin_sdpa(module, backend: SdpaBackend, fused: bool) -> list[str]:
    """Pin every attention block of `module` that the kernel can run; the others keep PyTorch's
    own choice. Returns why blocks were left unpinned (empty: the whole module is pinned)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    pinned = kernel_pinned_processor(backend, fused)
    plain = FusedAttnProcessor2_0() if fused else AttnProcessor2_0()
    left = set()
    for _, attn in attention_modules(module):
        why = kernel_takes(backend, head_dim(attn), attn.to_out[0].weight.dtype)
        attn.set_processor(plain if why else pinned)
        if why:
            left.add(why)
    return sorted(left)


def _fuse_qkv(pipe) -> list[str]:
    """diffusers' fused QKV projections on the UNet, and on the VAE where it has them (AutoencoderKL;
    AutoencoderTiny has no attention to fuse)."""
    from diffusers import AutoencoderKL

    fuse_vae = isinstance(pipe.vae, AutoencoderKL)
    pipe.fuse_qkv_projections(unet=True, vae=fuse_vae)
    return ["unet", "vae"] if fuse_vae else ["unet"]


def apply_attention(pipe, spec: Spec) -> Dict[str, Any]:
    """Set the attention implementation of the UNet and the VAE (the text encoder is transformers').

    Returns what the pipeline will run, recorded in the row as `attention_kernel`: a pinned SDPA
    kernel is pinned only on the attention blocks that kernel can run (the UNet; the VAE's
    512-wide head is beyond FlashAttention and cuDNN), and the record names every module left
    to PyTorch's choice, so a row never claims a kernel that did not run.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if family_of(spec).transformer:
        return transformer_attention(pipe, spec)
    att = spec.attention
    modules = {name: m for name, m in (("unet", pipe.unet), ("vae", pipe.vae)) if hasattr(m, "set_attn_processor")}
    record: Dict[str, Any] = {"processor": att.processor.name, "requested": att.sdpa_backend.name,
                              "fused_qkv": att.fuse_qkv, "pinned_modules": [], "unpinned": {}}
    if att.processor is AttentionProcessor.classic:
        for m in modules.values():
            m.set_attn_processor(AttnProcessor())
    elif att.processor is AttentionProcessor.sdpa:
        for m in modules.values():
            m.set_attn_processor(AttnProcessor2_0())
    elif att.processor is AttentionProcessor.xformers:
        pipe.enable_xformers_memory_efficient_attention()
        record.update(xformers_kernels())
    if att.slice_size is not None:
        size = int(att.slice_size) if str(att.slice_size).isdigit() else att.slice_size
        pipe.enable_attention_slicing(size)
    if att.fuse_qkv:
        record["fused_modules"] = _fuse_qkv(pipe)  # installs FusedAttnProcessor2_0, unpinned
    if att.processor is AttentionProcessor.sdpa and att.sdpa_backend is not SdpaBackend.auto:
        # Pinned last, over whichever SDPA processor (plain or fused) each module now has.
        for name, m in modules.items():
            if not attention_modules(m):
                continue
            left = pin_sdpa(m, att.sdpa_backend, fused=name in record.get("fused_modules", []))
            if left:
                record["unpinned"][name] = "; ".join(left) + ": PyTorch picks the kernel there"
            else:
                record["pinned_modules"].append(name)
    return record


def xformers_kernels() -> Dict[str, Any]:
    """Whether xformers' own compiled kernels loaded, and which forward op it picks for an SD 1.5
    UNet attention shape: a wheel built for another torch falls back to PyTorch's kernels under
    the xformers name, and the row must say so."""
    import xformers

    loaded = bool(getattr(xformers, "_has_cpp_library", False))
    out: Dict[str, Any] = {"xformers_kernels_loaded": loaded, "xformers_op": None}
    try:
        import xformers.ops.fmha as fmha

        q = torch.empty(2, 4096, 8, 40, device="cuda", dtype=torch.float16)
        op = fmha._dispatch_fw(fmha.Inputs(query=q, key=q, value=q), False)
        out["xformers_op"] = getattr(op, "NAME", type(op).__name__)
    except Exception as exc:  # the row still records that the probe could not tell
        out["xformers_op"] = f"unknown ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return out


# 5. Memory format ------------------------------------------------------------------------------


def apply_memory_format(pipe, spec: Spec) -> None:
    """channels-last: NHWC conv weights in the denoiser and VAE (activations follow; a transformer's
    only conv-like weights are its patch embedding's, if any)."""
    if spec.memory_format.format is MemoryFormat.channels_last:
        denoiser(pipe).to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


# 6. VAE memory ---------------------------------------------------------------------------------


def apply_vae_memory(pipe, spec: Spec) -> None:
    """The VAE's own slicing (one image at a time) and tiling (overlapping tiles) switches."""
    if spec.memory.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.memory.vae_tiling:
        pipe.vae.enable_tiling()


# 7. Compile ------------------------------------------------------------------------------------


def apply_compile(pipe, spec: Spec, device: str, attention: Optional[Dict[str, Any]] = None) -> List[str]:
    """Trace, export or torch.compile as the compile group says; returns build notes."""
    method = spec.compile.method
    notes: List[str] = []
    if method is CompileMethod.trace:
        backend = _graph_sdpa_pin(spec, attention or {})
        log.info("compile=trace: tracing the UNet with torch.jit.trace (seconds to a minute)")
        trace_unet(pipe, spec, device, backend)
        if backend is not None:
            notes.append(f"compile=trace: the traced UNet replays under sdpa_kernel({backend.name})")
    elif method is CompileMethod.export:
        log.info("compile=export: torch.export + AOTInductor compiles the UNet ahead of time now "
                 "(about 1 min for the tiny model on CPU, several minutes for SD 1.5 on a GPU)")
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


def unet_example_inputs(pipe, spec: Spec, device: str):
    """UNet inputs of the shape the pipeline will call it with (classifier-free guidance doubles the batch)."""
    from .run_inputs import image_size

    height, width = image_size(spec)
    cfg = 2 if spec.run.guidance_scale > 1 else 1
    batch = spec.run.batch_size * cfg
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    dtype = unet.dtype
    sample = torch.randn(batch, unet.config.in_channels, height // scale, width // scale, dtype=dtype, device=device)
    if spec.memory_format.format is MemoryFormat.channels_last:
        sample = sample.to(memory_format=torch.channels_last)
    pipe.scheduler.set_timesteps(spec.run.steps, device=device)
    timestep = pipe.scheduler.timesteps[0]  # a 0-d tensor of the scheduler's dtype, as the pipeline passes it
    seq_len = pipe.tokenizer.model_max_length
    hidden = torch.randn(batch, seq_len, unet.config.cross_attention_dim, dtype=dtype, device=device)
    return sample, timestep, hidden


class GraphUNet(torch.nn.Module):
    """Stands in for the UNet with a fixed-shape graph (traced or AOT-compiled): same config,
    dtype and device, called by the pipeline exactly like UNet2DConditionModel. Options such a
    graph cannot take (timestep_cond, added_cond_kwargs, cross_attention_kwargs) are refused.
    """

    def __init__(self, graph, unet, kind: str, sdpa_backend: Optional[SdpaBackend] = None) -> None:
        super().__init__()
        self.graph = graph  # a torch.jit.ScriptModule (trace) or an AOTInductor runner (export)
        self.kind = kind
        self.sdpa_backend = sdpa_backend  # the kernel the graph's attention is pinned to when it replays
        self.config = unet.config
        self._dtype, self._device = unet.dtype, unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict: bool = True, **unused):
        if timestep_cond is not None or cross_attention_kwargs or added_cond_kwargs:
            raise ValueError(f"compile={self.kind}: the UNet graph takes only (sample, timestep, encoder_hidden_states)")
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if self.sdpa_backend is None:
            out = self.graph(sample, timestep, encoder_hidden_states)[0]
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, self.sdpa_backend.value)):
                out = self.graph(sample, timestep, encoder_hidden_states)[0]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class _UNetForGraph(torch.nn.Module):
    """The UNet as a function of three tensors, returning a tuple: what trace and export capture."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)


def trace_unet(pipe, spec: Spec, device: str, sdpa_backend: Optional[SdpaBackend] = None) -> None:
    """The seed's recipe: torch.jit.trace the UNet with example inputs of the run's shape."""
    example = unet_example_inputs(pipe, spec, device)
    # TracerWarnings say the graph is fixed to these shapes: that is the recipe (and why the
    # example inputs take the run's shape), not a problem to show the user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(_UNetForGraph(pipe.unet).eval(), example, check_trace=False)
    pipe.unet = GraphUNet(traced, pipe.unet, "trace", sdpa_backend)


def export_unet(pipe, spec: Spec, device: str) -> None:
    """torch.export the UNet, compile it ahead of time with AOTInductor into a .pt2 package, load it."""
    import tempfile

    from torch._inductor import aoti_compile_and_package, aoti_load_package

    example = unet_example_inputs(pipe, spec, device)
    with torch.no_grad():
        exported = torch.export.export(_UNetForGraph(pipe.unet).eval(), example)
    folder = Path(spec.compile.cache_dir).expanduser() if spec.compile.cache_dir else Path(tempfile.mkdtemp(prefix="sdbuild-aoti-"))
    folder.mkdir(parents=True, exist_ok=True)
    package = aoti_compile_and_package(exported, package_path=str(folder / "unet.pt2"))
    pipe.unet = GraphUNet(aoti_load_package(package), pipe.unet, "export")
