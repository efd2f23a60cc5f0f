"""Impossible combinations and user mistakes end with one clear message, before weights load."""

import json

import pytest

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.validate import Machine, validate

from conftest import FAST, run_cli
from helpers import CPU, OLD_GPU, composed


def problems(overrides, machine=CPU):
    with pytest.raises(SpecError) as err:
        validate(composed(*overrides), machine)
    return str(err.value)


@pytest.mark.parametrize("overrides,needle,instead", [
    (["precision=fp16"], "precision=fp16", "precision=bf16"),
    (["attention=xformers"], "attention=xformers", "attention=sdpa"),
    (["compile=inductor", "compile.mode=reduce_overhead"], "reduce_overhead", "compile.mode=default"),
    (["run.device=cuda"], "run.device=cuda", "run.device=auto"),
])
def test_cuda_only_options_are_refused_on_cpu_saying_what_to_use_instead(overrides, needle, instead):
    text = problems(overrides)
    assert needle in text and "CUDA" in text and instead in text


@pytest.mark.parametrize("option", [
    "precision=fp16_vae32", "attention=sdpa_flash", "attention=sdpa_efficient", "attention=sdpa_cudnn",
    "compile=inductor_reduce_overhead", "memory=model_offload", "memory=sequential_offload",
    "memory=group_offload", "quant=fp8dq",
])
def test_cuda_only_options_say_what_they_need(option):
    with pytest.raises(SpecError) as err:
        validate(composed(*[option]), CPU)
    assert option in str(err.value) and "needs CUDA" in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    (["attention=sliced", "attention.processor=sdpa"], "SlicedAttnProcessor"),
    (["attention=classic", "attention.fuse_qkv=true"], "FusedAttnProcessor2_0"),
    (["compile=trace", "quant=int8wo"], "torch.jit"),
    (["compile=regional", "compile.method=trace"], "repeated blocks"),
    (["vae=tiny", "model=sd15", "model.path=org/name"], "vae.path"),
])
def test_exclusions(overrides, needle):
    with pytest.raises(SpecError) as err:
        validate(composed(*overrides), CPU)
    assert needle in str(err.value)


def test_xformers_without_the_package():
    machine = Machine(**{**CPU.__dict__, "cuda": True, "device_name": "A100", "capability": (8, 0),
                         "packages": frozenset()})
    assert "`xformers` package" in problems(["attention=xformers"], machine)


def test_bf16_needs_ampere_on_cuda_but_runs_on_cpu():
    assert validate(composed(*["precision=bf16"]), CPU) == "cpu"
    assert "compute capability >= 8.0" in problems(["precision=bf16"], OLD_GPU)
    assert validate(composed(*["precision=fp16"]), OLD_GPU) == "cuda"


@pytest.mark.parametrize("overrides,needle", [
    (["run.height=100"], "run.height=100"),
    (["run.width=0"], "run.width=0"),
    (["run.steps=0"], "run.steps=0"),
    (["run.batch_size=0"], "run.batch_size=0"),
    (["run.repeats=0"], "run.repeats=0"),
    (["model=sd15", "model.path=/nonexistent/folder"], "does not exist"),
])
def test_bad_values(overrides, needle):
    assert needle in problems(overrides)


def test_every_problem_is_reported_at_once():
    text = problems(["precision=fp16", "attention=xformers", "run.steps=0"])
    assert "precision=fp16" in text and "attention=xformers" in text and "run.steps=0" in text


@pytest.mark.xfail(strict=True, reason="capability row added in branch wt-cuda")
def test_quant_without_accelerate_is_refused_before_loading():
    """diffusers' torchao loading needs accelerate (low_cpu_mem_usage); without it, say so up front."""
    machine = Machine(**{**CPU.__dict__, "packages": frozenset({"torchao", "xformers"})})
    for option in ("int8wo", "int8dq"):
        text = problems([f"quant={option}"], machine)
        assert f"quant={option}" in text and "`accelerate`" in text
    assert validate(composed(*["quant=int8wo"]), CPU) == "cpu"  # with accelerate it is accepted


def test_model_folder_without_safetensors(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    assert "no .safetensors" in problems(["model=sd15", f"model.path={tmp_path}"])
    assert "model_index.json" in problems(["model=sd15", f"model.path={tmp_path / 'unet'}"])


def test_cli_refuses_cleanly_and_records_the_row(tmp_path):
    out = run_cli("precision=fp16", f"hydra.run.dir={tmp_path}", *FAST)
    assert out.returncode == 2
    assert "precision=fp16" in out.stderr and "precision=bf16" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    row = json.loads((tmp_path / "result.json").read_text())
    assert row["status"] == "unsupported" and "CUDA" in row["error"]
    assert row["load_s"] is None  # refused before any weights were loaded


# The rules one by one, at their edges: what is accepted, what is refused, and what the message says.


def accepted(overrides, machine=CPU):
    return validate(composed(*overrides), machine)


A100 = Machine(**{**CPU.__dict__, "cuda": True, "device_name": "A100", "capability": (8, 0)})
H100 = Machine(**{**A100.__dict__, "device_name": "H100", "capability": (9, 0)})


def test_the_device_follows_run_device():
    assert accepted([]) == "cpu" and accepted([], A100) == "cuda"
    assert accepted(["run.device=cpu"], A100) == "cpu" and accepted(["run.device=cuda"], A100) == "cuda"
    assert accepted(["run.device=cpu"]) == "cpu"


def test_a_cuda_option_with_run_device_cpu_on_a_gpu_machine():
    text = problems(["precision=fp16", "run.device=cpu"], A100)
    assert "the run is on the CPU (run.device=cpu)" in text and "no CUDA GPU" not in text
    assert "this machine has no CUDA GPU" in problems(["precision=fp16"])


def test_compute_capability_edges():
    assert "Tesla T4 is 7.5" in problems(["precision=bf16"], OLD_GPU)
    assert accepted(["precision=bf16"], A100) == "cuda"  # exactly 8.0 is enough
    assert "compute capability >= 8.9" in problems(["quant=fp8dq"], A100)
    assert accepted(["quant=fp8dq"], H100) == "cuda"
    assert "attention=sdpa_flash" in problems(["precision=fp16", "attention=sdpa_flash"], OLD_GPU)
    assert accepted(["precision=fp16", "attention=sdpa_efficient"], OLD_GPU) == "cuda"


def test_the_math_kernel_and_auto_run_on_cpu():
    assert accepted(["attention=sdpa_math"]) == "cpu" and accepted(["attention=sdpa"]) == "cpu"


@pytest.mark.parametrize("version,ok", [("0.34.9", False), ("0.35.0", True), ("0.35.0.dev0", True), ("1.0.0", True)])
def test_diffusers_version_edges(version, ok):
    machine = Machine(**{**CPU.__dict__, "diffusers_version": version})
    if ok:
        assert accepted(["compile=regional"], machine) == "cpu"
    else:
        text = problems(["compile=regional"], machine)
        assert f"diffusers {version} is installed" in text and "diffusers >= 0.35" in text


def test_missing_package_message():
    machine = Machine(**{**A100.__dict__, "packages": frozenset({"xformers", "accelerate"})})
    text = problems(["quant=int8wo"], machine)
    assert "quant=int8wo" in text and "the `torchao` package" in text and "`torchao` is not installed" in text
    assert "quant=none" in text  # what to use instead


def test_inductor_on_cpu_needs_a_compiler_but_not_on_cuda():
    machine = Machine(**{**CPU.__dict__, "c_compiler": False})
    for option in ("compile=inductor", "compile=export"):
        text = problems([option], machine)
        assert option in text and "no C++ compiler was found" in text and "a C++ compiler on CPU" in text
    assert accepted(["compile=inductor"], Machine(**{**A100.__dict__, "c_compiler": False})) == "cuda"
    assert accepted(["compile=inductor"]) == "cpu" and accepted(["compile=trace"], machine) == "cpu"


def test_the_message_names_the_users_choice_with_the_field_that_needs_it():
    # the choice is compile=inductor; what needs CUDA is its mode
    assert "compile=inductor (compile.mode=reduce_overhead (CUDA graphs))" in problems(
        ["compile=inductor", "compile.mode=reduce_overhead"])
    assert "attention=xformers: needs CUDA" in problems(["attention=xformers"])


@pytest.mark.parametrize("overrides", [
    ["run.height=8", "run.width=16"], ["run.warmup=0"], ["run.steps=1", "run.batch_size=1", "run.repeats=1"],
    ["run.guidance_scale=0"], ["attention=sliced", "attention.slice_size=max"], ["attention=sliced", "attention.slice_size=2"],
])
def test_values_at_their_lower_edge_are_accepted(overrides):
    assert accepted(overrides) == "cpu"


@pytest.mark.parametrize("overrides,needle", [
    (["run.height=100"], "Use run.height=96"),
    (["run.width=-8"], "run.width=-8: must be a positive multiple of 8"),
    (["run.warmup=-1"], "run.warmup=-1: must be >= 0"),
    (["run.steps=0"], "Use run.steps=1 or more"),
    (["run.guidance_scale=-0.5"], "run.guidance_scale=-0.5: must be >= 0"),
    (["attention=sliced", "attention.slice_size=lots"], "attention.slice_size=lots: must be auto, max or a number"),
    (["model=sd15", "model.path="], "model.path is empty"),
    (["model=sd15", "model.path=not a hub id"], "is not a hub id"),
])
def test_bad_values_say_what_and_what_instead(overrides, needle):
    assert needle in problems(overrides)


def test_a_hub_id_that_is_not_a_folder_is_left_to_the_loader():
    assert accepted(["model=sd15", "model.path=org/some-model.v1"]) == "cpu"
    assert accepted(["model=sd15"]) == "cpu"  # the default hub id


def test_a_pipeline_folder_with_safetensors_is_accepted(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert accepted(["model=sd15", f"model.path={tmp_path}"]) == "cpu"


def test_the_probe_describes_this_machine():
    import torch

    machine = Machine.probe()
    assert machine.cuda == torch.cuda.is_available()
    assert machine.device_name == ("cpu" if not machine.cuda else torch.cuda.get_device_name(0))
    assert machine.packages <= {"xformers", "accelerate", "torchao"} and machine.diffusers_version[0].isdigit()


def test_the_docs_tables_carry_every_rule():
    from sdbuild.capabilities import EXCLUSIONS, REQUIREMENTS, markdown_tables, requirement_needs

    table = markdown_tables()
    for req in REQUIREMENTS:
        assert f"| `{req.option}` | {requirement_needs(req)} | {req.instead} |" in table
    for excl in EXCLUSIONS:
        assert f"| `{excl.options}` | {excl.why} | {excl.instead} |" in table
    assert table.count("\n|---|---|---|") == 2
    every_need = [r for r in REQUIREMENTS if r.option == "compile=inductor"][0]
    assert requirement_needs(every_need) == "a C++ compiler on CPU"
    fp8 = [r for r in REQUIREMENTS if r.option == "quant=fp8dq"][0]
    assert requirement_needs(fp8) == "CUDA, compute capability >= 8.9"
    offload = [r for r in REQUIREMENTS if r.group == "memory" and r.package][0]
    assert requirement_needs(offload) == "CUDA, the `accelerate` package"
