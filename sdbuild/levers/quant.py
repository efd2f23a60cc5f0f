"""The `quant` group: diffusers' own torchao integration, applied to the denoiser (UNet or
transformer) while it loads (a `PipelineQuantizationConfig` passed to `from_pretrained`)."""

from __future__ import annotations

from ..families import family_of
from ..spec import Quant, Spec


def quantization_config(spec: Spec):
    """The config `from_pretrained` takes, or None for quant=none."""
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
    }[spec.quant.method](set_inductor_config=False)  # True (torchao's default) rewrites Inductor's config
    # process-wide (coordinate_descent_tuning, force_fuse_int_mm_with_mul, ...) for every later compile
    return PipelineQuantizationConfig(quant_mapping={family_of(spec).denoiser: TorchAoConfig(ao_config)})


def describe(spec: Spec) -> str:
    if spec.quant.method is Quant.none:
        return ""
    return f", {family_of(spec).denoiser} quantized {spec.quant.method.value} (torchao)"
