"""The transformer families (Flux, SD3) on their embedded tiny models: each builds from safetensors, runs, and
gives the very pixels of the same pipeline written by hand with diffusers; wrong combinations are
refused before any weights load."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, T5Tokenizer

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.models import ensure_model
from sdbuild.validate import validate

from conftest import FAST
from helpers import CPU, composed, run


def test_tiny_flux_has_every_component_of_the_real_layout_in_safetensors(shared_pipeline):
    spec, pipe, info = shared_pipeline("model=tiny_flux")
    assert type(pipe) is FluxPipeline and isinstance(pipe.transformer, FluxTransformer2DModel)
    assert pipe.transformer.config.guidance_embeds and pipe.transformer.transformer_blocks
    assert pipe.transformer.single_transformer_blocks
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer_2, T5Tokenizer) and pipe.vae.config.latent_channels == 16
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.use_dynamic_shifting
    folder = Path(ensure_model(spec.model, None))
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert list((folder / part).glob("*.safetensors")), part
    assert not list(folder.glob("**/*.bin"))  # no pickles anywhere
    assert info.attention_kernel["processor"] == "FluxAttnProcessor"
    images = run(spec, pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01


def test_tiny_flux_matches_the_same_pipeline_written_by_hand(shared_pipeline):
    """No-cache fp32 baseline: sdbuild's image is byte-identical to diffusers' FluxPipeline called by hand."""
    spec, pipe, _ = shared_pipeline("model=tiny_flux")
    spec = sdbuild.compose([*FAST, "model=tiny_flux", "run.seed=3"])
    ours = run(spec, pipe)

    by_hand = FluxPipeline.from_pretrained(ensure_model(spec.model, None), use_safetensors=True)
    by_hand.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    latents = FluxPipeline._pack_latents(noise, 1, 16, 8, 8)
    theirs = by_hand("a photo of an astronaut riding a horse on mars", num_inference_steps=4, guidance_scale=7.5,
                     height=64, width=64, latents=latents, output_type="np").images
    np.testing.assert_array_equal(ours, theirs)


def test_flux_guidance_is_an_embedding_not_a_second_batch(shared_pipeline):
    """Flux is guidance-distilled: one transformer pass per step (batch 1, no CFG), guidance passed in."""
    spec, pipe, _ = shared_pipeline("model=tiny_flux")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].tolist())),
        with_kwargs=True)
    try:
        strong = run(spec, pipe)
        weak = run(sdbuild.compose([*FAST, "model=tiny_flux", "run.guidance_scale=1.0"]), pipe)
    finally:
        handle.remove()
    assert seen[:4] == [(1, [7.5])] * 4 and seen[4:] == [(1, [1.0])] * 4
    assert np.abs(strong - weak).max() > 1e-3  # the embedding changes the image


def test_flux_max_sequence_length_is_the_t5_sequence_the_transformer_attends_over(shared_pipeline):
    """run.max_sequence_length reaches FluxPipeline: the transformer sees that many text tokens (512
    left unset), and the image changes with it (T5 reads fewer padding tokens)."""
    spec, pipe, _ = shared_pipeline("model=tiny_flux")
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        short = run(sdbuild.compose([*FAST, "model=tiny_flux", "run.max_sequence_length=32"]), pipe)
        full = run(sdbuild.compose([*FAST, "model=tiny_flux"]), pipe)
    finally:
        handle.remove()
    assert seen == [32] * 4 + [512] * 4
    assert np.abs(short - full).max() > 1e-4


@pytest.mark.parametrize("overrides,says", [
    (("model=tiny_flux", "scheduler=ddim"), "use scheduler=flow_euler"),
    (("model=tiny_flux", "scheduler=euler"), "use scheduler=flow_euler"),
    (("model=tiny", "scheduler=flow_euler"), "SD 1.x and SDXL use scheduler=ddim"),
    (("model=tiny_flux", "compile=trace"), "compile=inductor or compile=regional"),
    (("model=tiny_flux", "attention=sdpa_fused"), "attention=classic or sdpa"),
    (("model=tiny_flux", "vae=tiny"), "Use vae=full"),
    (("model=tiny_flux", "run.negative_prompt=blurry"), "Leave run.negative_prompt unset"),
    (("model=tiny", "run.max_sequence_length=48"), "Leave run.max_sequence_length unset with sd15 and sdxl"),
    (("model=tiny_flux", "run.max_sequence_length=0"), "run.max_sequence_length=0: must be >= 1"),
    (("model=tiny_flux", "run.max_sequence_length=513"), "run.max_sequence_length=513: must be <= 512"),
    (("model=tiny_sd3", "compile=regional"), "Use compile=inductor (the whole transformer) for SD3"),
])
def test_wrong_family_combinations_are_refused_with_what_to_use(overrides, says):
    with pytest.raises(SpecError) as err:
        validate(composed(*overrides), CPU)
    assert says in str(err.value)


def test_a_flux_model_defaults_to_flow_matching_and_composes_three_levels():
    for option, source in (("tiny_flux", "tiny"), ("flux", "pretrained"), ("flux_arch", "arch")):
        spec = sdbuild.compose([f"model={option}"])
        assert spec.model.family.name == "flux" and spec.model.source.name == source
        assert spec.scheduler.name == "flow_euler"
    assert sdbuild.compose(["model=tiny"]).scheduler.name == "ddim"


def test_ddim_on_flux_is_refused_before_any_weights_load(tmp_path):
    """The refusal comes from validation: no model folder is built or read."""
    spec = sdbuild.compose([*FAST, "model=tiny_flux", "scheduler=ddim", f"cache_dir={tmp_path / 'models'}"])
    row = sdbuild.run(spec, tmp_path / "run")
    assert row["status"] == "unsupported" and "flow_euler" in row["error"]
    assert not (tmp_path / "models").exists()


def test_tiny_sd3_has_three_text_encoders_and_classifier_free_guidance(shared_pipeline):
    spec, pipe, info = shared_pipeline("model=tiny_sd3")
    assert type(pipe) is StableDiffusion3Pipeline and isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel) and isinstance(pipe.tokenizer_3, T5Tokenizer)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    folder = Path(ensure_model(spec.model, None))
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert list((folder / part).glob("*.safetensors")), part
    assert info.attention_kernel["processor"] == "JointAttnProcessor2_0"
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        images = run(spec, pipe)
    finally:
        handle.remove()
    assert batches == [2] * 4  # unconditional + conditional, every step
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01


def test_tiny_sd3_matches_the_same_pipeline_written_by_hand(shared_pipeline):
    spec, pipe, _ = shared_pipeline("model=tiny_sd3")
    spec = sdbuild.compose([*FAST, "model=tiny_sd3", "run.seed=3", "run.negative_prompt=blurry"])
    ours = run(spec, pipe)

    by_hand = StableDiffusion3Pipeline.from_pretrained(ensure_model(spec.model, None), use_safetensors=True)
    by_hand.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    theirs = by_hand("a photo of an astronaut riding a horse on mars", negative_prompt="blurry", num_inference_steps=4,
                     guidance_scale=7.5, height=64, width=64, latents=latents, output_type="np").images
    np.testing.assert_array_equal(ours, theirs)


def test_an_sd3_model_defaults_to_flow_matching_and_refuses_ddim():
    for option, source in (("tiny_sd3", "tiny"), ("sd3", "pretrained"), ("sd3_arch", "arch")):
        spec = sdbuild.compose([f"model={option}"])
        assert spec.model.family.name == "sd3" and spec.model.source.name == source
        assert spec.scheduler.name == "flow_euler"
    with pytest.raises(SpecError) as err:
        validate(composed("model=tiny_sd3", "scheduler=ddim"), CPU)
    assert "use scheduler=flow_euler" in str(err.value)
    with pytest.raises(SpecError) as err:
        validate(composed("model=tiny_sd3", "cache=first_block"), CPU)
    assert "model family flux" in str(err.value) and "SD3's transformer has no CacheMixin" in str(err.value)


def test_compile_targets_the_transformer(shared_pipeline):
    """compile=inductor / regional reach Flux's transformer (read back without compiling: no call)."""
    _, pipe, _ = shared_pipeline("model=tiny_flux", "compile=regional")
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert pipe.transformer._compiled_call_impl is None  # regional: the blocks, not the whole model
    _, pipe, _ = shared_pipeline("model=tiny_flux", "compile=inductor")
    assert pipe.transformer._compiled_call_impl is not None
