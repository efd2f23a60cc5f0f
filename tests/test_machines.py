"""Target machines (conf/machine/): validate a spec against a machine this process is not on.

A profile is a plain description (CUDA, capability, memory, cuDNN, packages, toolchain). A dry run
plans against it; a real run with it is refused unless this machine is the one it describes. The
CUDA rules of capabilities.py and the attention lever are checked here through the profiles, on CPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import sdbuild
from sdbuild import validate as validate_mod
from sdbuild.errors import SpecError
from sdbuild.spec import MachineSpec, spec_key, spec_to_dict
from sdbuild.validate import Machine, validate

from conftest import ROOT

CONF = ROOT / "conf"
PROFILES = sorted(p.stem for p in (CONF / "machine").glob("*.yaml"))
TEAM_CONF = ROOT / "tests" / "data" / "team_conf"


def planned(*overrides):
    """The spec of a dry run with these overrides."""
    return sdbuild.compose(["dry_run=true", *overrides])


def machine_of(name, *overrides):
    return Machine.from_profile(planned(f"machine={name}", *overrides).machine)


def refusal(*overrides, machine=None):
    with pytest.raises(SpecError) as err:
        validate(planned(*overrides), machine)
    return str(err.value)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sdbuild", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


# The group and its files --------------------------------------------------------------------------


def test_the_machine_group_has_local_by_default_and_the_named_profiles():
    assert {"local", "h100", "h200", "a100", "l40s", "rtx4090", "cpu"} <= set(PROFILES)
    spec = sdbuild.compose([])
    assert spec.machine.name == "local" and spec.machine.probe


@pytest.mark.parametrize("name", PROFILES)
def test_every_machine_profile_composes_into_a_machine(name):
    spec = planned(f"machine={name}")
    assert spec.machine.name == name
    if name == "local":
        assert spec.machine.probe
        return
    machine = Machine.from_profile(spec.machine)
    assert not spec.machine.probe and machine.profile == name
    assert machine.host_memory and machine.host_memory > 8 * 1024 ** 3
    if machine.cuda:  # a GPU profile states what the CUDA rules ask
        assert machine.capability and len(machine.capability) == 2 and machine.gpu_memory > 8 * 1024 ** 3
        assert machine.cudnn_version and machine.cudnn_version >= (8, 9)
        assert {"accelerate", "torchao", "xformers"} <= machine.packages
        assert all(machine.package_versions.get(p) for p in machine.packages)  # versions stated
    validate(spec)  # the default spec plans on every machine


def test_profile_facts_reach_the_machine():
    h200 = machine_of("h200")
    assert (h200.cuda, h200.capability, h200.cudnn_version) == (True, (9, 0), (9, 10, 2))
    assert round(h200.gpu_memory / 1024 ** 3) == 140 and "flash_attn_3" in h200.packages
    assert h200.package_versions["flash_attn"] == "2.8.3" and not h200.probed
    cpu = machine_of("cpu")
    assert not cpu.cuda and cpu.capability is None and "xformers" not in cpu.packages


def test_a_team_adds_its_own_machine_on_the_search_path():
    spec = sdbuild.compose([f"hydra.searchpath=[file://{TEAM_CONF}]", "machine=team_gpu", "dry_run=true"])
    machine = Machine.from_profile(spec.machine)
    assert machine.device_name.startswith("Tesla V100") and machine.capability == (7, 0)
    with pytest.raises(SpecError, match=r"compute capability >= 8\.0, but Tesla V100-SXM2-16GB is 7\.0"):
        validate(sdbuild.compose([f"hydra.searchpath=[file://{TEAM_CONF}]", "machine=team_gpu", "dry_run=true",
                                  "precision=bf16"]))
    with pytest.raises(Exception, match="team_gpu"):
        sdbuild.compose(["machine=team_gpu"])  # only through the search path


def test_the_machine_is_not_part_of_a_rows_identity():
    keys = {spec_key(spec_to_dict(sdbuild.compose([f"machine={name}"]))) for name in PROFILES}
    assert len(keys) == 1
    assert spec_to_dict(sdbuild.compose(["machine=h100"]))["machine"]["name"] == "h100"  # but recorded


# Dry runs plan against the profile; real runs refuse it ---------------------------------------------


def test_a_dry_run_validates_against_the_profile_not_this_machine():
    h100 = ["machine=h100", "precision=bf16", "attention=sdpa_flash", "compile=inductor"]
    assert validate(planned(*h100)) == "cuda"  # this process has no GPU
    assert "this machine has no CUDA GPU" in refusal("machine=cpu", "precision=fp16")
    assert "compute capability >= 8.9, but NVIDIA A100-SXM4-80GB is 8.0" in refusal("machine=a100", "quant=fp8dq",
                                                                                   "precision=bf16")
    validate(planned("machine=l40s", "quant=fp8dq", "precision=bf16"))
    fa3 = ["model=tiny_flux", "precision=bf16", "attention=dispatch_flash_attn3"]
    assert "but NVIDIA A100-SXM4-80GB is 8.0" in refusal("machine=a100", *fa3)
    validate(planned("machine=h100", *fa3))


def test_the_profiles_memory_is_checked():
    big = ["model=sd15_arch", "precision=bf16", "run.batch_size=32", "run.height=2048", "run.width=2048"]  # a 69 GB decode
    assert "more than the 25 GB of GPU memory" in refusal("machine=rtx4090", *big)
    validate(planned("machine=h200", *big))


def test_a_real_run_with_a_profile_is_refused_on_another_machine():
    spec = sdbuild.compose(["machine=h200"])
    with pytest.raises(SpecError) as err:
        validate(spec)
    text = str(err.value)
    assert "machine=h200" in text and "this process runs on cpu (no CUDA GPU)" in text
    assert "dry_run=true machine=h200" in text


def test_a_real_run_with_a_profile_that_matches_this_machine_runs():
    h200 = machine_of("h200")
    here = Machine(**{**h200.__dict__, "device_name": "NVIDIA H200", "probed": True, "profile": None})
    assert validate(sdbuild.compose(["machine=h200", "precision=bf16"]), here) == "cuda"
    h100 = Machine(**{**here.__dict__, "gpu_memory": int(79.2 * 1024 ** 3)})  # another Hopper card
    with pytest.raises(SpecError, match="but this process runs on NVIDIA H200 .*79.2 GiB"):
        validate(sdbuild.compose(["machine=h200", "precision=bf16"]), h100)
    assert validate(sdbuild.compose(["machine=cpu"]), Machine.probe()) == "cpu"  # this CPU box is a CPU machine


def test_cli_plans_for_an_h200_and_refuses_to_measure_as_one(tmp_path):
    out = run_cli("dry_run=true", "machine=h200", "+preset=cuda_best", f"hydra.run.dir={tmp_path}/plan")
    assert out.returncode == 0, out.stderr
    assert "machine=h200: NVIDIA H200 (compute capability 9.0" in out.stdout and "device: cuda" in out.stdout
    out = run_cli("machine=h200", "run.steps=1", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert "machine=h200" in out.stderr and "this process runs on cpu" in out.stderr and "Traceback" not in out.stderr
    row = json.loads((tmp_path / "run" / "result.json").read_text())
    assert row["status"] == "unsupported" and row["latency_s"] is None


def test_a_sweep_over_machines_refuses_the_profiles_as_rows(tmp_path):
    out = run_cli("--multirun", "machine=h100,a100", "run.steps=1", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    rows = {json.loads(p.read_text())["spec"]["machine"]["name"]: json.loads(p.read_text())
            for p in tmp_path.glob("*/result.json")}
    assert sorted(rows) == ["a100", "h100"]  # the first refusal did not end the sweep
    for name, row in rows.items():
        assert row["status"] == "unsupported" and f"machine={name}" in row["error"]
        assert "this process runs on cpu" in row["error"]


# The CUDA rules through the profiles ----------------------------------------------------------------

# (overrides, {profile: the refusal's text, or None where it plans}) for the rules of capabilities.py
RULES = [
    (["precision=bf16"], {"h100": None, "a100": None, "cpu": None}),  # bf16 needs capability >= 8.0 on CUDA only
    (["precision=fp16"], {"h100": None, "cpu": "needs CUDA, but this machine has no CUDA GPU"}),
    (["quant=fp8dq", "precision=bf16"], {"h100": None, "l40s": None, "rtx4090": None,
                                         "a100": "compute capability >= 8.9, but NVIDIA A100-SXM4-80GB is 8.0"}),
    (["attention=sdpa_flash", "precision=fp32"], {"h100": "FlashAttention and cuDNN attention run fp16/bf16 only"}),
    (["attention=sdpa_cudnn", "precision=tf32"], {"a100": "FlashAttention and cuDNN attention run fp16/bf16 only"}),
    (["attention=sdpa_flash", "precision=fp16"], {"h200": None, "rtx4090": None, "cpu": "needs CUDA"}),
    (["model=tiny_flux", "precision=bf16", "attention=dispatch_flash_attn"], {"h100": None, "cpu": "needs CUDA"}),
    (["model=tiny_flux", "precision=bf16", "attention=dispatch_sage"], {"l40s": None, "a100": None}),
    (["compile=inductor_reduce_overhead", "precision=fp16"], {"h100": None, "cpu": "needs CUDA"}),
    (["compile=export", "precision=fp16"], {"h200": None}),
    (["memory=model_offload", "precision=fp16"], {"a100": None, "cpu": "needs CUDA"}),
]


@pytest.mark.parametrize("overrides,expected", RULES, ids=[" ".join(o) for o, _ in RULES])
def test_the_cuda_rules_on_each_profile(overrides, expected):
    for name, refused in expected.items():
        if refused is None:
            assert validate(planned(f"machine={name}", *overrides)) == ("cpu" if name == "cpu" else "cuda"), name
        else:
            assert refused in refusal(f"machine={name}", *overrides), name


def test_the_toolchain_rules_on_a_profile():
    h100 = machine_of("h100")
    no_cc = Machine(**{**h100.__dict__, "cc": False})
    assert "no C compiler ($CC, gcc, clang)" in refusal("machine=h100", "compile=inductor", "precision=fp16",
                                                       machine=no_cc)
    no_headers = Machine(**{**h100.__dict__, "python_headers": False})
    assert "Python headers (Python.h)" in refusal("machine=h100", "compile=inductor", "precision=fp16",
                                                  machine=no_headers)
    no_cxx = Machine(**{**h100.__dict__, "c_compiler": False})  # AOTInductor builds its CUDA wrapper with g++
    assert "no C++ compiler ($CXX, g++)" in refusal("machine=h100", "compile=export", "precision=fp16", machine=no_cxx)
    validate(planned("machine=h100", "compile=inductor", "precision=fp16"), no_cxx)  # Triton needs no C++
    no_toolkit = Machine(**{**h100.__dict__, "cuda_toolkit": False})
    assert "no CUDA toolkit" in refusal("machine=h100", "compile=export", "precision=fp16", machine=no_toolkit)


# Finding 4: cuDNN attention's head-dim limit is the machine's -------------------------------------------


def test_cudnn_takes_head_dims_up_to_256_on_hopper_with_cudnn_9_10():
    import torch

    from sdbuild.levers.attention import kernel_takes
    from sdbuild.spec import SdpaBackend

    cudnn, fp16 = SdpaBackend.cudnn, torch.float16
    h200, h100, a100 = machine_of("h200"), machine_of("h100"), machine_of("a100")
    assert kernel_takes(cudnn, 160, fp16, h200) is None and kernel_takes(cudnn, 256, fp16, h100) is None
    assert "head dim 264 > 256" in kernel_takes(cudnn, 264, fp16, h200)
    assert "head dim 160 > 128, the most cudnn takes on compute capability 8.0" in kernel_takes(cudnn, 160, fp16, a100)
    older = Machine(**{**h100.__dict__, "cudnn_version": (9, 8, 0)})  # Hopper, but cuDNN before 9.10
    assert "head dim 160 > 128" in kernel_takes(cudnn, 160, fp16, older)
    assert kernel_takes(cudnn, 160, torch.float32, h200) == "cudnn does not run float32"
    assert kernel_takes(SdpaBackend.efficient, 512, torch.float32, a100) is None


def test_torchs_own_predicate_is_asked_through_its_api():
    """On this process's GPU the decision is torch's `can_use_*_attention` on SDPAParams. Here (no GPU)
    the same call on CPU tensors runs and says no: the API is the one torch has."""
    import torch

    from sdbuild.levers.attention import torch_refuses
    from sdbuild.spec import SdpaBackend

    for backend in (SdpaBackend.flash, SdpaBackend.efficient, SdpaBackend.cudnn):
        why = torch_refuses(backend, 64, torch.float16, device="cpu")
        assert why and why.startswith("PyTorch's can_use_") and "head dim 64" in why


# The dry run's per-block decisions are the builder's ---------------------------------------------------


def test_dry_run_shows_per_block_attention_decisions_for_sd15_sdxl_and_flux():
    from sdbuild.levers.attention import planned_record

    sd15 = ["model=sd15_arch", "precision=fp16", "attention=sdpa_cudnn"]
    h200 = planned_record(planned("machine=h200", *sd15))["blocks"]
    assert h200["unet"] == {"pinned": 32, "left": 0, "pinned_head_dims": [40, 80, 160], "left_head_dims": []}
    assert h200["vae"]["left_head_dims"] == [512]
    a100 = planned_record(planned("machine=a100", *sd15))
    assert a100["blocks"]["unet"]["left_head_dims"] == [160] and a100["blocks"]["unet"]["pinned_head_dims"] == [40, 80]
    assert "head dim 160 > 128" in a100["unpinned"]["unet"]
    sdxl = planned_record(planned("machine=h100", "model=sdxl_arch", "precision=fp16", "attention=sdpa_flash"))
    assert sdxl["pinned_modules"] == ["unet"] and sdxl["blocks"]["unet"]["pinned_head_dims"] == [64]
    flux = planned_record(planned("machine=h200", "model=flux_arch", "precision=bf16", "attention=dispatch_cudnn"))
    assert flux["blocks"]["transformer"] == {"pinned": 57, "left": 0, "pinned_head_dims": [128], "left_head_dims": []}
    with pytest.raises(SpecError, match="cudnn does not run float32"):
        planned_record(planned("machine=h200", "model=flux_arch", "precision=fp32", "attention=dispatch_cudnn"))


@pytest.mark.parametrize("overrides", [
    ["precision=fp16", "attention=sdpa_cudnn"],  # the tiny UNet's head dims 4 and 8: cuDNN takes 8 only
    ["precision=fp16_vae32", "attention=sdpa_flash"],  # the fp32 VAE is left to PyTorch
    ["model=tiny_sdxl", "precision=bf16", "attention=sdpa_fused", "attention.sdpa_backend=cudnn"],
])
def test_the_dry_runs_decisions_equal_the_builders(overrides):
    """The attention step on the loaded tiny pipeline and the dry run on the same model's modules on the
    meta device, on the same machine: the same blocks pinned and left, for the same reasons."""
    from sdbuild.levers.attention import apply_attention, planned_record
    from sdbuild.levers.model import load

    spec = sdbuild.compose(["run.steps=2", *overrides])
    for name in ("h200", "a100"):
        machine = machine_of(name)
        built = apply_attention(load(spec), spec, machine)
        plan = planned_record(spec, machine)
        assert (built["blocks"], built["unpinned"], built["pinned_modules"]) == \
            (plan["blocks"], plan["unpinned"], plan["pinned_modules"]), name


def test_cli_dry_run_refuses_what_the_build_would_refuse(tmp_path):
    args = ["dry_run=true", "model=sd15_arch", "precision=fp16", "attention=sdpa_cudnn", "compile=trace"]
    out = run_cli(*args, "machine=a100", f"hydra.run.dir={tmp_path}/a")
    assert out.returncode == 2 and "compile=trace with attention.sdpa_backend=cudnn" in out.stderr
    out = run_cli(*args, "machine=h200", f"hydra.run.dir={tmp_path}/h")
    assert out.returncode == 0, out.stderr
    assert "unet: cudnn takes 32 of 32 attention blocks (head dim 40, 80, 160)" in out.stdout
    assert "the traced UNet replays under sdpa_kernel(cudnn)" in out.stdout


# Finding 10: optional packages probed as diffusers probes them -------------------------------------------


def _fake_package(root: Path, module: str, dist: str = None, version: str = "1.0"):
    (root / f"{module}.py").write_text("")
    if dist:
        info = root / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def test_flash_attention_3_is_the_flash_attn_3_distribution_not_its_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_package(tmp_path, "flash_attn_interface", "flash_attn_3", "3.0.0b1")  # FA3's module and distribution
    assert validate_mod.package_version("flash_attn_interface") is None  # the module alone: diffusers ignores it
    assert validate_mod.package_version("flash_attn_3") is None  # no flash_attn_3 module: diffusers' find_spec fails
    _fake_package(tmp_path, "flash_attn_3")
    assert validate_mod.package_version("flash_attn_3") == "3.0.0b1"
    assert "flash_attn_3" in Machine.probe().packages


def test_flash_attn_and_sageattention_need_diffusers_minimum_versions(tmp_path, monkeypatch):
    from diffusers.models import attention_dispatch

    from sdbuild import capabilities

    assert (capabilities.REQUIRED_FLASH_ATTN, capabilities.REQUIRED_SAGE, capabilities.REQUIRED_XFORMERS) == (
        attention_dispatch._REQUIRED_FLASH_VERSION, attention_dispatch._REQUIRED_SAGE_VERSION,
        attention_dispatch._REQUIRED_XFORMERS_VERSION)
    h100 = machine_of("h100")
    old = Machine(**{**h100.__dict__, "package_versions": {**h100.package_versions, "flash_attn": "2.5.8",
                                                           "sageattention": "1.0.6"}})
    flux = ["machine=h100", "model=tiny_flux", "precision=bf16"]
    assert "`flash_attn` 2.5.8 is installed" in refusal(*flux, "attention=dispatch_flash_attn", machine=old)
    assert "the `flash_attn` package >= 2.6.3" in refusal(*flux, "attention=dispatch_flash_attn", machine=old)
    assert "`sageattention` 1.0.6 is installed" in refusal(*flux, "attention=dispatch_sage", machine=old)
    monkeypatch.syspath_prepend(str(tmp_path))  # the probe reads the installed version
    _fake_package(tmp_path, "sageattention", "sageattention", "1.0.6")
    assert Machine.probe().package_versions["sageattention"] == "1.0.6"


# Finding 11: the compilers and Python.h, found as Triton and Inductor find them --------------------------


def test_triton_uses_cc_as_given_else_gcc_or_clang(tmp_path):
    assert validate_mod.c_compiler_found({"CC": "gcc"}) and validate_mod.c_compiler_found({})
    assert not validate_mod.c_compiler_found({"CC": str(tmp_path / "no-such-cc")})  # no fallback past $CC
    assert validate_mod.cxx_compiler_found({}) and not validate_mod.cxx_compiler_found({"CXX": str(tmp_path / "x")})


def test_python_headers_are_found_under_debians_posix_local_scheme(tmp_path, monkeypatch):
    """A Debian/Ubuntu system Python's default scheme is `posix_local` (/usr/local/include, no headers);
    Triton reads it as `posix_prefix`, where python3-dev puts Python.h."""
    import sysconfig

    monkeypatch.setattr(sysconfig, "get_default_scheme", lambda: "posix_local")
    monkeypatch.setitem(sysconfig._INSTALL_SCHEMES, "posix_local",
                        {**sysconfig._INSTALL_SCHEMES["posix_prefix"], "include": str(tmp_path)})
    assert validate_mod.python_include_dir() == sysconfig.get_paths(scheme="posix_prefix")["include"]
    assert Machine.probe().python_headers


def test_a_memory_refusal_names_the_profile_it_planned_against():
    """Planned against a profile, the VAE-decode memory refusal names that machine, not "here"."""
    big = ["precision=fp16", "run.batch_size=8", "run.height=8192", "run.width=8192"]
    text = refusal("machine=rtx4090", *big)
    assert "GPU memory on machine=rtx4090" in text and "memory here" not in text
