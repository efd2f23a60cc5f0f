"""Impossible combinations and user mistakes end with one clear message, before weights load."""

import json

import pytest

import sdbuild
from sdbuild.errors import SpecError
from sdbuild.validate import Machine, validate

from conftest import FAST, run_cli
from helpers import CPU, OLD_GPU


def problems(overrides, machine=CPU):
    with pytest.raises(SpecError) as err:
        validate(sdbuild.compose(overrides), machine)
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


def test_xformers_without_the_package():
    machine = Machine(**{**CPU.__dict__, "cuda": True, "device_name": "A100", "capability": (8, 0),
                         "packages": frozenset()})
    assert "`xformers` package" in problems(["attention=xformers"], machine)


def test_bf16_needs_ampere_on_cuda_but_runs_on_cpu():
    assert validate(sdbuild.compose(["precision=bf16"]), CPU) == "cpu"
    assert "compute capability >= 8.0" in problems(["precision=bf16"], OLD_GPU)
    assert validate(sdbuild.compose(["precision=fp16"]), OLD_GPU) == "cuda"


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
    assert validate(sdbuild.compose(["quant=int8wo"]), CPU) == "cpu"  # with accelerate it is accepted


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
