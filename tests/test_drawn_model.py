"""model=tiny_drawn (issue 26): the shipped drawn pipeline loads through from_pretrained like every
model, and its rows carry the drawn reader's adherence score."""

import json

import pytest

import sdbuild
import sdbuild.drawn
from sdbuild.builder import build_pipeline
from sdbuild.job import adherence_fields

from conftest import run_cli

PROMPTS = "fidelity.prompts=[" + ",".join(p for p in __import__("sdbuild.drawn", fromlist=["x"]).ADHERENCE_PROMPTS[::3]) + "]"


def test_drawn_row_adherence_counts_every_image():
    spec = sdbuild.compose(["model=tiny_drawn", "run.steps=4", PROMPTS, "fidelity.seeds=[0,1]", "fidelity.batch=4"])
    pipe, _ = build_pipeline(spec)
    record = adherence_fields(spec, pipe, "cpu")
    assert record["images"] == 20 and all(0.0 <= record[k] <= 1.0 for k in ("score", "digit", "colour", "background"))


def test_drawn_model_loads_its_shipped_weights():
    from sdbuild.models import model_folder

    spec = sdbuild.compose(["model=tiny_drawn"])
    pipe, info = build_pipeline(spec)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.vae).__name__ == "AutoencoderTiny"
    assert model_folder(spec.model, None).endswith("sdbuild/data/tiny_drawn")
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_other_models_have_no_adherence(shared_pipeline):
    spec, pipe, _ = shared_pipeline()
    assert adherence_fields(spec, pipe, "cpu") is None


@pytest.mark.slow
def test_cli_row_records_adherence(tmp_path):
    done = run_cli("model=tiny_drawn", "run.steps=20", "run.warmup=0", "run.repeats=1", PROMPTS,
                   f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((tmp_path / "result.json").read_text())
    assert row["status"] == "ok" and row["adherence"]["images"] == 20  # 10 prompts x the default seeds 0, 1
    assert 0.0 <= row["adherence"]["score"] <= 1.0


# ---------------------------------------------------------------------------------------------
# What the shipped drawn model draws (BENCHMARKS.md: its training and its measured baseline)

# The baseline's adherence, measured when the weights were trained (BENCHMARKS.md), less a margin for
# other seeds and BLAS builds: a floor that the shipped model clears and the earlier ones (0.000, then
# 0.367 on 120 images and 0.500 on these 30) do not.
BASELINE_FLOOR = 0.7  # measured: 0.875 on 120 images (BENCHMARKS.md), 1.000 on these 30
FLOOR_PROMPTS = "fidelity.prompts=[" + ",".join(sdbuild.drawn.ADHERENCE_PROMPTS[::2]) + "]"  # 15 prompts


def _score(*overrides, model="tiny_drawn"):
    spec = sdbuild.compose([f"model={model}", FLOOR_PROMPTS, "fidelity.seeds=[7,8]", "fidelity.batch=30",
                            *overrides])
    pipe, _ = build_pipeline(spec)
    return adherence_fields(spec, pipe, "cpu")


@pytest.mark.slow
def test_the_drawn_baseline_scores_above_its_floor_on_held_out_seeds():
    """fp32, 50 DDIM steps, guidance 7.5: 15 prompts x 2 seeds the training never drew."""
    record = _score("run.steps=50")
    assert record["images"] == 30
    assert record["score"] >= BASELINE_FLOOR, record


@pytest.mark.slow
def test_a_cache_that_reuses_every_step_draws_measurably_worse():
    """DeepCache with cache.interval equal to the steps runs the whole UNet once and reuses its deep
    features for every later step: a broken lever. Its score must fall well below the baseline's;
    if the score did not move, the adherence pass would not be seeing the lever at all."""
    base = _score("run.steps=50")["score"]
    broken = _score("run.steps=50", "cache=deepcache", "cache.interval=50")["score"]
    assert broken <= base - 0.2, (base, broken)  # measured at training: 1.000 -> 0.300 (30 images)


def test_the_drawn_model_draws_its_own_prompt_by_default():
    """`python -m sdbuild model=tiny_drawn` (no run.prompt) draws a prompt of the drawn set, so its
    image is a digit the reader (and a person) can read; run.prompt still wins when given."""
    spec = sdbuild.compose(["model=tiny_drawn"])
    label = sdbuild.drawn.parse_prompt(spec.run.prompt)
    assert sdbuild.compose(["model=tiny_drawn", "run.prompt=a blue 3 on a red background"]).run.prompt.startswith("a blue 3")
    assert sdbuild.compose([]).run.prompt == "a photo of an astronaut riding a horse on mars"
    pipe, info = build_pipeline(sdbuild.compose(["model=tiny_drawn", "run.steps=50"]))
    from sdbuild.run_inputs import call_kwargs

    image = pipe(**{**call_kwargs(spec, pipe, "cpu"), "output_type": "np"}).images
    assert sdbuild.drawn.read((image * 255).round().astype("uint8"))[0] == label


# ---------------------------------------------------------------------------------------------
# The drawn Flux (model=tiny_flux_drawn): the tiny Flux layout trained on the same set, for the
# transformer levers (diffusers' step caches) that the drawn SD model cannot run.

def test_drawn_flux_loads_its_shipped_weights_and_its_t5_sequence():
    from sdbuild.models import model_folder
    from sdbuild.run_inputs import call_kwargs

    spec = sdbuild.compose(["model=tiny_flux_drawn", "run.steps=2"])
    assert spec.scheduler.name == "flow_euler" and spec.run.max_sequence_length == 48
    pipe, _ = build_pipeline(spec)
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.vae).__name__ == "AutoencoderTiny"
    assert model_folder(spec.model, None).endswith("sdbuild/data/tiny_flux_drawn")
    assert pipe.vae_scale_factor == 4  # read from the VAE's block_out_channels, written at training
    kwargs = call_kwargs(spec, pipe, "cpu")
    assert kwargs["max_sequence_length"] == 48 and kwargs["latents"].shape == (1, 64, 16)  # 8x8 tokens of 2x2x4


def test_drawn_flux_shapes_come_from_its_own_folder():
    """The parallel rules' head and token counts of a drawn model are its shipped configs' (4 heads,
    a 4x VAE: 64 image tokens at 64x64, the 48 T5 tokens it runs with), not the random tiny layout's."""
    from sdbuild.capabilities import parallel_shapes

    drawn = parallel_shapes(sdbuild.compose(["model=tiny_flux_drawn", "parallel=ulysses"]))
    assert drawn == {"heads": 4, "image_tokens": 64, "text_tokens": 48}
    assert parallel_shapes(sdbuild.compose(["model=tiny_flux", "parallel=ulysses"])) == {
        "heads": 2, "image_tokens": 16, "text_tokens": 512}


def test_drawn_flux_row_adherence_counts_every_image():
    spec = sdbuild.compose(["model=tiny_flux_drawn", "run.steps=3", PROMPTS, "fidelity.seeds=[0]", "fidelity.batch=5"])
    pipe, _ = build_pipeline(spec)
    record = adherence_fields(spec, pipe, "cpu")
    assert record["images"] == 10 and all(0.0 <= record[k] <= 1.0 for k in ("score", "digit", "colour", "background"))


# The drawn Flux's baseline, measured when its weights were trained (BENCHMARKS.md), less a margin for
# other BLAS builds: measured 0.867 on 120 images (BENCHMARKS.md), 0.967 on these 30; the broken cache
# below 0.767 on these 30 (its first step's prediction already shows the digit: it draws, blurred).
FLUX_BASELINE_FLOOR = 0.7
FLUX_DROP = 0.1


@pytest.mark.slow
def test_the_drawn_flux_baseline_scores_above_its_floor_on_held_out_seeds():
    """fp32, 50 flow-Euler steps, guidance embedding 7.5: 15 prompts x 2 seeds the training never drew."""
    record = _score("run.steps=50", model="tiny_flux_drawn")
    assert record["images"] == 30
    assert record["score"] >= FLUX_BASELINE_FLOOR, record


@pytest.mark.slow
def test_a_transformer_cache_that_reuses_every_step_draws_measurably_worse():
    """first_block with a threshold no step's change reaches: from the second step on, every step
    reuses the cached residual of the blocks after the first (diffusers' FirstBlockCache). Adherence
    must fall well below the drawn Flux's baseline, or the pass would not be seeing the lever."""
    base = _score("run.steps=50", model="tiny_flux_drawn")["score"]
    broken = _score("run.steps=50", "cache=first_block", "cache.threshold=100", model="tiny_flux_drawn")["score"]
    assert broken <= base - FLUX_DROP, (base, broken)


def test_the_drawn_flux_draws_its_own_prompt_by_default():
    """`python -m sdbuild model=tiny_flux_drawn` draws the prompt its config sets, read back by the reader."""
    spec = sdbuild.compose(["model=tiny_flux_drawn"])
    label = sdbuild.drawn.parse_prompt(spec.run.prompt)
    pipe, _ = build_pipeline(spec)
    from sdbuild.run_inputs import call_kwargs

    image = pipe(**call_kwargs(spec, pipe, "cpu")).images
    assert sdbuild.drawn.read((image * 255).round().astype("uint8"))[0] == label
