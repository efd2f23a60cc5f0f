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


# --- single-file checkpoints -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_single_file(tmp_path_factory):
    """The embedded tiny SD 1.5 pipeline's weights as one file in the original (LDM) key layout,
    and its diffusers folder (the layout the file is loaded with)."""
    from ldm_layout import write_single_file
    from sdbuild.models import ensure_model

    import shutil

    folder = Path(ensure_model(sdbuild.compose().model, None))
    root = tmp_path_factory.mktemp("ckpt")
    layout = shutil.copytree(folder, root / "layout", ignore=shutil.ignore_patterns("*.safetensors"))  # configs only
    return write_single_file(folder, root / "tiny-sd15.safetensors"), folder, layout


def test_a_single_file_checkpoint_loads_offline_and_gives_the_folders_image(tiny_single_file, monkeypatch):
    import numpy as np

    from helpers import run

    checkpoint, folder, layout = tiny_single_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the layout comes from model.config, never from a hub
    common = ["run.steps=2", "run.device=cpu", "run.height=64", "run.width=64"]
    file_spec = sdbuild.compose(["model=sd15", f"model.path={checkpoint}", f"model.config={layout}", *common])  # no weights in it
    folder_spec = sdbuild.compose(["model=sd15", f"model.path={folder}", *common])
    assert validate(file_spec, CPU) == "cpu"
    images = [run(spec, sdbuild.build(spec)) for spec in (file_spec, folder_spec)]
    assert images[0].std() > 0 and np.array_equal(images[0], images[1])


def test_a_single_file_checkpoint_needs_a_local_layout(tiny_single_file, tmp_path):
    checkpoint, folder, _ = tiny_single_file
    text = refusal("model=sd15", f"model.path={checkpoint}")
    assert f"model.path={checkpoint}" in text and "model.config=" in text and "never asks a hub" in text
    text = refusal("model=sd15", f"model.path={checkpoint}", f"model.config={tmp_path}")
    assert f"model.config={tmp_path}" in text and "is not a diffusers folder" in text
    missing = tmp_path / "absent.safetensors"
    assert "does not exist" in refusal("model=sd15", f"model.path={missing}", f"model.config={folder}")
