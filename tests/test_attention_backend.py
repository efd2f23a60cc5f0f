"""attention.backend on the tiny Flux: each backend that runs on a CPU is the one diffusers' dispatcher
runs (counted at the dispatcher's own registry); the others are refused on a CPU before weights load."""

import numpy as np
import pytest
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.validate import validate

from helpers import CPU, composed, run

CPU_BACKENDS = {"dispatch_native": "native", "dispatch_math": "_native_math", "dispatch_flash": "_native_flash",
                "dispatch_flex": "flex"}


@pytest.fixture
def dispatcher_calls(monkeypatch):
    """Calls per backend of diffusers' attention dispatcher: every registered backend function wrapped
    (the real one still runs) for the length of a test."""
    calls = {}
    for name, fn in list(_AttentionBackendRegistry._backends.items()):
        def counted(*args, _fn=fn, _name=AttentionBackendName(name).value, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counted)
    return calls


@pytest.mark.parametrize("option,backend", CPU_BACKENDS.items())
def test_the_chosen_backend_is_the_one_the_dispatcher_runs(option, backend, shared_pipeline, dispatcher_calls):
    spec, pipe, info = shared_pipeline("model=tiny_flux", f"attention={option}")
    assert info.attention_kernel["backend"] == backend and info.attention_kernel["requested_backend"] == backend
    images = run(spec, pipe)
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert dispatcher_calls == {backend: blocks * spec.run.steps}  # every attention call, and only this backend
    default_spec, default_pipe, default_info = shared_pipeline("model=tiny_flux")
    assert default_info.attention_kernel["backend"] == "native"  # nothing set: the dispatcher's active backend
    assert np.abs(images - run(default_spec, default_pipe)).max() < 1e-3  # the same attention, another kernel


@pytest.mark.parametrize("option", ["dispatch_efficient", "dispatch_cudnn", "dispatch_flash_attn", "dispatch_flash_attn3",
                                    "dispatch_sage", "dispatch_xformers"])
def test_gpu_backends_are_refused_on_a_cpu_with_what_runs_there(option):
    with pytest.raises(SpecError) as err:
        validate(composed("model=tiny_flux", f"attention={option}"), CPU)
    text = str(err.value)
    assert f"attention={option}" in text and "needs CUDA" in text
    assert "On CPU use attention.backend=native, native_math, native_flash or flex" in text


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl", "tiny_sd3"])
def test_a_backend_on_a_model_whose_attention_skips_the_dispatcher_is_refused(model):
    with pytest.raises(SpecError) as err:
        validate(composed(f"model={model}", "attention=dispatch_math"), CPU)
    assert "needs diffusers >= 0.35, model family flux" in str(err.value)


def test_a_refused_backend_loads_no_weights(tmp_path):
    spec = sdbuild.compose(["model=tiny_flux", "attention=dispatch_cudnn", f"cache_dir={tmp_path / 'models'}"])
    row = sdbuild.run(spec, tmp_path / "run")
    assert row["status"] == "unsupported" and "needs CUDA" in row["error"]
    assert not (tmp_path / "models").exists()
