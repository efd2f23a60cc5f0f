"""Each CPU-capable option builds on the real tiny model and changes what it should."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import sdbuild
from sdbuild.builder import build_pipeline
from sdbuild.levers.graphs import GraphUNet
from sdbuild.levers.precision import global_switches
from sdbuild.models import ensure_model
from sdbuild.run_inputs import call_kwargs

from conftest import FAST
from helpers import built, compiled_with, mode_config, run, unet_processors


def test_fp32_and_tf32_set_the_flags_explicitly():
    _, pipe, _ = built("precision=tf32")
    assert global_switches()["cuda_matmul_allow_tf32"] and global_switches()["float32_matmul_precision"] == "high"
    assert pipe.unet.dtype == torch.float32
    _, pipe, _ = built("precision=fp32")  # nothing carried over from the tf32 build
    assert not global_switches()["cuda_matmul_allow_tf32"] and not global_switches()["cudnn_allow_tf32"]
    assert global_switches()["float32_matmul_precision"] == "highest"


def test_bf16_loads_weights_in_bf16_and_runs(shared_pipeline):
    spec, pipe, _ = shared_pipeline("precision=bf16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    images = run(spec, pipe)
    assert np.isfinite(images).all() and images.std() > 0.01


def test_bf16_with_fp32_vae(shared_pipeline):
    spec, pipe, _ = shared_pipeline("precision=bf16_vae32")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert np.isfinite(run(spec, pipe)).all()


def conv_weights(module):
    return {name: m.weight for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_channels_last_on_every_conv_weight_of_the_unet_and_the_vae(shared_pipeline):
    _, pipe, _ = shared_pipeline("memory_format=channels_last")
    for part in ("unet", "vae"):
        weights = conv_weights(getattr(pipe, part))
        assert len(weights) > 5
        wrong = [name for name, w in weights.items() if not w.is_contiguous(memory_format=torch.channels_last)]
        assert not wrong, f"{part} conv weights not channels-last: {wrong}"
        # A 1x1 kernel is both layouts at once; a 3x3 one in channels-last is no longer NCHW-contiguous.
        assert any(w.shape[-1] > 1 for w in weights.values())
        assert not [name for name, w in weights.items() if w.shape[-1] > 1 and w.is_contiguous()]
    _, pipe, _ = shared_pipeline("memory_format=contiguous")
    for part in ("unet", "vae"):
        assert all(w.is_contiguous() for w in conv_weights(getattr(pipe, part)).values())


@pytest.mark.parametrize("option,processor", [("classic", AttnProcessor), ("sdpa", AttnProcessor2_0)])
def test_attention_processor_class(option, processor, shared_pipeline):
    spec, pipe, _ = shared_pipeline(f"attention={option}")
    assert unet_processors(pipe) == {processor}
    assert {type(p) for p in pipe.vae.attn_processors.values()} == {processor}
    assert np.isfinite(run(spec, pipe)).all()


def test_sdpa_matches_classic_attention(shared_pipeline):
    spec, pipe, _ = shared_pipeline("attention=classic")
    classic = run(spec, pipe)
    spec, pipe, _ = shared_pipeline("attention=sdpa")
    assert np.abs(run(spec, pipe) - classic).max() < 1e-3


def test_trace_replaces_the_unet_with_a_traced_graph_and_keeps_the_image(shared_pipeline):
    spec, pipe, _ = shared_pipeline("attention=sdpa")
    eager = run(spec, pipe)
    spec, pipe, _ = shared_pipeline("attention=sdpa", "compile=trace")
    assert isinstance(pipe.unet, GraphUNet)
    assert isinstance(pipe.unet.graph, torch.jit.ScriptModule)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.dtype == torch.float32
    assert np.abs(run(spec, pipe) - eager).max() < 1e-3


def test_inductor_compiles_the_unet_in_place():
    spec, pipe, _ = built("compile=inductor", "attention=sdpa", "run.steps=2")
    assert pipe.unet._compiled_call_impl is not None  # nn.Module.compile() was applied
    images = run(spec, pipe)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("option,mode,fullgraph", [
    ("inductor", "default", False),
    ("inductor_max_autotune", "max-autotune", False),
    ("inductor_fullgraph", "default", True),
])
def test_compile_options_reach_torch_compile(option, mode, fullgraph, shared_pipeline):
    """What torch.compile was handed for the UNet, read back without compiling (no call)."""
    _, pipe, _ = shared_pipeline(f"compile={option}")
    assert compiled_with(pipe.unet) == {"fullgraph": fullgraph, "dynamic": False, "mode_config": mode_config(mode),
                                        "backend": "inductor"}


def test_compile_dynamic_reaches_torch_compile():
    _, pipe, _ = built("compile=inductor", "compile.dynamic=true")
    assert compiled_with(pipe.unet)["dynamic"] is True
    _, pipe, _ = built("compile=inductor", "compile.dynamic=null")  # null: torch decides after a recompile
    assert compiled_with(pipe.unet)["dynamic"] is None


SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_the_scheduler_option_is_the_scheduler_that_runs(model, shared_pipeline):
    images = {}
    for name, (cls, settings) in SCHEDULERS.items():
        spec, pipe, _ = shared_pipeline(f"model={model}", f"scheduler={name}")
        assert type(pipe.scheduler) is cls
        assert {key: pipe.scheduler.config[key] for key in settings} == settings
        # built from the model's own scheduler config, not the class defaults
        assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
        images[name] = run(spec, pipe)
    for a, b in [("ddim", "dpmpp_2m"), ("ddim", "euler"), ("dpmpp_2m", "euler")]:
        assert np.abs(images[a] - images[b]).max() > 1e-3, f"scheduler={a} and scheduler={b} gave the same image"


def test_negative_prompt_reaches_the_pipeline(shared_pipeline):
    spec, pipe, _ = shared_pipeline()
    plain = run(spec, pipe)
    negative_spec = sdbuild.compose([*FAST, "run.negative_prompt=blurry low quality"])
    negative = run(negative_spec, pipe)
    assert np.abs(negative - plain).max() > 1e-3
    # the same as giving diffusers the negative prompt directly
    by_hand = pipe(**call_kwargs(spec, pipe, "cpu"), negative_prompt=["blurry low quality"]).images
    np.testing.assert_array_equal(negative, by_hand)


def test_sdbuild_matches_the_same_pipeline_written_by_hand(model_cache, shared_pipeline):
    """The seed's baseline, hand-written with diffusers, gives the very same pixels."""
    spec, pipe, _ = shared_pipeline("attention=classic", "precision=fp32")
    spec = sdbuild.compose([*FAST, "attention=classic", "precision=fp32", "run.seed=3"])
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
    fresh_spec, fresh_pipe, _ = built("attention=classic")  # not shared: a fresh load
    np.testing.assert_array_equal(run(classic_spec, classic_pipe), run(fresh_spec, fresh_pipe))
