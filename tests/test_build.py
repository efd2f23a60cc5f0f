"""Each CPU-capable option builds on the real tiny model and changes what it should."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import sdbuild
from sdbuild.builder import GraphUNet, build_pipeline, global_switches
from sdbuild.models import ensure_model
from sdbuild.run_inputs import call_kwargs

from conftest import FAST


def built(*overrides):
    spec = sdbuild.compose([*FAST, *overrides])
    pipe, info = build_pipeline(spec)
    return spec, pipe, info


def run(spec, pipe, device="cpu"):
    return pipe(**call_kwargs(spec, pipe, device)).images


def unet_processors(pipe):
    return {type(p) for p in pipe.unet.attn_processors.values()}


def test_fp32_and_tf32_set_the_flags_explicitly():
    _, pipe, _ = built("precision=tf32")
    assert global_switches()["cuda_matmul_allow_tf32"] and global_switches()["float32_matmul_precision"] == "high"
    assert pipe.unet.dtype == torch.float32
    _, pipe, _ = built("precision=fp32")  # nothing carried over from the tf32 build
    assert not global_switches()["cuda_matmul_allow_tf32"] and not global_switches()["cudnn_allow_tf32"]
    assert global_switches()["float32_matmul_precision"] == "highest"


def test_bf16_loads_weights_in_bf16_and_runs():
    spec, pipe, _ = built("precision=bf16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    images = run(spec, pipe)
    assert np.isfinite(images).all() and images.std() > 0.01


def test_bf16_with_fp32_vae():
    spec, pipe, _ = built("precision=bf16_vae32")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert np.isfinite(run(spec, pipe)).all()


def test_channels_last_changes_conv_weight_layout():
    _, pipe, _ = built("memory_format=channels_last")
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    _, pipe, _ = built("memory_format=contiguous")
    assert pipe.unet.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("option,processor", [("classic", AttnProcessor), ("sdpa", AttnProcessor2_0)])
def test_attention_processor_class(option, processor):
    spec, pipe, _ = built(f"attention={option}")
    assert unet_processors(pipe) == {processor}
    assert {type(p) for p in pipe.vae.attn_processors.values()} == {processor}
    assert np.isfinite(run(spec, pipe)).all()


def test_sdpa_matches_classic_attention():
    spec, pipe, _ = built("attention=classic")
    classic = run(spec, pipe)
    spec, pipe, _ = built("attention=sdpa")
    assert np.abs(run(spec, pipe) - classic).max() < 1e-3


def test_trace_replaces_the_unet_with_a_traced_graph_and_keeps_the_image():
    spec, pipe, _ = built("attention=sdpa")
    eager = run(spec, pipe)
    spec, pipe, info = built("attention=sdpa", "compile=trace")
    assert isinstance(pipe.unet, GraphUNet)
    assert isinstance(pipe.unet.graph, torch.jit.ScriptModule)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.dtype == torch.float32
    assert np.abs(run(spec, pipe) - eager).max() < 1e-3


def test_inductor_compiles_the_unet_in_place():
    spec, pipe, _ = built("compile=inductor", "attention=sdpa", "run.steps=2")
    assert pipe.unet._compiled_call_impl is not None  # nn.Module.compile() was applied
    images = run(spec, pipe)
    assert np.isfinite(images).all()


def test_sdbuild_matches_the_same_pipeline_written_by_hand(model_cache):
    """The seed's baseline, hand-written with diffusers, gives the very same pixels."""
    spec, pipe, _ = built("attention=classic", "precision=fp32", "run.seed=3")
    ours = run(spec, pipe)

    by_hand = StableDiffusionPipeline.from_pretrained(ensure_model(spec.model, None), use_safetensors=True,
                                                      safety_checker=None, requires_safety_checker=False)
    by_hand.scheduler = DDIMScheduler.from_config(by_hand.scheduler.config)
    by_hand.unet.set_attn_processor(AttnProcessor())
    by_hand.vae.set_attn_processor(AttnProcessor())
    by_hand.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    theirs = by_hand("a photo of an astronaut riding a horse on mars", num_inference_steps=4, guidance_scale=7.5,
                     height=64, width=64, latents=latents, output_type="np").images
    np.testing.assert_array_equal(ours, theirs)


def test_sweeps_reuse_loaded_weights_without_sharing_state():
    """Within a sweep the weights come from memory, but every job gets its own untouched copy."""
    sdpa_spec = sdbuild.compose([*FAST, "attention=sdpa"])
    classic_spec = sdbuild.compose([*FAST, "attention=classic"])
    sdpa_pipe, _ = build_pipeline(sdpa_spec, reuse_weights=True)
    classic_pipe, info = build_pipeline(classic_spec, reuse_weights=True)
    assert classic_pipe.unet is not sdpa_pipe.unet
    assert unet_processors(sdpa_pipe) == {AttnProcessor2_0} and unet_processors(classic_pipe) == {AttnProcessor}
    fresh_spec, fresh_pipe, _ = built("attention=classic")
    np.testing.assert_array_equal(run(classic_spec, classic_pipe), run(fresh_spec, fresh_pipe))
