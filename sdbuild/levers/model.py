"""The `model` group's lever: load the family's pipeline from the folder sdbuild/models.py names,
weights straight into the precision's dtype (no fp32 copy first), safetensors only, quantized while
loading (levers/quant.py); then the scheduler (levers/scheduler.py), the VAE (levers/vae.py) and the
VAE's own dtype (levers/precision.py). This is the builder's "load" step; its time is the row's
`load_s`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

from ..families import family_of
from ..models import ensure_model, model_folder, single_file, to_download, variant_split
from ..spec import ModelSource, Quant, Spec
from . import precision, quant, scheduler, vae


def pipeline_class(spec: Spec):
    return family_of(spec).pipeline_class()


def load(spec: Spec):
    """The loaded pipeline, every load-time choice applied (dtype, quantization, scheduler, VAE)."""
    folder = ensure_model(spec.model, spec.cache_dir)
    dtype = precision.torch_dtype(spec.precision.dtype.value)
    kwargs: Dict[str, Any] = {precision.dtype_keyword(): dtype, "use_safetensors": True, "local_files_only": True}
    kwargs.update(family_of(spec).load_kwargs)
    if spec.model.variant is not None:
        kwargs["variant"] = spec.model.variant  # each component: its variant's files where it has them
    if (config := quant.quantization_config(spec)) is not None:
        kwargs["quantization_config"] = config
    if single_file(spec.model):  # one checkpoint file, its layout from the local folder model.config names
        kwargs.pop("use_safetensors")
        pipe = pipeline_class(spec).from_single_file(str(Path(spec.model.path).expanduser()), config=folder, **kwargs)
    else:
        pipe = pipeline_class(spec).from_pretrained(folder, **kwargs)
    scheduler.apply(pipe, spec)
    vae.apply(pipe, spec, dtype)
    precision.apply_vae_dtype(pipe, spec)
    return pipe


_LOADED: Dict[tuple, Any] = {}  # load key -> pristine pipeline on the CPU (one entry: bounded memory)


def load_key(spec: Spec) -> tuple:
    """Everything `load` depends on."""
    return (spec.model.source, spec.model.family, spec.model.path, spec.model.config, spec.model.variant, spec.cache_dir,
            spec.precision.dtype,
            spec.precision.vae_dtype, spec.vae.kind, spec.vae.path, spec.scheduler.kind)


def load_reusing(spec: Spec):
    """`load`, from memory when the previous job loaded the same thing. Quantized weights are
    always loaded afresh (torchao tensor subclasses are not safely deep-copyable)."""
    if spec.quant.method is not Quant.none:
        return load(spec)
    key = load_key(spec)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load(spec)
    return copy.deepcopy(_LOADED[key])


def apply(pipe, spec: Spec, device: str, info):
    """The builder's load step: returns the pipeline (from the sweep's in-memory copy when
    `info.reuse_weights`), SDXL's VAE kept in fp32 under fp16 (`precision.upcast_sdxl_vae`)."""
    pipe = load_reusing(spec) if info.reuse_weights else load(spec)
    info.notes += precision.upcast_sdxl_vae(pipe, spec)
    if spec.model.variant is not None:
        info.notes.append(variant_note(spec))
    return pipe


def variant_note(spec: Spec) -> str:
    with_variant, without = variant_split(spec.model)
    note = f"model.variant={spec.model.variant}: {', '.join(with_variant)} from {spec.model.variant} files"
    return note + (f"; {', '.join(without)} from their default files (no {spec.model.variant} files)" if without else "")


def describe(spec: Spec, device: str) -> str:
    if to_download(spec.model):
        source = (f"{spec.model.path}, downloaded first into the Hugging Face cache (model.download=true: configs "
                  "and safetensors only)")
        return (f"{spec.model.family.name} {family_of(spec).pipeline} ({spec.model.name}) from {source}, "
                f"{precision.describe_dtype(spec)}{quant.describe(spec)}; {scheduler.describe(spec)}; VAE: {vae.describe(spec)}")
    folder = model_folder(spec.model, spec.cache_dir)
    if single_file(spec.model):
        source = f"{spec.model.path} (single-file safetensors, layout from {folder})"
    elif spec.model.source is ModelSource.pretrained:
        source = f"{folder} (local safetensors)" if spec.model.variant is None else f"{folder} ({variant_note(spec)})"
    elif spec.model.source is ModelSource.drawn:
        source = f"{folder} (shipped safetensors, trained on the drawn set)"
    else:
        cached = (Path(folder) / "model_index.json").exists()
        source = f"{folder} ({'cached' if cached else 'built from code with random weights on first use'})"
    return (f"{spec.model.family.name} {family_of(spec).pipeline} ({spec.model.name}) from {source}, "
            f"{precision.describe_dtype(spec)}{quant.describe(spec)}; {scheduler.describe(spec)}; VAE: {vae.describe(spec)}")
