"""The models people actually have (issue 25): a model.path is never silently ignored, pickle weight
files are refused before anything loads, and a single-file .safetensors checkpoint loads offline."""

from pathlib import Path

import pytest

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.validate import Machine, validate

from conftest import FAST, run_cli

CPU = Machine(cuda=False, device_name="cpu", capability=None, packages=frozenset(), diffusers_version="0.42.1",
              c_compiler=True)


def refusal(*overrides) -> str:
    with pytest.raises(SpecError) as err:
        validate(sdbuild.compose(list(overrides)), CPU)
    return str(err.value)


@pytest.mark.parametrize("model,family", [("tiny", "sd15"), ("tiny_flux", "flux"), ("sd15_arch", "sd15")])
def test_a_path_with_a_random_weight_model_is_refused_not_ignored(model, family, tmp_path):
    text = refusal(f"model={model}", f"model.path={tmp_path}")
    assert f"model.path={tmp_path}" in text and "would ignore this path" in text
    assert f"model={family} model.path={tmp_path}" in text  # what to use instead


def test_the_cli_refuses_an_ignored_path_before_loading(tmp_path):
    cache = tmp_path / "cache"
    out = run_cli(f"model.path={tmp_path}/any_file", f"cache_dir={cache}", *FAST, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "would ignore this path" in out.stderr and "Traceback" not in out.stderr
    assert not cache.exists() or not any(cache.iterdir())  # the random model was never built


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
@pytest.mark.parametrize("option", ["model.path", "vae.path"])
def test_pickle_weight_files_are_refused_with_the_conversion(suffix, option, tmp_path):
    weights = tmp_path / f"model{suffix}"
    weights.write_bytes(b"\x80\x04not really a pickle")  # exists: the refusal is by format, not absence
    extra = ["vae=tiny"] if option == "vae.path" else []
    text = refusal("model=sd15", *extra, f"{option}={weights}")
    assert f"{option}={weights}" in text and "is a pickle file" in text and "runs any code" in text
    assert ".safetensors" in text
