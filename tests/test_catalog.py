"""The optimization catalog on CPU: each option that can run here runs and does what it says;
each CUDA-only option is refused with what it needs."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0, SlicedAttnProcessor

import sdbuild
from sdbuild.levers.graphs import GraphUNet

from conftest import needs_packages, package_marks, run_cli
from helpers import built, compiled_with, first_attention, mode_config, run, unet_processors


def test_fused_qkv_projections(shared_pipeline):
    spec, pipe, _ = shared_pipeline("attention=sdpa")
    plain = run(spec, pipe)
    spec, pipe, _ = shared_pipeline("attention=sdpa_fused")
    attn = first_attention(pipe)
    assert unet_processors(pipe) == {FusedAttnProcessor2_0} and attn.fused_projections and attn.to_qkv is not None
    assert np.abs(run(spec, pipe) - plain).max() < 1e-3  # same maths, one matmul


def test_attention_slicing(shared_pipeline):
    spec, pipe, _ = shared_pipeline("attention=sliced")
    assert unet_processors(pipe) == {SlicedAttnProcessor}
    assert np.isfinite(run(spec, pipe)).all()


def test_sdpa_pinned_to_the_math_kernel(shared_pipeline):
    spec, pipe, _ = shared_pipeline("attention=sdpa_math")
    (processor,) = unet_processors(pipe)
    assert issubclass(processor, AttnProcessor2_0) and processor.__name__ == "KernelPinnedAttnProcessor"
    assert np.isfinite(run(spec, pipe)).all()


@pytest.mark.parametrize("option,flag", [("vae_slicing", "use_slicing"), ("vae_tiling", "use_tiling")])
def test_vae_memory_switches(option, flag, shared_pipeline):
    spec, pipe, _ = shared_pipeline(f"memory={option}")
    assert getattr(pipe.vae, flag) is True
    assert np.isfinite(run(spec, pipe)).all()


def test_tiny_autoencoder_decodes(shared_pipeline):
    spec, pipe, _ = shared_pipeline("vae=tiny")
    assert isinstance(pipe.vae, AutoencoderTiny)
    images = run(spec, pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@needs_packages("torchao", "accelerate")
def test_torchao_quantized_unet(shared_pipeline):
    """int8wo quantizes weights only; int8dq also quantizes activations on the fly: a different
    torchao config, a weight that carries activation-quantization settings, and other numbers."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    images = {}
    for option, config, quantizes_activations in [("int8wo", Int8WeightOnlyConfig, False),
                                                  ("int8dq", Int8DynamicActivationInt8WeightConfig, True)]:
        spec, pipe, _ = shared_pipeline(f"quant={option}")
        assert type(pipe.unet.hf_quantizer.quantization_config.quant_type) is config
        weight = first_attention(pipe).to_q.weight
        assert type(weight) is not torch.nn.Parameter and weight.qdata.dtype == torch.int8
        assert (weight.act_quant_kwargs is not None) is quantizes_activations
        assert type(pipe.vae.decoder.conv_in.weight) is torch.nn.Parameter  # only the UNet is quantized
        images[option] = run(spec, pipe)
        assert np.isfinite(images[option]).all()
    assert np.abs(images["int8wo"] - images["int8dq"]).max() > 1e-4


def test_compile_targets_and_their_options(shared_pipeline):
    """Every target gets torch.compile with the spec's options (read back, nothing compiled)."""
    expected = {"fullgraph": False, "dynamic": False, "mode_config": mode_config("default"), "backend": "inductor"}
    _, pipe, _ = shared_pipeline("compile=inductor_all")
    for module in (pipe.unet, pipe.vae.decoder, pipe.text_encoder):
        assert compiled_with(module) == expected
    _, pipe, _ = shared_pipeline("compile=regional", "compile.mode=max_autotune", "compile.fullgraph=true")
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(compiled_with(b) == {**expected, "fullgraph": True, "mode_config": mode_config("max-autotune")}
                          for b in blocks)
    assert pipe.unet._compiled_call_impl is None  # the blocks, not the whole UNet


def test_export_compiles_the_unet_ahead_of_time(tmp_path, shared_pipeline):
    spec, pipe, _ = shared_pipeline("attention=sdpa")
    eager = run(spec, pipe)
    spec, pipe, _ = built("attention=sdpa", "compile=export", f"compile.cache_dir={tmp_path}")
    # compiled while building (the package is on disk before any call), not lazily in warmup
    assert (tmp_path / "unet.pt2").stat().st_size > 0
    assert isinstance(pipe.unet, GraphUNet) and pipe.unet.kind == "export"
    assert np.abs(run(spec, pipe) - eager).max() < 1e-3


@pytest.mark.slow  # two cold/warm Inductor compiles in fresh processes: ~2 min on 2 cores (benchmarks/compile_cache.py times it)
def test_compile_cache_makes_the_second_process_start_warm(tmp_path):
    cache = tmp_path / "cache"
    args = ["compile=inductor_cached", f"compile.cache_dir={cache}", "run.steps=2", "run.warmup=1", "run.repeats=1"]
    rows = []
    for i in range(2):  # two fresh processes, same spec
        out = run_cli(*args, f"hydra.run.dir={tmp_path / str(i)}")
        assert out.returncode == 0, out.stderr[-2000:]
        rows.append(json.loads((tmp_path / str(i) / "result.json").read_text()))
        if i == 0:
            assert any(cache.rglob("*")), "the first run wrote nothing to the cache folder"
    cold, warm = rows
    assert cold["compile_cache"]["fxgraph_cache_miss"] > 0
    assert warm["compile_cache"]["fxgraph_cache_hit"] > 0 and warm["compile_cache"]["fxgraph_cache_miss"] == 0
    print(f"\ncompile cache: cold warmup {cold['warmup_s']:.1f} s, warm warmup {warm['warmup_s']:.1f} s, "
          f"ratio {cold['warmup_s'] / warm['warmup_s']:.1f}x")


@pytest.mark.parametrize("overrides", [
    [], ["attention=sdpa_fused"], ["precision=bf16", "memory_format=channels_last"], ["vae=tiny"],
    pytest.param(["quant=int8wo"], marks=package_marks("torchao", "accelerate")), ["memory=vae_slicing"],
    ["scheduler=dpmpp_2m"],
], ids=lambda o: " ".join(o) or "default")
def test_second_architecture_sdxl(overrides, shared_pipeline):
    from diffusers import StableDiffusionXLPipeline

    spec, pipe, _ = shared_pipeline("model=tiny_sdxl", *overrides)
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.text_encoder_2 is not None
    images = run(spec, pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01


# GPU paths: these run where CUDA is present (a lent GPU) and skip with the reason elsewhere.


def max_difference(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.mark.cuda
def test_fp16_on_cuda_gives_the_fp32_picture(shared_pipeline):
    spec32, pipe32, _ = shared_pipeline("precision=fp32", "attention=sdpa")
    spec, pipe, info = shared_pipeline("precision=fp16", "attention=sdpa")
    assert info.device == "cuda" and pipe.unet.device.type == "cuda"
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    images = run(spec, pipe, "cuda")
    assert np.isfinite(images).all() and images.std() > 0.01
    assert max_difference(images, run(spec32, pipe32, "cuda")) < 0.05  # same noise, same maths, fp16 rounding


@pytest.mark.cuda
def test_sdpa_pinned_to_flash_runs_on_cuda(shared_pipeline):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention needs compute capability >= 8.0")
    auto_spec, auto_pipe, _ = shared_pipeline("precision=fp16", "attention=sdpa")
    spec, pipe, _ = shared_pipeline("precision=fp16", "attention=sdpa_flash")
    (processor,) = unet_processors(pipe)
    assert issubclass(processor, AttnProcessor2_0)
    images = run(spec, pipe, "cuda")
    assert np.isfinite(images).all() and max_difference(images, run(auto_spec, auto_pipe, "cuda")) < 0.02


@pytest.mark.cuda
@needs_packages("xformers")
def test_xformers_on_cuda(shared_pipeline):
    from diffusers.models.attention_processor import XFormersAttnProcessor

    sdpa_spec, sdpa_pipe, _ = shared_pipeline("precision=fp16", "attention=sdpa")
    spec, pipe, _ = shared_pipeline("precision=fp16", "attention=xformers")
    assert unet_processors(pipe) == {XFormersAttnProcessor}
    images = run(spec, pipe, "cuda")
    assert np.isfinite(images).all() and max_difference(images, run(sdpa_spec, sdpa_pipe, "cuda")) < 0.02
