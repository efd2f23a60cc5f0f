"""The `attention` group: which attention implementation the denoiser (and the VAE) runs.

UNet families (SD 1.x, SDXL): diffusers' attention processors (classic, SDPA, xFormers), fused QKV
projections, attention slicing, and an SDPA kernel pin (`attention.sdpa_backend`) installed only on
the blocks that kernel can run. Transformer families: their own processors, and for those that call
diffusers' attention dispatcher (Flux) the dispatcher's backend (`attention.backend`).

`apply` returns what the pipeline will run, recorded in the row as `attention_kernel`; the builder
turns its unpinned modules into build notes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..families import family_of
from ..spec import AttentionBackend, AttentionProcessor, CompileMethod, Spec, SdpaBackend

# What each pinnable SDPA kernel takes on CUDA, as PyTorch's sdp_utils.cpp checks it (torch 2.9-2.11):
# FlashAttention-2 head dims up to 256; cuDNN attention up to 128, and up to 256 on Hopper (sm 9.0)
# with cuDNN >= 9.10 (`check_cudnn_tensor_shapes`), in multiples of 8. Math and memory-efficient take
# any head dim. On this process's own GPU the decision is torch's own predicate
# (`torch.backends.cuda.can_use_*_attention`); for a profile (conf/machine/) it is these facts.
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 128
CUDNN_HOPPER = ((9, 0), (9, 10))  # (capability, least cuDNN) where cuDNN attention takes head dims up to 256
CUDNN_HOPPER_MAX_HEAD_DIM = 256


def head_dim(attn) -> int:
    """Per-head width of a diffusers `Attention` module (the VAE's mid-block: one head of 512)."""
    return attn.inner_dim // attn.heads


# FlashAttention and cuDNN run fp16/bf16 only; math and memory-efficient also fp32.
HALF_ONLY = (SdpaBackend.flash, SdpaBackend.cudnn)


def max_head_dim(backend: SdpaBackend, machine=None) -> Optional[int]:
    """The widest head `backend` takes on `machine` (a `validate.Machine`; None: unknown, the oldest
    limits), or None where it takes any."""
    if backend is SdpaBackend.flash:
        return FLASH_MAX_HEAD_DIM
    if backend is SdpaBackend.cudnn:
        capability, cudnn = CUDNN_HOPPER
        if machine is not None and machine.capability == capability and (machine.cudnn_version or ()) >= cudnn:
            return CUDNN_HOPPER_MAX_HEAD_DIM
        return CUDNN_MAX_HEAD_DIM
    return None


def kernel_takes(backend: SdpaBackend, dim: int, dtype: torch.dtype, machine=None) -> Optional[str]:
    """Why the pinned kernel `backend` cannot run attention with heads of width `dim` in `dtype` on
    `machine` (None: it can). The one rule for the builder and the dry run: on this process's own
    CUDA machine PyTorch's predicate decides; for a described machine its capability and cuDNN do."""
    import torch

    if backend is SdpaBackend.math or backend is SdpaBackend.auto:
        return None
    if machine is not None and machine.probed and machine.cuda:
        return torch_refuses(backend, dim, dtype)
    limit = max_head_dim(backend, machine)
    if limit is not None and dim > limit:
        where = ""
        if backend is SdpaBackend.cudnn and machine is not None and machine.capability:
            where = " on compute capability %d.%d" % machine.capability + (
                " with cuDNN " + ".".join(map(str, machine.cudnn_version)) if machine.cudnn_version else "")
        return f"head dim {dim} > {limit}, the most {backend.name} takes{where}"
    if backend is SdpaBackend.cudnn and dim % 8:
        return f"head dim {dim} is not a multiple of 8 (cudnn)"
    if backend in HALF_ONLY and dtype not in (torch.float16, torch.bfloat16):
        return f"{backend.name} does not run {str(dtype).replace('torch.', '')}"
    return None


_PREDICATES = {SdpaBackend.flash: "can_use_flash_attention", SdpaBackend.efficient: "can_use_efficient_attention",
               SdpaBackend.cudnn: "can_use_cudnn_attention"}


def torch_refuses(backend: SdpaBackend, dim: int, dtype: torch.dtype, device: str = "cuda") -> Optional[str]:
    """PyTorch's own answer (`torch.backends.cuda.can_use_*_attention` on `SDPAParams` of one head of
    width `dim`, 64 tokens, `dtype`, on `device`): why the kernel cannot run it, from torch's debug
    warnings, or None where it can."""
    import warnings

    import torch
    import torch.backends.cuda as sdpa

    q = torch.empty(1, 1, 64, dim, dtype=dtype, device=device)
    params = sdpa.SDPAParams(q, q, q, None, 0.0, False, False)
    predicate = getattr(sdpa, _PREDICATES[backend])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if predicate(params, True):
            return None
    said = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    return f"PyTorch's {_PREDICATES[backend]} refuses head dim {dim} in {str(dtype).replace('torch.', '')}" + (
        f" ({said})" if said else "")


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


def pin_sdpa(module, backend: SdpaBackend, fused: bool, machine=None) -> list[str]:
    """Pin every attention block of `module` that the kernel can run on `machine`; the others keep
    PyTorch's own choice. Returns why blocks were left unpinned (empty: the whole module is pinned)."""
    return sorted({why for why in pin_blocks(module, backend, fused, machine).values() if why})


def pin_blocks(module, backend: SdpaBackend, fused: bool, machine=None) -> Dict[str, Optional[str]]:
    """`pin_sdpa`'s decision per block: block name -> why it is left to PyTorch (None: pinned)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    pinned = kernel_pinned_processor(backend, fused)
    plain = FusedAttnProcessor2_0() if fused else AttnProcessor2_0()
    decisions: Dict[str, Optional[str]] = {}
    for name, attn in attention_modules(module):
        why = kernel_takes(backend, head_dim(attn), attn.to_out[0].weight.dtype, machine)
        attn.set_processor(plain if why else pinned)
        decisions[name] = why
    return decisions


def _fuse_qkv(pipe) -> list[str]:
    """diffusers' fused QKV projections on the UNet, and on the VAE where it has them (AutoencoderKL;
    AutoencoderTiny has no attention to fuse)."""
    from diffusers import AutoencoderKL

    fuse_vae = isinstance(pipe.vae, AutoencoderKL)
    pipe.fuse_qkv_projections(unet=True, vae=fuse_vae)
    return ["unet", "vae"] if fuse_vae else ["unet"]


def apply_attention(pipe, spec: Spec, machine=None) -> Dict[str, Any]:
    """Set the attention implementation of the UNet and the VAE (the text encoder is transformers').

    Returns what the pipeline will run, recorded in the row as `attention_kernel`: a pinned SDPA
    kernel is pinned only on the attention blocks that kernel can run (the UNet; the VAE's
    512-wide head is beyond FlashAttention and cuDNN), and the record names every module left
    to PyTorch's choice, so a row never claims a kernel that did not run. `machine`: what decides
    which blocks a kernel takes (default: the spec's target machine, `validate.target_machine`).
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if family_of(spec).transformer:
        return transformer_attention(pipe, spec, machine)
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
        record.update(pin_modules(modules, spec, machine or _target_machine(spec), record.get("fused_modules", [])))
    return record


def _on_cuda(spec: Spec, machine) -> bool:
    from ..validate import resolve_device

    return resolve_device(spec, machine) == "cuda"


def _target_machine(spec: Spec):
    from ..validate import target_machine

    return target_machine(spec)


def pin_modules(modules: Dict[str, Any], spec: Spec, machine, fused_modules=()) -> Dict[str, Any]:
    """Pin `spec`'s SDPA kernel on the blocks of each module (name -> UNet or VAE) that `machine`'s
    kernel takes: the record's `pinned_modules` (every block pinned), `unpinned` (module -> why some
    are left to PyTorch) and `blocks` (module -> blocks pinned / left, by head dim). The builder
    calls it on the loaded pipeline; the dry run on the same modules built on the meta device."""
    record: Dict[str, Any] = {"pinned_modules": [], "unpinned": {}, "blocks": {}}
    for name, m in modules.items():
        if not attention_modules(m):
            continue
        decisions = pin_blocks(m, spec.attention.sdpa_backend, name in fused_modules, machine)
        dims = {block: head_dim(attn) for block, attn in attention_modules(m)}
        left = sorted({why for why in decisions.values() if why})
        record["blocks"][name] = {
            "pinned": sum(why is None for why in decisions.values()), "left": sum(why is not None for why in decisions.values()),
            "pinned_head_dims": sorted({dims[b] for b, why in decisions.items() if why is None}),
            "left_head_dims": sorted({dims[b] for b, why in decisions.items() if why is not None})}
        if left:
            record["unpinned"][name] = "; ".join(left) + ": PyTorch picks the kernel there"
        else:
            record["pinned_modules"].append(name)
    return record


def xformers_kernels() -> Dict[str, Any]:
    """Whether xformers' own compiled kernels loaded, and which forward op it picks for an SD 1.5
    UNet attention shape: a wheel built for another torch falls back to PyTorch's kernels under
    the xformers name, and the row must say so."""
    import torch
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


def apply(pipe, spec: Spec, device: str, info) -> None:
    """The builder's attention step: set it, record it, and say which modules a pin left alone."""
    info.attention_kernel = apply_attention(pipe, spec)
    info.notes += [f"attention: {name} not pinned to {spec.attention.sdpa_backend.name} ({why})"
                   for name, why in info.attention_kernel.get("unpinned", {}).items()]
    if info.attention_kernel.get("xformers_kernels_loaded") is False:
        info.notes.append("attention=xformers: xformers' own compiled kernels did not load (built for another "
                          f"torch); its ops run {info.attention_kernel.get('xformers_op')} instead")


def describe(spec: Spec, device: str) -> str:
    a = spec.attention
    head = ("the transformer's own processors (diffusers' attention dispatcher)" if family_of(spec).transformer
            else a.processor.value)
    text = (head + (f", SDPA kernel {a.sdpa_backend.value}" if a.sdpa_backend is not SdpaBackend.auto else "")
            + (f", backend {a.backend.value}" if a.backend is not AttentionBackend.default else "")
            + (", fused QKV" if a.fuse_qkv else "") + (f", slicing {a.slice_size}" if a.slice_size is not None else ""))
    if (record := planned_record(spec)) is not None:
        text += "; " + said_blocks(record, spec)
        if spec.compile.method is CompileMethod.trace:  # the compile step's rule, on the same record
            from .compile import _graph_sdpa_pin

            text += f"; the traced UNet replays under sdpa_kernel({_graph_sdpa_pin(spec, record).name})"
    return text


def decides_per_block(spec: Spec) -> bool:
    """Whether the build decides block by block what runs: an SDPA kernel pin on a UNet, or a
    dispatcher backend pinned to one of torch's SDPA kernels on a transformer."""
    a = spec.attention
    if family_of(spec).transformer:
        return family_of(spec).dispatcher and a.backend in DISPATCHER_SDPA
    return a.processor is AttentionProcessor.sdpa and a.sdpa_backend is not SdpaBackend.auto


def planned_record(spec: Spec, machine=None) -> Optional[Dict[str, Any]]:
    """What the attention step would record for `spec` on its target machine, decided by the
    builder's own functions (`pin_modules`, `check_dispatcher_kernel`) on the model's attention
    modules built on the meta device (no weights, no memory); None where nothing is decided per
    block. Raises `SpecError` where the build would refuse."""
    if not decides_per_block(spec):
        return None
    machine = machine or _target_machine(spec)
    if family_of(spec).transformer and not _on_cuda(spec, machine):
        return None  # on CPU torch's own kernels run every block (its CPU flash also fp32)
    modules = skeleton_modules(spec)
    if family_of(spec).transformer:
        return {"blocks": {"transformer": check_dispatcher_kernel(modules["transformer"], spec, machine)},
                "pinned_modules": [], "unpinned": {}}
    fused = [name for name in modules if spec.attention.fuse_qkv]
    return pin_modules(modules, spec, machine, fused)


def said_blocks(record: Dict[str, Any], spec: Spec) -> str:
    """The per-block decisions of a record, in words: which blocks the kernel takes, which it leaves and why."""
    kernel = spec.attention.backend.value if family_of(spec).transformer else spec.attention.sdpa_backend.name
    parts = []
    for name, b in record["blocks"].items():
        line = f"{name}: {kernel} takes {b['pinned']} of {b['pinned'] + b['left']} attention blocks"
        if b["pinned_head_dims"]:
            line += f" (head dim {', '.join(map(str, b['pinned_head_dims']))})"
        if b["left"]:
            line += (f", leaves {b['left']} (head dim {', '.join(map(str, b['left_head_dims']))}) to PyTorch: "
                     + record["unpinned"][name].removesuffix(": PyTorch picks the kernel there"))
        parts.append(line)
    return "; ".join(parts)


def skeleton_modules(spec: Spec) -> Dict[str, Any]:
    """The attention-bearing modules the load step gives the pipeline (the denoiser; the model's own
    VAE), built from the model's configs on the meta device in the dtypes the load step gives them
    (the precision's dtype, the VAE's own, SDXL's fp32 VAE under fp16): what the dry run decides on.
    Nothing is allocated and no weights are read."""
    import inspect
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from ..models import model_folder, random_model_name
    from ..quiet import quiet_imports
    from ..spec import ModelSource, VaeKind
    from . import precision

    quiet_imports()  # as the builder does before diffusers loads
    family = family_of(spec)
    names = [family.denoiser] + (["vae"] if spec.vae.kind is VaeKind.full else [])
    if spec.model.source is ModelSource.pretrained:
        folder = Path(model_folder(spec.model, spec.cache_dir))
        configs = {n: json.loads((folder / n / "config.json").read_text()) for n in names}
    else:
        configs = {n: family.random_models[random_model_name(spec.model)][n] for n in names}
    import torch
    from diffusers.utils import logging as diffusers_logging

    params = inspect.signature(family.pipeline_class().__init__).parameters
    dtype = precision.torch_dtype(spec.precision.dtype.value)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # `.to(dtype)` on a model warns about its fp32 modules: none here
    try:
        with torch.device("meta"):
            built = {n: params[n].annotation.from_config(configs[n]).to(dtype) for n in names}
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if "vae" in built:
        pipe = SimpleNamespace(**built)
        precision.apply_vae_dtype(pipe, spec)
        precision.upcast_sdxl_vae(pipe, spec)
    return built


# Transformer families --------------------------------------------------------------------------


def dispatcher_backends(model) -> list[str]:
    """The backend each attention module hands the dispatcher (its processor's `_attention_backend`;
    None: the dispatcher's active backend), resolved to the name the dispatcher will run."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    return sorted({AttentionBackendName(getattr(m.processor, "_attention_backend", None) or active).value
                   for m in model.modules() if getattr(m, "processor", None) is not None})


def transformer_attention(pipe, spec: Spec, machine=None) -> Dict[str, Any]:
    """Set the dispatcher backend (if chosen) and record what the transformer's attention runs."""
    model = pipe.transformer
    blocks = None
    if decides_per_block(spec) and _on_cuda(spec, machine := machine or _target_machine(spec)):
        blocks = check_dispatcher_kernel(model, spec, machine)  # before the backend is set: refused if a block cannot run
    if spec.attention.backend is not AttentionBackend.default:
        model.set_attention_backend(spec.attention.backend.value)
    processors = sorted({type(p).__name__ for p in model.attn_processors.values()})
    record: Dict[str, Any] = {"processor": ", ".join(processors), "requested_backend": spec.attention.backend.value,
                              "pinned_modules": [], "unpinned": {}}
    if blocks is not None:
        record["blocks"] = {"transformer": blocks}
    if family_of(spec).dispatcher:
        record["backend"] = ", ".join(dispatcher_backends(model))
    return record


# The dispatcher backends that are torch SDPA pinned to one kernel: the kernel's rules apply to them.
DISPATCHER_SDPA = {AttentionBackend.native_flash: SdpaBackend.flash, AttentionBackend.native_efficient: SdpaBackend.efficient,
                   AttentionBackend.native_cudnn: SdpaBackend.cudnn}


def transformer_attention_modules(model):
    """The transformer's attention modules (those with a processor and heads), by name."""
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "processor", None) is not None and getattr(m, "heads", None)]


def check_dispatcher_kernel(model, spec: Spec, machine) -> Dict[str, Any]:
    """The transformer's blocks under a dispatcher backend pinned to one torch kernel: every block
    must run on it (the dispatcher sets one backend for all, there is no falling back per block),
    so a block the kernel cannot take refuses the spec with the reason. Returns the block counts."""
    from ..errors import SpecError, problem

    kernel = DISPATCHER_SDPA[spec.attention.backend]
    dims, left = set(), {}
    for _, m in transformer_attention_modules(model):
        dim = m.inner_dim // m.heads
        dims.add(dim)
        if why := kernel_takes(kernel, dim, next(m.parameters()).dtype, machine):
            left[dim] = why
    if left:
        raise SpecError([problem(f"attention.backend={spec.attention.backend.name}",
                                 f"the dispatcher runs every attention block of the transformer on {kernel.name}, but "
                                 + "; ".join(sorted(set(left.values()))),
                                 "Use attention.backend=native (PyTorch picks the kernel per call) or native_efficient")])
    count = len(transformer_attention_modules(model))
    return {"pinned": count, "left": 0, "pinned_head_dims": sorted(dims), "left_head_dims": []}
