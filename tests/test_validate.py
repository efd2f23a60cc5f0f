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
    (["model=sd15", "model.path="], "model.path: is empty"),
    (["model=sd15", "model.path=not a hub id"], "is not a hub id"),
])
def test_bad_values_say_what_and_what_instead(overrides, needle):
    assert needle in problems(overrides)


def test_a_hub_id_outside_the_local_cache_is_refused_before_loading():
    # sdbuild downloads only with model.download=true: otherwise a hub id must already be in the
    # Hugging Face cache (test_specs.py loads one that is), and the refusal says how to get it.
    for hub_id in ("org/some-model.v1", "stable-diffusion-v1-5/stable-diffusion-v1-5"):  # the second: model=sd15's default
        overrides = ["model=sd15"] + ([f"model.path={hub_id}"] if hub_id.startswith("org/") else [])
        assert problems(overrides) == (
            f"model.path={hub_id}: is a hub id that is not in the local Hugging Face cache, and sdbuild downloads "
            f"only when asked. Download it once yourself (`hf download {hub_id}`), or set model.download=true "
            "(sdbuild fetches its safetensors and configs), or set model.path=/path/to/a/diffusers/folder")


def test_a_pipeline_folder_with_safetensors_is_accepted(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for component in ("unet", "vae", "text_encoder"):  # every component the pipeline loads
        (tmp_path / component).mkdir()
        (tmp_path / component / "model.safetensors").write_bytes(b"x")
    assert accepted(["model=sd15", f"model.path={tmp_path}"]) == "cpu"


def test_the_docs_tables_carry_every_rule():
    from sdbuild.capabilities import EXCLUSIONS, REQUIREMENTS, markdown_tables, requirement_needs

    table = markdown_tables()
    for req in REQUIREMENTS:
        assert f"| `{req.option}` | {requirement_needs(req)} | {req.instead} |" in table
    for excl in EXCLUSIONS:
        assert f"| `{excl.combination}` | {excl.why} | {excl.instead} |" in table
    assert table.count("\n|---|---|---|") == 2
    every_need = [r for r in REQUIREMENTS if r.option == "compile=inductor"][0]
    assert requirement_needs(every_need) == "a C++ compiler on CPU, on CUDA a C compiler and the Python headers (Triton)"
    fp8 = [r for r in REQUIREMENTS if r.option == "quant=fp8dq"][0]
    assert requirement_needs(fp8) == "CUDA, compute capability >= 8.9"
    offload = [r for r in REQUIREMENTS if r.group == "memory" and r.package][0]
    assert requirement_needs(offload) == "CUDA, the `accelerate` package"


OLD_DIFFUSERS = Machine(**{**CPU.__dict__, "diffusers_version": "0.34.1"})
NO_COMPILER = Machine(**{**CPU.__dict__, "c_compiler": False})
GPU_WITHOUT_PACKAGES = Machine(**{**A100.__dict__, "packages": frozenset()})


@pytest.mark.parametrize("overrides,machine,message", [
    (["precision=fp16"], CPU,
     "precision=fp16 (precision.dtype or precision.vae_dtype = fp16): needs CUDA, but this machine has no CUDA GPU. "
     "On CPU use precision=bf16 (or fp32); fp16 kernels there are missing or slower than fp32"),
    (["precision=fp16", "run.device=cpu"], A100,
     "precision=fp16 (precision.dtype or precision.vae_dtype = fp16): needs CUDA, but the run is on the CPU "
     "(run.device=cpu). On CPU use precision=bf16 (or fp32); fp16 kernels there are missing or slower than fp32"),
    (["precision=bf16"], OLD_GPU,
     "precision=bf16 (precision.dtype or precision.vae_dtype = bf16): needs compute capability >= 8.0, but Tesla T4 "
     "is 7.5. On pre-Ampere GPUs use precision=fp16"),
    (["compile=regional"], OLD_DIFFUSERS,
     "compile=regional (compile.regional=true): needs diffusers >= 0.35, but diffusers 0.34.1 is installed. "
     "Use compile=inductor (whole-model compile)"),
    (["compile=inductor"], NO_COMPILER,
     "compile=inductor: needs a C++ compiler on CPU, on CUDA a C compiler and the Python headers (Triton), but no C++ "
     "compiler was found (TorchInductor builds C++ kernels on CPU). Install what is missing (apt-get install g++ "
     "python3-dev) or use compile=none"),
    (["attention=xformers"], GPU_WITHOUT_PACKAGES,
     "attention=xformers: needs CUDA, the `xformers` package, but `xformers` is not installed. Use attention=sdpa "
     "(PyTorch's fused attention, no extra package)"),
    (["run.device=cuda"], CPU,
     "run.device=cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False). Use run.device=auto or cpu"),
    (["run.height=100"], CPU,
     "run.height=100: must be a positive multiple of 8 (the VAE downsamples 8x), at most 4096. Use run.height=96"),
    (["run.width=3"], CPU,
     "run.width=3: must be a positive multiple of 8 (the VAE downsamples 8x), at most 4096. Use run.width=8"),
    (["run.guidance_scale=-1"], CPU,
     "run.guidance_scale=-1.0: must be >= 0. Use 7.5 (typical) or 1.0 (no classifier-free guidance)"),
    (["attention=sliced", "attention.slice_size=lots"], CPU,
     "attention.slice_size=lots: must be auto, max or a number of heads. Use attention.slice_size=auto"),
    (["model=sd15", "model.path="], CPU, "model.path: is empty. Set model.path=/path/to/a/diffusers/folder"),
    (["model=sd15", "model.path=/nonexistent/folder"], CPU,
     "model.path=/nonexistent/folder: does not exist and is not a hub id (org/name). Set "
     "model.path=/path/to/a/diffusers/folder"),
    (["compile=trace", "model=tiny_sdxl"], CPU,
     "compile=trace or export with model family sdxl: cannot be combined: SDXL's UNet takes added conditioning "
     "(text_embeds, time_ids) that the 3-input graph does not carry. Use compile=inductor or compile=regional for SDXL"),
])
def test_the_whole_message(overrides, machine, message):
    """What the user reads, word for word: the option as they wrote it, what is wrong, what to use."""
    assert problems(overrides, machine) == message


def test_the_whole_message_for_model_folders(tmp_path):
    (tmp_path / "unet").mkdir()
    assert problems(["model=sd15", f"model.path={tmp_path}"]) == (
        f"model.path={tmp_path}: is not a diffusers folder (no model_index.json in {tmp_path}). Point it at the folder "
        "that holds model_index.json, unet/, vae/, text_encoder/")
    (tmp_path / "model_index.json").write_text("{}")
    assert problems(["model=sd15", f"model.path={tmp_path}"]) == (
        f"model.path={tmp_path}: holds no .safetensors weights in unet/, vae/, text_encoder/ (sdbuild loads only "
        "safetensors, never pickles). Convert the weights with diffusers' save_pretrained(..., safe_serialization=True)")


def test_several_problems_are_listed_one_a_line():
    text = problems(["run.steps=0", "run.repeats=0"])
    assert text == ("- run.repeats=0: must be auto or a whole number >= 1. Use run.repeats=auto (call until the "
                    "interval is narrow) or run.repeats=3\n"
                    "- run.steps=0: must be >= 1. Use run.steps=1 or more, at most 1000 (the schedulers' training timesteps; "
                    "50 is typical)")


def test_measurement_options_are_checked_before_any_weights_load():
    text = problems(["run.repeats=many", "run.threads=0", "run.interval_target=3", "run.max_measure_s=0"])
    assert text == (
        "- run.repeats=many: must be auto or a whole number >= 1. Use run.repeats=auto (call until the interval is "
        "narrow) or run.repeats=3\n"
        "- run.threads=0: must be auto or a whole number >= 1. Use run.threads=auto (torch's default) or "
        "run.threads=1\n"
        "- run.interval_target=3.0: must be a fraction between 0 and 1 (the half-width of the 95 % interval, "
        "relative to the median). Use run.interval_target=0.03 (+-3 %)\n"
        "- run.max_measure_s=0.0: must be > 0 seconds. Use run.max_measure_s=120")
    assert validate(composed("run.repeats=auto", "run.threads=2"), CPU) == "cpu"  # both accepted


def test_fixed_graph_rules_apply_to_trace_and_export_only():
    assert accepted(["model=tiny_sdxl"]) == "cpu" and accepted(["model=tiny_sdxl", "compile=inductor"]) == "cpu"
    assert "sdxl" in problems(["model=tiny_sdxl", "compile=export"])
    assert "a target other than the UNet" in problems(["compile=trace", "compile.targets=[unet,vae_decoder]"])
    assert accepted(["compile=inductor_all"]) == "cpu"
    assert accepted(["attention=sliced"]) == "cpu" and accepted(["attention=sliced", "attention.slice_size=auto"]) == "cpu"


def test_a_diffusers_version_equal_to_the_requirement_is_enough():
    assert accepted(["compile=regional"], Machine(**{**CPU.__dict__, "diffusers_version": "0.35"})) == "cpu"


def test_the_probe_finds_the_packages_and_tools_that_are_there():
    import importlib.util
    import shutil

    import diffusers

    import torch

    machine = Machine.probe()
    assert machine.cuda == torch.cuda.is_available()
    if not machine.cuda:
        assert machine.device_name == "cpu" and machine.capability is None
    for package in ("xformers", "accelerate", "torchao"):
        assert (package in machine.packages) == (importlib.util.find_spec(package) is not None), package
    assert machine.diffusers_version == diffusers.__version__
    assert machine.c_compiler is any(shutil.which(c) is not None for c in ("g++", "c++", "clang++"))


@pytest.mark.cuda
def test_the_probe_on_a_gpu():
    import torch

    machine = Machine.probe()
    assert machine.cuda and machine.capability == torch.cuda.get_device_capability(0)
    assert machine.device_name == torch.cuda.get_device_name(0)


# Every numeric field has its range, checked with the other spec-level rules before anything loads
# (issue 27, defect 8): each of these once failed after the weights loaded or was taken silently.
OUT_OF_RANGE = [
    (["model.resolution=63"], "model.resolution=63: must be a multiple of 8"),
    (["model.resolution=0"], "model.resolution=0: must be >= 8"),
    (["model.resolution=-64"], "model.resolution=-64: must be >= 8"),
    (["model.resolution=12000"], "model.resolution=12000: must be <= 4096"),
    (["attention=sliced", "attention.slice_size=0"], "attention.slice_size=0: must be a number of heads from 1"),
    (["cache=deepcache", "cache.interval=0"], "cache.interval=0: must be >= 1"),
    (["run.seed=18446744073709551616"], "run.seed=18446744073709551616: must be <= 18446744073709551615"),
    (["cache=tome", "cache.ratio=5"], "cache.ratio=5.0: must be <= 0.99"),
    (["cache=first_block", "cache.threshold=-1"], "cache.threshold=-1.0: must be > 0"),
    (["cache=mag_cache", "cache.retention_ratio=1.5"], "cache.retention_ratio=1.5: must be <= 1.0"),
    (["run.steps=5000"], "run.steps=5000: must be <= 1000"),
    (["run.guidance_scale=1e6"], "run.guidance_scale=1000000.0: must be <= 100"),
    (["run.threads=4096"], "run.threads=4096: is more than this machine's"),
]


@pytest.mark.parametrize("overrides,needle", OUT_OF_RANGE, ids=[" ".join(o) for o, _ in OUT_OF_RANGE])
def test_every_numeric_field_is_checked_against_its_range(overrides, needle):
    assert needle in problems(overrides)


def test_every_range_names_a_spec_field_and_its_default_is_inside():
    """RANGES cannot drift from the spec: each entry is a field, and the default spec passes them all."""
    from sdbuild.spec import RANGES, Spec, range_problems

    spec = Spec()
    for name in RANGES:
        section, field = name.split(".")
        assert hasattr(getattr(spec, section), field), name
    assert range_problems(spec) == []
