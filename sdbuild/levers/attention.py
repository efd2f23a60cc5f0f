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
from ..spec import AttentionBackend, AttentionProcessor, Spec, SdpaBackend

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
    import torch

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
    return (head + (f", SDPA kernel {a.sdpa_backend.value}" if a.sdpa_backend is not SdpaBackend.auto else "")
            + (", fused QKV" if a.fuse_qkv else "") + (f", slicing {a.slice_size}" if a.slice_size is not None else ""))


# Transformer families --------------------------------------------------------------------------


def dispatcher_backends(model) -> list[str]:
    """The backend each attention module hands the dispatcher (its processor's `_attention_backend`;
    None: the dispatcher's active backend), resolved to the name the dispatcher will run."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    return sorted({AttentionBackendName(getattr(m.processor, "_attention_backend", None) or active).value
                   for m in model.modules() if getattr(m, "processor", None) is not None})


def transformer_attention(pipe, spec: Spec) -> Dict[str, Any]:
    """Set the dispatcher backend (if chosen) and record what the transformer's attention runs."""
    model = pipe.transformer
    if spec.attention.backend is not AttentionBackend.default:
        model.set_attention_backend(spec.attention.backend.value)
    processors = sorted({type(p).__name__ for p in model.attn_processors.values()})
    record: Dict[str, Any] = {"processor": ", ".join(processors), "requested_backend": spec.attention.backend.value,
                              "pinned_modules": [], "unpinned": {}}
    if family_of(spec).dispatcher:
        record["backend"] = ", ".join(dispatcher_backends(model))
    return record
