"""run.inference_mode: the measured call runs under torch.inference_mode (on by default), with the
very pixels of the pipeline's own no_grad call."""

import json

import numpy as np
import pytest
import torch

import sdbuild
from sdbuild.families import denoiser
from sdbuild.job import pipeline_call
from sdbuild.run_inputs import call_kwargs

from conftest import FAST


@pytest.mark.parametrize("model", ["tiny", "tiny_flux"])
def test_inference_mode_is_on_in_the_call_and_changes_no_pixel(model, shared_pipeline):
    spec, pipe, _ = shared_pipeline(f"model={model}")
    assert spec.run.inference_mode  # the default
    seen = []
    handle = denoiser(pipe).register_forward_pre_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    try:
        on = pipeline_call(spec, pipe)(**call_kwargs(spec, pipe, "cpu")).images
        off_spec = sdbuild.compose([*FAST, f"model={model}", "run.inference_mode=false"])
        off = pipeline_call(off_spec, pipe)(**call_kwargs(off_spec, pipe, "cpu")).images
    finally:
        handle.remove()
    steps = spec.run.steps
    assert seen == [True] * steps + [False] * steps
    np.testing.assert_array_equal(on, off)


def test_the_row_records_it_and_the_image_is_the_same(tmp_path):
    rows = {}
    for flag in ("true", "false"):
        spec = sdbuild.compose([*FAST, f"run.inference_mode={flag}"])
        rows[flag] = sdbuild.run(spec, tmp_path / flag)
        assert rows[flag]["status"] == "ok"
    assert rows["true"]["spec"]["run"]["inference_mode"] is True
    assert rows["false"]["spec"]["run"]["inference_mode"] is False
    from PIL import Image

    images = [np.asarray(Image.open(tmp_path / flag / rows[flag]["image"])) for flag in ("true", "false")]
    np.testing.assert_array_equal(*images)
    assert json.loads((tmp_path / "true" / "result.json").read_text())["spec"]["run"]["inference_mode"] is True
