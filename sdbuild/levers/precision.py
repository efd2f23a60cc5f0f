"""The `precision` group: the weights' dtype (applied while loading, sdbuild/levers/model.py), the
VAE's own dtype, and the process-wide numeric switches (TF32, cuDNN) every build sets explicitly.

The switches step runs first, before anything loads: it also points Inductor's caches where the
compile group says (sdbuild/levers/compile.py) and drops the compiled graphs of earlier builds, so
nothing leaks in from a job before.
"""

from __future__ import annotations

from typing import Any, Dict, List

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..spec import Dtype, ModelFamily, Spec, VaeKind


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (and warns on the old name); older ones know only `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def set_global_switches(spec: Spec) -> None:
    """Set every process-wide flag the spec depends on, so nothing leaks in from an earlier build."""
    import torch
    from .compile import set_inductor_caches

    # Compiler caches first: TorchDynamo and Inductor are imported by what follows (and read their
    # environment once, at import); where they are already imported, their config is set directly.
    set_inductor_caches(spec.compile.cache_dir)
    set_numeric_flags(spec)
    torch.compiler.reset()  # drop dynamo caches and compiled graphs of earlier builds


def set_numeric_flags(spec: Spec) -> None:
    """The spec's TF32 and cuDNN flags alone: what must be set again before each call when several
    built pipelines take turns in one process (sdbuild.interleave), without dropping compiled graphs."""
    import torch

    tf32 = spec.precision.tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = False


def global_switches() -> Dict[str, Any]:
    """The flags in force, as recorded in result.json."""
    import torch

    return {
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "inductor_changed": inductor_changes(),
    }


# Inductor settings a library may turn on process-wide (torchao's recommended_inductor_config_setter sets these)
# that no spec field sets: recorded where they differ from Inductor's defaults.
INDUCTOR_WATCHED = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul",
                    "triton.unique_kernel_names", "max_autotune", "triton.cudagraphs")


def inductor_changes() -> Dict[str, Any]:
    """The watched Inductor settings that differ from Inductor's defaults ({} where Inductor is not imported)."""
    import sys

    if "torch._inductor.config" not in sys.modules:
        return {}
    import torch._inductor.config as inductor_config

    current = inductor_config.get_config_copy()
    # set by someone (not left at its default) and to another value than Inductor's default
    return {name: current[name] for name in INDUCTOR_WATCHED
            if name in current and not inductor_config._is_default(name)
            and current[name] != inductor_config._config[name].default}


def apply_switches(pipe, spec: Spec, device: str, info) -> None:
    """The builder's first step (no pipeline yet)."""
    set_global_switches(spec)


def describe_switches(spec: Spec, device: str) -> str:
    """The switches as the plan and the row's build steps say them. TF32 off is off for cuDNN's convolutions
    too (torch.backends.cudnn.allow_tf32=False), which PyTorch leaves on by default: the fp32 baseline is
    exact fp32, not PyTorch's default fp32."""
    if spec.precision.tf32:
        return "TF32 on (matmuls and cuDNN convolutions)"
    return ("TF32 off: matmuls and cuDNN convolutions in exact fp32 (cudnn.allow_tf32=False; PyTorch's "
            "default is True)")


def run_vae_in(pipe, dtype: torch.dtype) -> None:
    """Keep the VAE in `dtype` while the UNet runs lower; latents are cast on their way in."""
    import torch

    pipe.vae.to(dtype)

    def cast_input(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    first = pipe.vae.post_quant_conv if getattr(pipe.vae, "post_quant_conv", None) is not None else pipe.vae.decoder
    first.register_forward_pre_hook(cast_input)


def apply_vae_dtype(pipe, spec: Spec) -> None:
    """precision.vae_dtype: the VAE runs in its own dtype (fp16_vae32, bf16_vae32)."""
    if spec.precision.vae_dtype is not None:
        run_vae_in(pipe, torch_dtype(spec.precision.vae_dtype.value))


def upcast_sdxl_vae(pipe, spec: Spec) -> List[str]:
    """SDXL's VAE overflows in fp16, so diffusers casts it to fp32 and back inside every call
    (`force_upcast`), which also re-records CUDA graphs each call. Under precision=fp16 with no
    VAE dtype chosen, sdbuild keeps the VAE in fp32 once, at build time, and says so."""
    import torch

    if (spec.model.family is ModelFamily.sdxl and spec.precision.dtype is Dtype.fp16
            and spec.precision.vae_dtype is None and spec.vae.kind is VaeKind.full
            and getattr(pipe.vae.config, "force_upcast", False)):
        run_vae_in(pipe, torch.float32)
        return ["VAE kept in float32: SDXL's VAE overflows in fp16, and diffusers would otherwise upcast it "
                "inside every call (force_upcast). Set precision.vae_dtype to choose otherwise"]
    return []


def describe_dtype(spec: Spec) -> str:
    p = spec.precision
    return f"weights in {p.dtype.value}" + (f", VAE in {p.vae_dtype.value}" if p.vae_dtype else "")
