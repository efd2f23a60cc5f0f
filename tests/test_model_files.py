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


# --- variants ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variant_folders(tmp_path_factory):
    """The tiny SD 1.5 folder with an fp16 variant of every component beside its default files
    (save_pretrained(variant="fp16") of the fp16-cast pipeline), and one with the UNet's only."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline

    from sdbuild.models import ensure_model

    folder = Path(ensure_model(sdbuild.compose().model, None))
    root = tmp_path_factory.mktemp("variant")
    full, unet_only = root / "full", root / "unet_only"
    shutil.copytree(folder, full)
    StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16).save_pretrained(full, variant="fp16")
    shutil.copytree(folder, unet_only)
    shutil.copy(full / "unet" / "diffusion_pytorch_model.fp16.safetensors", unet_only / "unet")
    return folder, full, unet_only


def test_a_variant_loads_its_files_and_says_which_components_have_them(variant_folders):
    import torch

    from sdbuild.builder import build_pipeline

    folder, full, unet_only = variant_folders
    common = ["model=sd15", "run.steps=2", "run.device=cpu"]
    pipe, info = build_pipeline(sdbuild.compose([*common, f"model.path={full}", "model.variant=fp16"]), "cpu")
    default, _ = build_pipeline(sdbuild.compose([*common, f"model.path={full}"]), "cpu")
    weight, base = pipe.unet.conv_in.weight, default.unet.conv_in.weight
    assert weight.dtype == torch.float32  # the precision's dtype, read from the fp16 files
    assert torch.equal(weight, base.half().float()) and not torch.equal(weight, base)
    (note,) = [n for n in info.notes if n.startswith("model.variant")]
    assert "unet" in note and "vae" in note and "default" not in note, note
    mixed, info = build_pipeline(sdbuild.compose([*common, f"model.path={unet_only}", "model.variant=fp16"]), "cpu")
    (note,) = [n for n in info.notes if n.startswith("model.variant")]
    assert note.startswith("model.variant=fp16: unet from fp16 files;") and "vae" in note.split(";")[1]
    assert torch.equal(mixed.unet.conv_in.weight, weight) and torch.equal(mixed.vae.decoder.conv_in.weight,
                                                                         default.vae.decoder.conv_in.weight)


def test_a_variant_no_component_has_is_refused_before_loading(variant_folders):
    folder = variant_folders[0]
    text = refusal("model=sd15", f"model.path={folder}", "model.variant=fp16")
    assert "model.variant=fp16" in text and "no component" in text and "Drop model.variant" in text


def test_a_variant_with_a_random_model_or_a_bad_name_is_refused():
    assert "would ignore the variant" in refusal("model.variant=fp16")
    assert "is not a variant name" in refusal("model=sd15", "model.path=/tmp", "model.variant=fp16/../x")


# --- downloads on request ----------------------------------------------------------------------


def test_a_hub_id_not_in_the_cache_is_refused_naming_model_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache (read at each lookup)
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    text = refusal("model=sd15", "model.path=sdbuild-test/not-cached")
    assert "model.path=sdbuild-test/not-cached" in text and "model.download=true" in text


def test_model_download_where_it_cannot_apply_is_refused(tmp_path):
    assert "nothing to download" in refusal("model.download=true")
    assert "needs model.path to be a hub id" in refusal("model=sd15", f"model.path={tmp_path}", "model.download=true")


def test_an_unreachable_hub_is_a_clear_refusal(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    out = run_cli("model=sd15", "model.path=sdbuild-test/tiny-pipe", "model.download=true", *FAST, cwd=tmp_path,
                  env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert f"could not be downloaded from http://127.0.0.1:{port}" in text and "Traceback" not in text


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    """The embedded tiny SD 1.5 pipeline's saved folder as a hub repo, with a pickle beside the UNet's
    safetensors (a download must never fetch it)."""
    import shutil

    from sdbuild.models import ensure_model

    folder = Path(ensure_model(sdbuild.compose().model, None))
    repo = shutil.copytree(folder, tmp_path_factory.mktemp("hub") / "repo")
    (repo / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 a pickle: never fetched")
    return repo


def test_model_download_fetches_safetensors_and_configs_then_loads_offline(hub_repo, tmp_path):
    """model.download=true against a real HTTP server speaking the hub's API (tests/fake_hub.py), with
    huggingface_hub's own snapshot_download: the row is ok, only configs and safetensors were fetched
    (the .bin beside them was not), and a second run without model.download loads from the cache
    with the hub gone and HF_HUB_OFFLINE=1."""
    import json

    import numpy as np
    from PIL import Image

    from fake_hub import FakeHub

    common = ["model=sd15", "model.path=sdbuild-test/tiny-pipe", "run.steps=2", "run.warmup=0", "run.repeats=1",
              "run.height=64", "run.width=64", "run.device=cpu"]
    hf = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_DISABLE_XET": "1"}
    with FakeHub({"sdbuild-test/tiny-pipe": hub_repo}) as hub:
        first = run_cli(*common, "model.download=true", f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path,
                        env={**hf, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"})
        fetched = hub.fetched()
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    row = json.loads((tmp_path / "first" / "result.json").read_text())
    assert row["status"] == "ok", row.get("error")
    served = {p.relative_to(hub_repo).as_posix() for p in hub_repo.rglob("*") if p.is_file()}
    assert sorted(fetched) == sorted(served - {"unet/diffusion_pytorch_model.bin"}), fetched
    snapshot = next((tmp_path / "hf" / "hub" / "models--sdbuild-test--tiny-pipe" / "snapshots").iterdir())
    assert not list(snapshot.rglob("*.bin")) and (snapshot / "unet" / "diffusion_pytorch_model.safetensors").exists()

    second = run_cli(*common, f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path,
                     env={**hf, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "1"})  # the hub is shut down
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert json.loads((tmp_path / "second" / "result.json").read_text())["status"] == "ok"
    images = [np.asarray(Image.open(tmp_path / run / "image.png")) for run in ("first", "second")]
    assert images[0].std() > 0 and np.array_equal(images[0], images[1])
