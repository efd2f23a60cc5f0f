"""A shared spec is data, never code: unknown keys are refused (also with `+`), weights come from
local safetensors only, and sizes and paths are checked before anything loads."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.models import ensure_model
from sdbuild.spec import to_spec
from sdbuild.validate import Machine, validate

from conftest import FAST, ROOT, run_cli

CPU = Machine(cuda=False, device_name="cpu", capability=None, packages=frozenset(), diffusers_version="0.42.1",
              c_compiler=True)


def refusal(overrides, machine=CPU) -> str:
    with pytest.raises(SpecError) as err:
        validate(sdbuild.compose(overrides), machine)
    return str(err.value)


@pytest.mark.parametrize("override,key,nearest", [
    ("+precison=fp16", "precison", "precision"),
    ("+run.stepz=3", "run.stepz", "run.steps"),
    ("+attention.fuse_qvk=true", "attention.fuse_qvk", "attention.fuse_qkv"),
    ("++compile.cache=/tmp/x", "compile.cache", "compile.cache_dir"),
])
def test_unknown_key_added_with_plus_is_refused(override, key, nearest):
    with pytest.raises(SpecError) as err:
        sdbuild.compose([override])
    assert f"{key}:" in str(err.value) and f"Did you mean {nearest}?" in str(err.value)


def test_every_unknown_key_is_named_at_once_and_known_ones_pass():
    with pytest.raises(SpecError) as err:
        sdbuild.compose(["+precison=fp16", "+run.stepz=3", "run.steps=3"])
    assert "precison" in str(err.value) and "run.stepz" in str(err.value)
    assert sdbuild.compose(["run.steps=3", "+preset=cpu_best"]).run.steps == 3  # a real group with `+` still works


def test_a_recorded_spec_with_an_unknown_key_is_refused():
    spec = sdbuild.spec.spec_to_dict(sdbuild.compose())
    assert to_spec(spec) == sdbuild.compose()
    spec["run"]["stepz"] = 3
    with pytest.raises(SpecError, match=r"run\.stepz.*Did you mean run\.steps"):
        to_spec(spec)


def test_cli_refuses_an_unknown_key_before_running(tmp_path):
    out = run_cli("+precison=fp16", f"hydra.run.dir={tmp_path}", *FAST)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "precison" in out.stderr and "Did you mean precision?" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "result.json").exists()  # nothing was built or measured


def test_a_sweep_with_an_unknown_key_makes_each_job_a_refused_row(tmp_path):
    """A key no job knows is refused in every job, each an `unsupported` row naming it (a refused job
    is a row and the sweep goes on: issue 27 defect 2); nothing is measured."""
    out = run_cli("--multirun", "+run.stepz=3", "precision=fp32,bf16", f"hydra.sweep.dir={tmp_path}", *FAST)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    found = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/result.json"))]
    assert len(found) == 2 and all(r["status"] == "unsupported" and "run.stepz" in r["error"] for r in found)
    assert all(r.get("latency_s") is None for r in found)


# Weights: local safetensors only, every component --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder():
    return Path(ensure_model(sdbuild.compose().model, None))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_complete_local_folder_passes(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "sd")
    assert validate(sdbuild.compose(["model=sd15", f"model.path={folder}"]), CPU) == "cpu"


def test_each_component_needs_its_own_safetensors(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "sd")
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "vae" / "diffusion_pytorch_model.safetensors").rename(folder / "stray.safetensors")
    text = refusal(["model=sd15", f"model.path={folder}"])
    assert "no .safetensors weights in vae/, text_encoder/" in text and "model.path=" in text


def test_sdxl_needs_its_second_text_encoder(tiny_folder, tmp_path):
    folder = copy_model(tiny_folder, tmp_path / "sd")  # an SD 1.x folder has no text_encoder_2/
    assert "text_encoder_2/" in refusal(["model=sdxl", f"model.path={folder}"])


def test_weights_that_are_no_files_and_an_empty_model_index_are_refused(tiny_folder, tmp_path):
    for case in ("fifo", "dev_zero", "empty_index"):
        folder = copy_model(tiny_folder, tmp_path / case)
        weights = next((folder / "unet").glob("*.safetensors"))
        if case == "fifo":
            weights.unlink()
            os.mkfifo(weights)  # loading it would block forever
        elif case == "dev_zero":
            weights.unlink()
            weights.symlink_to("/dev/zero")  # loading it would read forever
        else:
            (folder / "model_index.json").write_text("{}")
        text = refusal(["model=sd15", f"model.path={folder}"])
        assert f"model.path={folder}" in text
        assert ("no _class_name" if case == "empty_index" else f"{weights} is not a regular file") in text, text


def test_vae_path_is_checked_too(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    text = refusal(["vae=tiny", f"vae.path={tmp_path}"])
    assert f"vae.path={tmp_path}" in text and "no .safetensors" in text


HF_ENV_CODE = """
import sys, sdbuild
from sdbuild.errors import SpecError
spec = sdbuild.compose(["model=sd15", "model.path=" + sys.argv[1], "run.steps=2", "run.device=cpu"])
try:
    pipe = sdbuild.build(spec)
except SpecError as exc:
    print("REFUSED", exc)
else:
    print("BUILT", type(pipe).__name__)
"""


def run_offline(hub_id: str, hf_cache: Path):
    """Build in a fresh process whose Hugging Face cache is `hf_cache` and whose hub endpoint is a
    local socket that counts connections and drops them: returns the output and how often the
    network was tried (huggingface_hub falls back to its cache when the hub fails, so a load that
    succeeds says nothing by itself)."""
    tries = []
    with socket.socket() as hub:
        hub.bind(("127.0.0.1", 0))
        hub.listen(16)
        hub.settimeout(0.2)

        def count():
            while not done.is_set():
                try:
                    conn, _ = hub.accept()
                except OSError:
                    continue
                tries.append(1)
                conn.close()

        done = threading.Event()
        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}"}
        env.pop("HF_HUB_OFFLINE", None)
        try:
            out = subprocess.run([sys.executable, "-c", HF_ENV_CODE, hub_id], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600)
        finally:
            done.set()
            counter.join()
    return out, len(tries)


def test_hub_id_loads_from_the_local_cache_only(tiny_folder, tmp_path):
    """A hub id in the cache loads without a single connection to the hub; one not in the cache
    is refused before loading, saying how to get it."""
    repo = tmp_path / "hub" / "models--team--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    copy_model(tiny_folder, repo / "snapshots" / ("0" * 40))
    out, contacted = run_offline("team/tiny-sd", tmp_path / "hub")
    assert "BUILT StableDiffusionPipeline" in out.stdout, out.stdout + out.stderr
    assert not contacted, "loading a cached hub id tried the network"
    out, contacted = run_offline("team/not-cached", tmp_path / "hub")
    assert "REFUSED" in out.stdout and "not in the local Hugging Face cache" in out.stdout, out.stdout + out.stderr
    assert "hf download team/not-cached" in out.stdout and not contacted


# Sizes and paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,needle", [
    (["run.height=80000"], "run.height=80000: must be a positive multiple of 8 (the VAE downsamples 8x), at most 4096"),
    (["run.width=100"], "Use run.width=96"),
    (["run.batch_size=100000"], "run.batch_size=100000"),
    (["resume=/nonexistent/sweep"], "resume=/nonexistent/sweep: is not a folder"),
])
def test_sizes_and_paths_name_the_option(overrides, needle):
    assert needle in refusal(overrides)


@pytest.mark.parametrize("option", ["cache_dir", "compile.cache_dir"])
def test_a_cache_dir_that_is_a_file(option, tmp_path):
    (tmp_path / "file").write_text("")
    assert f"{option}={tmp_path / 'file'}: is a file, not a folder" in refusal([f"{option}={tmp_path / 'file'}"])


# The Hydra release sdbuild asks for ---------------------------------------------------------------


def test_hydra_with_the_instantiate_blocklist_is_required():
    """Hydra instantiates `hydra.callbacks`, launchers and sweepers from config: sdbuild asks for
    the 1.3 release that refuses dangerous targets (1.3.4), and the installed one does."""
    pin = re.search(r'"hydra-core>=([\d.]+),<1\.4"', (ROOT / "pyproject.toml").read_text())
    assert pin and tuple(map(int, pin.group(1).split("."))) >= (1, 3, 4)
    assert tuple(map(int, metadata.version("hydra-core").split(".")[:3])) >= (1, 3, 4)
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    with pytest.raises(InstantiationException, match="blocklisted"):
        instantiate({"_target_": "os.system", "_args_": ["true"]})


def test_recorded_spec_is_plain_json():
    """What result.json records (and replay reads) is data: only JSON scalars, lists and dicts."""
    spec = sdbuild.spec.spec_to_dict(sdbuild.compose(["precision=bf16"]))
    assert json.loads(json.dumps(spec)) == spec


# Config reuse across teams: a team's own folder or package on Hydra's search path -----------------

TEAM_CONF = ROOT / "tests" / "data" / "team_conf"
TEAM_PKG = ROOT / "tests" / "data" / "team_pkg"


def test_a_team_folder_adds_presets_and_models_without_copying():
    spec = sdbuild.compose([f"hydra.searchpath=[file://{TEAM_CONF}]", "+preset=team_fast", "model=team_tiny"])
    assert (spec.preset, spec.precision.name, spec.attention.name, spec.run.steps) == ("team_fast", "bf16", "sdpa", 20)
    assert (spec.model.name, spec.model.resolution) == ("team_tiny", 128)
    assert not (ROOT / "conf" / "preset" / "team_fast.yaml").exists()  # found where the team keeps it
    with pytest.raises(Exception, match="team_tiny"):
        sdbuild.compose(["model=team_tiny"])  # and only through the search path


def test_a_team_package_adds_presets(monkeypatch):
    monkeypatch.syspath_prepend(str(TEAM_PKG))
    spec = sdbuild.compose(["hydra.searchpath=[pkg://team_sdbuild_conf]", "+preset=team_pkg_sdpa"])
    assert spec.preset == "team_pkg_sdpa" and spec.attention.name == "sdpa"


def test_cli_runs_a_team_preset_on_a_team_model(tmp_path):
    out = run_cli(f"hydra.searchpath=[file://{TEAM_CONF}]", "+preset=team_fast", "model=team_tiny", "precision=fp32",
                  *FAST, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "result.json").read_text())
    assert row["status"] == "ok" and row["preset"] == "team_fast"
    assert row["choices"]["model"] == "team_tiny" and row["choices"]["attention"] == "sdpa"
    assert row["spec"]["run"]["steps"] == 4  # the command line still wins over the preset
    assert (tmp_path / "image.png").exists()


@pytest.mark.slow  # 2 jobs of 50 steps in their own processes: ~30 s on a quiet machine, 15 min on a loaded one
def test_the_team_sweep_of_the_docs_runs_word_for_word_in_the_default_mode(tmp_path):
    """docs/teams-and-safety.md's team sweep, as written there, in the default mode (each job in a
    process of its own): both jobs run the team's preset (before: "Could not find 'preset/team_pkg_sdpa'")."""
    import shlex

    doc = (ROOT / "docs" / "teams-and-safety.md").read_text()
    (line,) = [ln for ln in doc.splitlines() if ln.startswith("python -m sdbuild --multirun") and "pkg://" in ln]
    argv = shlex.split(line)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TEAM_PKG), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    found = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/*/*/result.json")]
    assert sorted(r["spec"]["precision"]["name"] for r in found) == ["bf16", "fp32"], out.stdout[-3000:]
    for row in found:
        assert row["status"] == "ok" and row["job"]["isolated"], row["error"]
        assert row["preset"] == "team_pkg_sdpa" and row["choices"]["attention"] == "sdpa"


# --help, one refusal, the package docstring ---------------------------------------------------------


def help_text(*args) -> str:
    out = run_cli(*args, "--help")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_says_what_sdbuild_is_lists_groups_and_an_example():
    text = help_text()
    assert text.startswith("sdbuild: declarative, measured diffusion pipelines.")
    assert "powered by Hydra" not in text
    assert "precision: bf16, bf16_vae32, fp16, fp16_vae32, fp32, tf32" in text
    assert "preset: cpu_best," in text and "hydra:" not in text
    assert "python -m sdbuild --multirun precision=fp32,bf16 attention=classic,sdpa" in text


def test_fast_help_is_what_hydra_renders_from_the_same_template():
    """A bare --help skips Hydra's composition of every option; with an override Hydra renders
    the same template itself. Both must say the same thing."""
    assert help_text().strip() == help_text("run.steps=3").strip()


def test_a_refusal_is_printed_once(tmp_path):
    out = run_cli("precision=fp16", "run.device=cpu", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert (out.stdout + out.stderr).count("needs CUDA") == 1, out.stdout + out.stderr


def test_the_package_docstring_example_runs_on_cpu():
    import ast

    line = next(line for line in sdbuild.__doc__.splitlines() if "sdbuild.compose(" in line)
    overrides = ast.literal_eval(re.search(r"compose\((\[.*?\])\)", line).group(1))
    assert validate(sdbuild.compose(overrides), CPU) == "cpu"


# A compile cache folder is code (issue 27, defect 7) ------------------------------------------------


def _cache_with_entry(tmp_path):
    cache = tmp_path / "cache"
    (cache / "fxgraph" / "ab").mkdir(parents=True)
    entry = cache / "fxgraph" / "ab" / "entry"
    entry.write_bytes(b"planted")
    return cache, entry


@pytest.mark.parametrize("planted, said", [
    ("world-writable entry", "which is writable by every user"),
    ("entry of another user", "which is owned by user 54321"),
    ("entry of another group", "which is writable by group 54321"),
    ("world-writable folder", "cache: is writable by every user"),
    ("folder of another user", "cache: is owned by user 54321"),
    ("link inside", "which is a symbolic link"),
    ("world-writable parent", "which is writable by every user"),
])
def test_a_compile_cache_folder_someone_else_can_write_is_refused(planted, said, tmp_path):
    """torch unpickles FX-graph/AOTAutograd entries and loads compiled kernels from compile.cache_dir:
    a folder (or an entry in it, or a folder above it) that another user can write is refused before
    anything loads, naming the option, the reason and a folder of one's own (before: any folder)."""
    if "another" in planted and os.geteuid() != 0:
        pytest.skip("giving a file to another user or group needs root")
    cache, entry = _cache_with_entry(tmp_path)
    overrides = ["compile=inductor_cached", f"compile.cache_dir={cache}"]
    assert validate(sdbuild.compose(overrides), CPU) == "cpu"  # one's own folder: used
    if planted == "world-writable entry":
        entry.chmod(0o666)
    elif planted == "entry of another user":
        os.chown(entry, 54321, -1)
    elif planted == "entry of another group":
        os.chown(entry, -1, 54321)
        entry.chmod(0o664)
    elif planted == "world-writable folder":
        cache.chmod(0o777)
    elif planted == "folder of another user":
        os.chown(cache, 54321, -1)
    elif planted == "link inside":
        (cache / "fxgraph" / "link").symlink_to(tmp_path)
    elif planted == "world-writable parent":
        tmp_path.chmod(0o777)
    message = refusal(overrides)
    assert f"compile.cache_dir={cache}" in message and said in message and "Set compile.cache_dir to a folder of your own" in message


def test_a_new_compile_cache_folder_in_a_sticky_tmp_is_accepted(tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert validate(sdbuild.compose(["compile=inductor_cached", f"compile.cache_dir={sticky / 'new' / 'c'}"]), CPU) == "cpu"
