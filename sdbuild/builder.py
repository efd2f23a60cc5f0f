"""Spec in, optimized diffusers pipeline out: one small function per axis, applied in order.

The order is fixed and each step only does what its config group says:

1. ``set_global_switches``  TF32 / cuDNN flags and compiler caches, set explicitly every build
2. ``load``                 weights loaded directly in the precision's dtype (and quantized)
3. ``place``                moved to the device, or offloaded (``memory`` group)
4. ``apply_attention``      attention processor, SDPA kernel, fused QKV, slicing
5. ``apply_memory_format``  channels-last conv weights
6. ``apply_vae_memory``     VAE slicing / tiling
7. ``apply_compile``        torch.jit.trace or torch.export (AOTInductor) of the UNet, or
                            torch.compile of the chosen modules

Later steps see what earlier ones did: tracing records the final attention processors and
memory format, exactly as in diffusers' guide, where the UNet is traced last.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch

from .models import ensure_model, local_folder
from .quiet import quiet_imports
from .spec import (
    AttentionProcessor,
    CompileMethod,
    CompileTarget,
    MemoryFormat,
    ModelFamily,
    Offload,
    Quant,
    SdpaBackend,
    Spec,
    VaeKind,
)
from .validate import validate

log = logging.getLogger(__name__)
quiet_imports()


@dataclass
class BuildInfo:
    """What the builder did and how long it took, recorded beside the measurements."""

    device: str
    load_s: float = 0.0
    build_s: float = 0.0  # everything after loading, including tracing (not lazy torch.compile)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def build(spec: Spec) -> Any:
    """Validate `spec` against this machine and return the optimized pipeline."""
    return build_pipeline(spec)[0]


def build_pipeline(spec: Spec, device: str | None = None, reuse_weights: bool = False):
    """Like `build`, also returning `BuildInfo` (device, load and build time).

    `reuse_weights` (sweeps): keep the last freshly loaded pipeline in memory and hand out deep
    copies of it, so a sweep reads a model's weights from disk once per dtype, and every job still
    starts from an untouched pipeline.
    """
    device = device or validate(spec)
    info = BuildInfo(device=device)
    set_global_switches(spec)
    start = time.perf_counter()
    pipe = load_reusing(spec) if reuse_weights else load(spec)
    info.load_s = time.perf_counter() - start
    start = time.perf_counter()
    place(pipe, spec, device)
    apply_attention(pipe, spec)
    apply_memory_format(pipe, spec)
    apply_vae_memory(pipe, spec)
    apply_compile(pipe, spec, device)
    info.build_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)  # measurement shows its own progress
    return pipe, info


# 1. Global switches ----------------------------------------------------------------------------


def set_global_switches(spec: Spec) -> None:
    """Set every process-wide flag the spec depends on, so nothing leaks in from an earlier build."""
    tf32 = spec.precision.tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = False
    torch.compiler.reset()  # drop dynamo caches and compiled graphs of earlier builds
    # Inductor's persistent caches (FX graph + AOTAutograd) for warm starts across processes: in
    # the spec's folder, or as the process started (an earlier job's folder must not stick).
    for name, value in _INDUCTOR_ENV_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if spec.compile.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(os.path.expanduser(spec.compile.cache_dir))
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"


_INDUCTOR_ENV_AT_START = {name: os.environ.get(name) for name in
                          ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")}


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
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if spec.model.family is ModelFamily.sdxl else StableDiffusionPipeline


def scheduler_from(spec: Spec, config: Any):
    """The scheduler group: a scheduler class built from the model's own scheduler config."""
    import diffusers

    cls = getattr(diffusers, spec.scheduler.kind.value)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if spec.scheduler.name == "dpmpp_2m" else {}
    return cls.from_config(config, **extra)


def quantization_config(spec: Spec):
    """diffusers' own torchao integration, applied to the UNet while it loads."""
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
    return PipelineQuantizationConfig(quant_mapping={"unet": TorchAoConfig(ao_config)})


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
    if spec.model.family is ModelFamily.sd15:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
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


def kernel_pinned_processor(backend: SdpaBackend):
    """AttnProcessor2_0 that runs scaled_dot_product_attention under `sdpa_kernel(backend)`."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = getattr(SDPBackend, backend.value)

    class KernelPinnedAttnProcessor(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            with sdpa_kernel(pinned):
                return super().__call__(*args, **kwargs)

    return KernelPinnedAttnProcessor()


def apply_attention(pipe, spec: Spec) -> None:
    """Set the attention implementation of the UNet and the VAE (the text encoder is transformers')."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    att = spec.attention
    modules = [m for m in (pipe.unet, pipe.vae) if hasattr(m, "set_attn_processor")]
    if att.processor is AttentionProcessor.classic:
        for m in modules:
            m.set_attn_processor(AttnProcessor())
    elif att.processor is AttentionProcessor.sdpa:
        pinned = att.sdpa_backend is not SdpaBackend.auto
        for m in modules:
            m.set_attn_processor(kernel_pinned_processor(att.sdpa_backend) if pinned else AttnProcessor2_0())
    elif att.processor is AttentionProcessor.xformers:
        pipe.enable_xformers_memory_efficient_attention()
    if att.slice_size is not None:
        size = int(att.slice_size) if str(att.slice_size).isdigit() else att.slice_size
        pipe.enable_attention_slicing(size)
    if att.fuse_qkv:
        pipe.fuse_qkv_projections()


# 5. Memory format ------------------------------------------------------------------------------


def apply_memory_format(pipe, spec: Spec) -> None:
    """channels-last: NHWC conv weights in the UNet and VAE (activations follow)."""
    if spec.memory_format.format is MemoryFormat.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)


# 6. VAE memory ---------------------------------------------------------------------------------


def apply_vae_memory(pipe, spec: Spec) -> None:
    """The VAE's own slicing (one image at a time) and tiling (overlapping tiles) switches."""
    if spec.memory.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.memory.vae_tiling:
        pipe.vae.enable_tiling()


# 7. Compile ------------------------------------------------------------------------------------


def apply_compile(pipe, spec: Spec, device: str) -> None:
    method = spec.compile.method
    if method is CompileMethod.trace:
        trace_unet(pipe, spec, device)
    elif method is CompileMethod.export:
        export_unet(pipe, spec, device)
    elif method is CompileMethod.inductor:
        compile_modules(pipe, spec)


def compile_modules(pipe, spec: Spec) -> None:
    """torch.compile in place (`module.compile`), so the pipeline keeps its module classes.

    Compilation itself happens lazily on the first call: it shows up in the warmup time.
    """
    c = spec.compile
    options = dict(mode=c.mode.value, fullgraph=c.fullgraph, dynamic=c.dynamic)
    for target in c.targets:
        if target is CompileTarget.unet and c.regional:
            pipe.unet.compile_repeated_blocks(**options)
        elif target is CompileTarget.unet:
            pipe.unet.compile(**options)
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

    def __init__(self, graph, unet, kind: str) -> None:
        super().__init__()
        self.graph = graph  # a torch.jit.ScriptModule (trace) or an AOTInductor runner (export)
        self.kind = kind
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

        out = self.graph(sample, timestep, encoder_hidden_states)[0]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class _UNetForGraph(torch.nn.Module):
    """The UNet as a function of three tensors, returning a tuple: what trace and export capture."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)


def trace_unet(pipe, spec: Spec, device: str) -> None:
    """The seed's recipe: torch.jit.trace the UNet with example inputs of the run's shape."""
    example = unet_example_inputs(pipe, spec, device)
    # TracerWarnings say the graph is fixed to these shapes: that is the recipe (and why the
    # example inputs take the run's shape), not a problem to show the user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(_UNetForGraph(pipe.unet).eval(), example, check_trace=False)
    pipe.unet = GraphUNet(traced, pipe.unet, "trace")


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
